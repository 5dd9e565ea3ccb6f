"""The paper's SGD recipe and its alternatives, all counted in iterations with optax schedules."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from resnet_flax.training.config import ConfigError

SCHEDULES = ("multistep", "cosine", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum, L2 weight decay on weights, and a learning-rate schedule."""

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_all: bool = False  # also decay BatchNorm scales/shifts and biases
    schedule: str = "multistep"
    boundaries: tuple[int, ...] = (32_000, 48_000)
    decay_factor: float = 0.1
    linear_warmup_iterations: int = 0  # ramp from 0 to lr first (cosine / multistep)
    # He et al. 2015's ResNet-110 warm-up: a small lr until training error drops below a
    # threshold (or for a fixed number of iterations), then the schedule.
    warmup_lr: float | None = None
    warmup_until_error: float | None = None
    warmup_iterations: int = 0

    def __post_init__(self) -> None:
        # A list from YAML or JSON is the same recipe as a tuple: store one form.
        object.__setattr__(self, "boundaries", tuple(int(b) for b in self.boundaries or ()))
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"optim.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}"
            )


def make_schedule(cfg: OptimConfig, total_iterations: int) -> optax.Schedule:
    """The base learning-rate schedule as an optax schedule of the iteration."""
    warm = cfg.linear_warmup_iterations
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, warm, max(total_iterations, warm + 1), end_value=0.0
        )
    if cfg.schedule == "constant":
        base = optax.constant_schedule(cfg.lr)
    else:
        # join_schedules restarts the count at the warm-up's end: shift the drops so they
        # still happen at the configured iterations.
        base = optax.piecewise_constant_schedule(
            cfg.lr, {int(b) - max(warm, 0): cfg.decay_factor for b in cfg.boundaries}
        )
    if warm <= 0:
        return base
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), base], [warm])


def learning_rate(
    cfg: OptimConfig, schedule: optax.Schedule, step: jax.Array, warm_done: jax.Array
) -> jax.Array:
    """The learning rate at a step, applying the error-triggered or fixed warm-up."""
    lr = schedule(step)
    if cfg.warmup_lr is None:
        return lr
    in_warmup = step < cfg.warmup_iterations
    if cfg.warmup_until_error is not None:
        in_warmup = in_warmup | ~warm_done
    return jnp.where(in_warmup, cfg.warmup_lr, lr)


def weight_decay_mask(params) -> object:
    """True for conv and dense kernels: the paper's weight decay applies to weights."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "kernel" in jax.tree_util.keystr(path), params
    )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Coupled L2 decay then momentum, as PyTorch's SGD; the caller scales by the lr."""
    mask = None if cfg.decay_all else weight_decay_mask
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask),
        optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov),
    )


def apply_lr(updates, lr: jax.Array) -> object:
    """Scale momentum updates by -lr (kept outside the optimizer so the lr can depend on state)."""
    return jax.tree.map(lambda u: -lr * u, updates)
