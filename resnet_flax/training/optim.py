"""The paper's SGD recipe and its alternatives, all counted in iterations.

A recipe is split in two for the compiled step: its structure (which schedule, how many
drops, whether a warm-up exists, ...) shapes the program's code, and its numbers (learning
rate, momentum, weight decay, the schedule's boundaries and factors) enter as arrays, so
runs that differ only in numbers share one compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
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


@dataclass(frozen=True)
class OptimStructure:
    """What of a recipe the compiled step's code depends on; its numbers are hyperparameters."""

    nesterov: bool
    decay_all: bool
    schedule: str
    num_boundaries: int  # distinct multistep drops
    linear_warmup: bool
    warmup: bool  # a warm-up lr (warmup_lr) before the schedule
    warmup_on_error: bool  # ... held until the training error drops below a threshold

    @classmethod
    def of(cls, cfg: OptimConfig) -> OptimStructure:
        """The structure of a config."""
        return cls(
            nesterov=cfg.nesterov,
            decay_all=cfg.decay_all,
            schedule=cfg.schedule,
            num_boundaries=len(set(cfg.boundaries)) if cfg.schedule == "multistep" else 0,
            linear_warmup=cfg.linear_warmup_iterations > 0,
            warmup=cfg.warmup_lr is not None,
            warmup_on_error=cfg.warmup_lr is not None and cfg.warmup_until_error is not None,
        )


def hyperparameters(cfg: OptimConfig, total_iterations: int) -> dict[str, np.ndarray]:
    """The recipe's numbers as host arrays: float32 rates and factors, int32 iterations.

    Every key is always there (unused ones are 0), so the program's arguments have one
    structure; `total_iterations` is where a cosine schedule reaches 0.
    """
    warm = max(cfg.linear_warmup_iterations, 0)
    cosine_steps = max(total_iterations, warm + 1) - warm
    floats = {
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "decay_factor": cfg.decay_factor,
        "warmup_lr": cfg.warmup_lr or 0.0,
        "warmup_until_error": cfg.warmup_until_error or 0.0,
        # optax's cosine decays over the iterations after the linear warm-up, counted as floats.
        "cosine_steps": cosine_steps,
        # XLA compiles optax's division by a constant length as a product with its float32
        # reciprocal (and folds pi into it): the same products keep the values to the bit.
        "cosine_phase": np.float32(np.pi) * (np.float32(1) / np.float32(cosine_steps)),
        "linear_warmup_reciprocal": np.float32(1) / np.float32(max(warm, 1)),
    }
    ints = {
        "boundaries": sorted(set(cfg.boundaries)) if cfg.schedule == "multistep" else [],
        "linear_warmup_iterations": warm,
        "warmup_iterations": cfg.warmup_iterations,
    }
    return {
        **{k: np.asarray(v, np.float32) for k, v in floats.items()},
        **{k: np.asarray(v, np.int32) for k, v in ints.items()},
    }


# optax's schedule factories take their boundaries and lengths as Python numbers (they
# branch on them), so the three below are written over arrays with optax's own formulas,
# operation for operation: the float32 values of optax's schedules compiled by XLA (a
# test compares them bit for bit).


def _linear_warmup(hp: Mapping, step: jax.Array) -> jax.Array:
    """optax.linear_schedule(0, lr, linear_warmup_iterations) at `step`."""
    init_value, end_value, power = 0.0, hp["lr"], 1
    count = jnp.clip(step, 0, hp["linear_warmup_iterations"])
    frac = 1 - count * hp["linear_warmup_reciprocal"]
    return (init_value - end_value) * (frac**power) + end_value


def _multistep(hp: Mapping, step: jax.Array, num_boundaries: int) -> jax.Array:
    """optax.piecewise_constant_schedule(lr, {b: decay_factor}) at `step`."""
    v = hp["lr"]
    for i in range(num_boundaries):
        indicator = jnp.maximum(0.0, jnp.sign(hp["boundaries"][i] - step))
        v = v * indicator + (1 - indicator) * hp["decay_factor"] * v
    return v


def _cosine(hp: Mapping, count: jax.Array) -> jax.Array:
    """optax.cosine_decay_schedule(lr, cosine_steps) at `count` (its alpha 0, exponent 1)."""
    alpha, exponent = 0.0, 1.0
    count = jnp.minimum(count, hp["cosine_steps"])
    cosine_decay = 0.5 * (1 + jnp.cos(count * hp["cosine_phase"]))
    decayed = (1 - alpha) * cosine_decay**exponent + alpha
    return hp["lr"] * decayed


def base_lr(structure: OptimStructure, hp: Mapping, step: jax.Array) -> jax.Array:
    """The schedule's learning rate at `step` (before any warmup_lr), from array numbers."""
    warm = hp["linear_warmup_iterations"]
    if structure.schedule == "cosine":
        # optax.join_schedules hands the cosine the count since the warm-up's end.
        schedule = _cosine(hp, step - warm)
    elif structure.schedule == "constant":
        schedule = hp["lr"]
    else:  # the drops stay at the configured iterations, warm-up or not
        schedule = _multistep(hp, step, structure.num_boundaries)
    if not structure.linear_warmup:
        return schedule
    return jnp.where(step < warm, _linear_warmup(hp, step), schedule)


def make_schedule(cfg: OptimConfig, total_iterations: int) -> optax.Schedule:
    """The base learning-rate schedule of a config as a function of the iteration."""
    return functools.partial(
        base_lr, OptimStructure.of(cfg), hyperparameters(cfg, total_iterations)
    )


def learning_rate(
    structure: OptimStructure, hp: Mapping, step: jax.Array, warm_done: jax.Array
) -> jax.Array:
    """The learning rate at a step, applying the error-triggered or fixed warm-up."""
    lr = base_lr(structure, hp, step)
    if not structure.warmup:
        return lr
    in_warmup = step < hp["warmup_iterations"]
    if structure.warmup_on_error:
        in_warmup = in_warmup | ~warm_done
    return jnp.where(in_warmup, hp["warmup_lr"], lr)


def weight_decay_mask(params) -> object:
    """True for conv and dense kernels: the paper's weight decay applies to weights."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "kernel" in jax.tree_util.keystr(path), params
    )


def sgd(structure: OptimStructure, momentum, weight_decay) -> optax.GradientTransformation:
    """Coupled L2 decay then momentum, as PyTorch's SGD; the caller scales by the lr.

    The numbers may be traced arrays: the step builds this from its hyperparameters, as
    optax.inject_hyperparams does, with the optimizer state's layout unchanged.
    """
    mask = None if structure.decay_all else weight_decay_mask
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        optax.trace(decay=momentum, nesterov=structure.nesterov),
    )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The recipe's optimizer with the config's numbers (initial states, restore templates)."""
    return sgd(OptimStructure.of(cfg), cfg.momentum, cfg.weight_decay)


def zero_state(tx: optax.GradientTransformation, params) -> object:
    """tx.init(params) for an optimizer whose state starts at zeros (SGD's momentum trace).

    Made on the host: on the device, every parameter shape compiled its own program of zeros.
    """
    shapes = jax.eval_shape(tx.init, params)
    return jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)), shapes)


def apply_lr(updates, lr: jax.Array) -> object:
    """Scale momentum updates by -lr (kept outside the optimizer so the lr can depend on state)."""
    return jax.tree.map(lambda u: -lr * u, updates)
