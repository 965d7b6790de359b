"""Hydra configs (read by Hydra through its search path, not imported)."""
