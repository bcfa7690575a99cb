"""Evaluation: POPE and CHAIR data loading and exact scorers."""
