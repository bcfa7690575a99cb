"""seeright's service layer: engine, scheduler, HTTP API and CLI."""
