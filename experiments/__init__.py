"""Thin entry points (Hydra mains, the demo, plots, analysis)."""
