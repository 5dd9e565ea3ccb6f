"""What the entry points share: the Hydra schema, the pre-launch check, the study sweeps."""
