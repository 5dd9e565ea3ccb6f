"""Training settings and their checks: the trainer config, run identity, loop choice."""

from __future__ import annotations

from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class TrainerConfig:
    """How long to train and how often to log, evaluate and checkpoint (all in iterations)."""

    iterations: int = 64_000
    batch_size: int = 128
    log_every: int = 100
    eval_every: int = 2_000
    checkpoint_every: int = 2_000
    keep_checkpoints: int = 3
    eval_batch_size: int = 1_000
    progress: bool = True
    # How a chunk of steps runs: one lax.scan ("scan"), or a Python loop over a compiled step
    # ("python"). "auto" picks python on CPU, where a loop saves no dispatch worth another
    # program to compile per chunk length (docs/performance.md), and scan elsewhere.
    step_loop: str = "auto"
    # XLA:CPU's optimisation preset for the train and evaluation programs (CPU_PRESETS):
    # fast_compile pays off for short runs of deep nets on small images (docs/performance.md).
    xla_cpu_preset: str = "default"
    # Seeds seed .. seed+vmap_seeds-1 trained as ONE compiled program (vmap over seeds), each
    # into run_dir/seed_<s>: small models leave a GPU idle, several seeds fill it.
    vmap_seeds: int = 1
    # Batches copied to the devices ahead of the running step (streaming datasets).
    device_prefetch: int = 2
    # Let a resumed run continue with another recipe (optim.*, augmentation): the change is
    # recorded, dated, in the run directory's recipe_changes.jsonl (resnet_flax.rundir).
    allow_recipe_change: bool = False


@dataclass(frozen=True)
class RunInfo:
    """Identifying fields copied into summary.json so analysis can group runs."""

    experiment: str = "default"
    seed: int = 0
    # A trained run directory of a shallower net: this run starts from that net with identity
    # blocks added (He et al. 2015's construction, resnet_flax.models.construct).
    init_from: str | None = None


# The trainer's xla_cpu_preset choices and the XLA option value each stands for.
CPU_PRESETS = {
    "default": None,
    "fast_compile": "CPU_OPT_PRESET_FAST_COMPILE",
    "fast_runtime": "CPU_OPT_PRESET_FAST_RUNTIME",
}


class ConfigError(ValueError):
    """An impossible training configuration; the message says what is valid."""


def check_trainer(cfg: TrainerConfig, num_devices: int) -> None:
    """Fail before any compile when intervals or batch sizes cannot work."""
    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.log_every < 1:
        raise ConfigError("iterations, batch_size and log_every must be positive")
    if cfg.vmap_seeds < 1 or cfg.device_prefetch < 1:
        raise ConfigError(
            f"trainer.vmap_seeds and trainer.device_prefetch must be at least 1; "
            f"got {cfg.vmap_seeds} and {cfg.device_prefetch}"
        )
    for name in ("eval_every", "checkpoint_every"):
        value = getattr(cfg, name)
        if value < 1 or value % cfg.log_every:
            raise ConfigError(
                f"trainer.{name} must be a positive multiple of trainer.log_every "
                f"({cfg.log_every}); got {value}"
            )
    resolve_loop(cfg.step_loop)
    if cfg.xla_cpu_preset not in CPU_PRESETS:
        raise ConfigError(
            f"trainer.xla_cpu_preset must be one of {', '.join(CPU_PRESETS)}; "
            f"got {cfg.xla_cpu_preset!r}"
        )
    if cfg.batch_size % num_devices:
        raise ConfigError(
            f"trainer.batch_size {cfg.batch_size} must be divisible by the {num_devices} devices"
        )


def resolve_loop(choice: str) -> str:
    """'scan' or 'python' for a step_loop / stage loop choice of 'auto', 'scan' or 'python'."""
    if choice not in ("auto", "scan", "python"):
        raise ConfigError(f"step_loop must be one of auto, scan, python; got {choice!r}")
    if choice == "auto":
        return "python" if jax.default_backend() == "cpu" else "scan"
    return choice


def compiler_options(cfg: TrainerConfig) -> dict[str, str]:
    """XLA options for the run's programs: the CPU preset, on CPU only (others ignore it)."""
    preset = CPU_PRESETS[cfg.xla_cpu_preset]
    if preset is None or jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_opt_preset": preset}
