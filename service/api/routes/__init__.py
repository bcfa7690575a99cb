"""Thin routers: each hands the validated body to its serving module and returns what that gives."""
