"""Training settings and their checks: the trainer config, run identity, loop choice."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class ConfigError(ValueError):
    """An impossible training configuration; the message says what is valid."""


# The trainer's xla_cpu_preset choices and the XLA option value each stands for.
CPU_PRESETS = {
    "default": None,
    "fast_compile": "CPU_OPT_PRESET_FAST_COMPILE",
    "fast_runtime": "CPU_OPT_PRESET_FAST_RUNTIME",
}
STEP_LOOPS = ("auto", "scan", "python")


@dataclass(frozen=True)
class TrainerConfig:
    """How long to train and how often to log, evaluate and checkpoint (all in iterations).

    The defaults are He et al. 2015's CIFAR-10 length and batch: 64k iterations (about 164
    epochs of 50k images) at batch 128, 64 test-error points per curve as dense as Fig. 6.
    """

    iterations: int = 64_000
    batch_size: int = 128  # global batch, split over all devices (and hosts)
    log_every: int = 100  # one metrics.jsonl train line (running mean) per interval
    eval_every: int = 1_000  # test (and val) error; a multiple of log_every
    checkpoint_every: int = 2_000  # a rerun resumes from the newest complete checkpoint
    keep_checkpoints: int = 3
    eval_batch_size: int = 1_000  # rounded to the devices and the smallest split when run
    progress: bool = True  # tqdm bar on stderr
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

    def __post_init__(self) -> None:
        check_trainer(self)

    def for_backend(self, backend: str) -> TrainerConfig:
        """The config with step_loop "auto" decided for a JAX backend."""
        if self.step_loop != "auto":
            return self
        return dataclasses.replace(self, step_loop="python" if backend == "cpu" else "scan")


@dataclass(frozen=True)
class RunInfo:
    """What names a run and where it runs: the command's keys that are neither net nor recipe."""

    experiment_name: str = "default"  # names the results directory; every preset sets its own
    seed: int = 0  # parameter init, data order and augmentation
    # A trained run directory of a shallower net: this run starts from that net with identity
    # blocks added (He et al. 2015's construction, resnet_flax.models.construct).
    init_from: str | None = None
    # XLA devices a CPU-only host is split into: "auto" or a count (a run records the count).
    cpu_devices: int | str = "auto"
    compilation_cache_dir: str | None = ".jax_cache"  # relative to the repository; null: none
    results_dir: str = "results"  # where run and sweep directories go, relative to the cwd

    def __post_init__(self) -> None:
        ok = self.cpu_devices == "auto" or (
            isinstance(self.cpu_devices, int) and not isinstance(self.cpu_devices, bool)
        )
        if not ok or (self.cpu_devices != "auto" and self.cpu_devices < 1):
            raise ConfigError(
                f"cpu_devices must be 'auto' or a positive integer; got {self.cpu_devices!r}"
            )


def check_trainer(cfg: TrainerConfig) -> None:
    """Fail before any compile when intervals or choices cannot work."""
    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.log_every < 1:
        raise ConfigError(
            "trainer.iterations, trainer.batch_size and trainer.log_every must be positive; "
            f"got {cfg.iterations}, {cfg.batch_size} and {cfg.log_every}"
        )
    if cfg.vmap_seeds < 1 or cfg.device_prefetch < 1 or cfg.keep_checkpoints < 1:
        raise ConfigError(
            f"trainer.vmap_seeds, trainer.device_prefetch and trainer.keep_checkpoints must be "
            f"at least 1; got {cfg.vmap_seeds}, {cfg.device_prefetch} and {cfg.keep_checkpoints}"
        )
    for name in ("eval_every", "checkpoint_every"):
        value = getattr(cfg, name)
        if value < 1 or value % cfg.log_every:
            raise ConfigError(
                f"trainer.{name} must be a positive multiple of trainer.log_every "
                f"({cfg.log_every}); got {value}"
            )
    if cfg.step_loop not in STEP_LOOPS:
        raise ConfigError(
            f"trainer.step_loop must be one of {', '.join(STEP_LOOPS)}; got {cfg.step_loop!r}"
        )
    if cfg.xla_cpu_preset not in CPU_PRESETS:
        raise ConfigError(
            f"trainer.xla_cpu_preset must be one of {', '.join(CPU_PRESETS)}; "
            f"got {cfg.xla_cpu_preset!r}"
        )


def check_devices(cfg: TrainerConfig, num_devices: int) -> None:
    """Fail before any compile when the batch cannot be split over the devices."""
    if cfg.batch_size % num_devices:
        raise ConfigError(
            f"trainer.batch_size {cfg.batch_size} must be divisible by the {num_devices} devices"
        )


def compiler_options(cfg: TrainerConfig, backend: str) -> dict[str, str]:
    """XLA options for the run's programs: the CPU preset, on CPU only (others ignore it)."""
    preset = CPU_PRESETS[cfg.xla_cpu_preset]
    if preset is None or backend != "cpu":
        return {}
    return {"xla_cpu_opt_preset": preset}
