"""The interventions, one per file. ``seeright.interventions.registry`` finds them; nothing here lists them."""
