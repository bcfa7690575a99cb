"""The interventions, one per file. ``interventions.registry`` finds them; nothing here lists them."""
