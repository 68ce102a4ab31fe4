"""Experiment configs (ml_collections ConfigDict files)."""
