"""Thin command-line entry points: python -m launch.<train|sample|benchmark|prepare>."""
