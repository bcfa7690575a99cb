"""The shapes world: scenes with known objects, the models trained on it, and their measurement commands."""
