"""Weights I/O: resolving names to local files (hub.py) and reading/writing checkpoints (checkpoint.py)."""
