"""Training scripts (one-time steps whose outputs ship with the package)."""
