"""Turn the Hydra config of experiments.train into the library's dataclasses, and job plumbing."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments.architecture import architecture_fields
from resnet_flax.data.config import STREAMED, DataConfig
from resnet_flax.models.spec import ModelSpec, check_bn_batch, resolve
from resnet_flax.rundir import RunStatus, read_summary
from resnet_flax.training.config import ConfigError, RunInfo, TrainerConfig
from resnet_flax.training.cpu_devices import usable_cores
from resnet_flax.training.optim import SCHEDULES, OptimConfig
from resnet_flax.training.seeds import seed_run_dirs

REPO_ROOT = Path(__file__).resolve().parent.parent
# Files that only Hydra writes before the job starts; a directory holding nothing else is no run.
HYDRA_ONLY = (".hydra", "train.log")

# The GPU lock this process holds for its lifetime (multi_gpu launcher); the OS frees it on exit.
_gpu_lock: tuple[int, int] | None = None


def gpu_count() -> int:
    """GPUs this process may use, counted without initialising JAX (0 on a CPU-only host)."""
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def visible_gpu_count() -> int:
    """GPUs this process may use, at least 1 (the multi_gpu launcher's job count)."""
    return max(1, gpu_count())


def cpu_sweep_jobs() -> int:
    """Jobs a CPU sweep runs at once: one per usable core; 1 where a GPU would be shared."""
    return 1 if gpu_count() else usable_cores()


def epochs_to_iterations(epochs: float, dataset: str, batch_size: int) -> int:
    """Iterations in `epochs` passes over a streamed dataset's training split.

    The in-memory sets are counted in iterations, as the paper's CIFAR recipe is.
    """
    if dataset not in STREAMED:
        raise ConfigError(
            f"epoch-based recipes know the sizes of {', '.join(STREAMED)}; got {dataset!r}: "
            "set trainer.iterations and optim.linear_warmup_iterations directly"
        )
    return max(1, round(float(epochs) * STREAMED[dataset].train_images / int(batch_size)))


def linear_scaled_lr(base_lr: float, batch_size: int) -> float:
    """Goyal et al.'s linear scaling rule: base_lr per 256 images of the global batch."""
    return float(base_lr) * int(batch_size) / 256


def register_resolvers() -> None:
    """Resolvers the config tree uses (idempotent); must run before Hydra composes."""
    resolvers = {
        "visible_gpu_count": visible_gpu_count,
        "cpu_sweep_jobs": cpu_sweep_jobs,
        "epochs_to_iterations": epochs_to_iterations,
        "linear_scaled_lr": linear_scaled_lr,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed `conf/config.yaml` with `overrides`, Hydra's own node included."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides, return_hydra_config=True)


def _container(node: DictConfig) -> dict:
    """A resolved plain dict of one config node."""
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def to_library(
    cfg: DictConfig,
) -> tuple[ModelSpec, DataConfig, OptimConfig, TrainerConfig, RunInfo]:
    """Map a composed config onto (ModelSpec, DataConfig, OptimConfig, TrainerConfig, RunInfo).

    The spec is validated with resolve() here, so an impossible model fails (SpecError) before
    any data is loaded or anything compiles; an unknown schedule raises ConfigError.
    """
    spec = ModelSpec(
        **architecture_fields(cfg),
        zero_init_residual=bool(cfg.zero_init_residual),
        remat=bool(cfg.remat),
        dtype=cfg.precision,
        conv_impl=cfg.conv_impl,
        stage_loop=cfg.stage_loop,
        bn_batch=cfg.bn_batch,
    )
    resolve(spec)
    data_cfg = DataConfig.from_dict(_container(cfg.dataset))
    optim = OptimConfig.from_dict(_container(cfg.optim))
    if optim.schedule not in SCHEDULES:
        raise ConfigError(
            f"optim.schedule must be one of {', '.join(SCHEDULES)}; got {optim.schedule!r}"
        )
    trainer = TrainerConfig(**_container(cfg.trainer))
    check_bn_batch(spec.bn_batch, trainer.batch_size)
    init_from = cfg.get("init_from")
    info = RunInfo(
        experiment=str(cfg.experiment_name),
        seed=int(cfg.seed),
        init_from=None if init_from is None else str(init_from),
    )
    return spec, data_cfg, optim, trainer, info


def compilation_cache_dir(cfg: DictConfig) -> str | None:
    """The persistent compilation cache directory (relative paths from the repo root)."""
    path = cfg.get("compilation_cache_dir")
    if not path:
        return None
    path = Path(str(path)).expanduser()
    return str(path if path.is_absolute() else REPO_ROOT / path)


def parallel_jobs(hydra_config) -> int:
    """How many jobs of this sweep run at once (n_jobs of a joblib launcher; else 1)."""
    if hydra_config.mode != RunMode.MULTIRUN:
        return 1
    n_jobs = OmegaConf.select(hydra_config.launcher, "n_jobs", default=None)
    return max(1, int(n_jobs)) if n_jobs is not None else 1


def pin_gpu(job_num: int, lock_dir: Path) -> int | None:
    """Make this process see one GPU: prefer job_num % GPUs, skip GPUs other workers hold.

    Must run before JAX initialises its backend. A worker process that already holds a GPU
    (joblib reuses workers) keeps it. Returns the physical GPU index, or None without GPUs.
    """
    global _gpu_lock
    if _gpu_lock is not None:
        return _gpu_lock[0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    count = len(ids) if ids else visible_gpu_count()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    lock_dir.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        index = (job_num + k) % count
        fd = os.open(lock_dir / f"gpu{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _gpu_lock = (index, fd)
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if ids else str(index)
        return index
    # More workers than GPUs (n_jobs raised by hand): share, as job_num % count says.
    index = job_num % count
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if ids else str(index)
    return index


def completed_summary(run_dir: Path, trainer: TrainerConfig, seed: int) -> dict | None:
    """The summary of a job that already finished all its iterations (resumed sweeps skip it).

    A job training several seeds together is finished when every seed's run is.
    """
    summaries = []
    for seed_dir in seed_run_dirs(run_dir, [seed + k for k in range(trainer.vmap_seeds)]):
        summary = read_summary(seed_dir)
        done = summary.get("status") == RunStatus.COMPLETED
        if not (done and int(summary.get("iterations") or 0) >= trainer.iterations):
            return None
        summaries.append(summary)
    return (
        summaries[0] if len(summaries) == 1 else {"status": RunStatus.COMPLETED, "runs": summaries}
    )


def remove_if_empty(run_dir: Path) -> None:
    """Delete a run directory that holds only what Hydra wrote (a job rejected before training)."""
    if not run_dir.is_dir():
        return
    if any(p.name not in HYDRA_ONLY for p in run_dir.iterdir()):
        return
    for name in HYDRA_ONLY:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    run_dir.rmdir()
