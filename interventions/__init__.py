"""seeright's intervention library: torch + transformers only (no web, no evaluation code)."""
