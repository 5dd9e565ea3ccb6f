"""Thin entry points (Hydra mains, plots, analysis, benchmark)."""
