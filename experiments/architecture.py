"""The config keys that choose the network, shared by the train and model_info configs."""

from __future__ import annotations

from omegaconf import DictConfig


def architecture_fields(cfg: DictConfig) -> dict:
    """ModelSpec's architecture fields (the network's shape and conventions) from a config."""
    return {
        "model": cfg.model,
        "depth": cfg.depth,
        "family": cfg.family,
        # YAML reads a bare A/B/C as a string, but be safe with odd overrides.
        "shortcut": str(cfg.shortcut),
        "block": cfg.block,
        "bottleneck_stride": str(cfg.bottleneck_stride),
        "strided_padding": cfg.strided_padding,
        "preact_first_shortcut": cfg.preact_first_shortcut,
        # Cures for degradation other than shortcuts (docs/design.md).
        "norm": cfg.norm,
        "activation": cfg.activation,
        "leaky_relu_slope": float(cfg.leaky_relu_slope),
        "tat_target": float(cfg.tat_target),
        "init": cfg.init,
        "sigma_w2": float(cfg.sigma_w2),
        "sigma_b2": float(cfg.sigma_b2),
        "branch": cfg.branch,
    }
