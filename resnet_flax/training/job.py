"""One job of a command or sweep: skip it if done, plan its devices, train it guarded."""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from resnet_flax.rundir import RunStatus, read_summary, seed_run_dirs
from resnet_flax.rundir.identity import DATA_DERIVED, check_run_dir, completed_iterations
from resnet_flax.training.cpu_devices import (
    cpu_device_count,
    jax_backend_started,
    usable_cores,
    use_cpu_devices,
)
from resnet_flax.training.guard import run_guarded, run_here
from resnet_flax.training.loop import train
from resnet_flax.training.run_config import RunConfig
from resnet_flax.training.runtime import enable_compilation_cache, maybe_initialize_distributed

log = logging.getLogger(__name__)

# Keys a run records as it decided them for its backend (a command may leave them "auto").
DECIDED_WHEN_RUN = ("model.block", "model.conv_impl", "model.stage_loop", "trainer.step_loop",
                    "info.cpu_devices", "info.compilation_cache_dir")  # fmt: skip
# Files that only Hydra writes before the job starts; a directory holding nothing else is no run.
HYDRA_ONLY = (".hydra", "train.log")


@dataclass(frozen=True)
class JobPlan:
    """How a job runs: its CPU devices, whether it shares the cores, whether it is guarded."""

    cpu_devices: int
    shares_cores: bool
    guarded: bool


def plan_job(cfg: RunConfig, parallel_jobs: int) -> JobPlan:
    """Split this job's share of the cores into devices (the batch allowing).

    Jobs of a parallel sweep share the cores: each splits only its share and keeps every
    device single-threaded. Collectives between CPU devices of one process can abort it
    (XLA's timeout): such runs train in a child process, so the abort is recorded and a
    sweep goes on.
    """
    cores = max(1, usable_cores() // parallel_jobs)
    count = cpu_device_count(cfg.info.cpu_devices, [cfg.trainer.batch_size], cores)
    return JobPlan(count, parallel_jobs > 1, count > 1 and not jax_backend_started())


def run_job(run_dir: Path, cfg: RunConfig, parallel_jobs: int = 1) -> dict:
    """Train (or resume) the run into run_dir unless it already completed; its summary."""
    finished = completed_summary(run_dir, cfg)
    if finished is not None:
        # A finished run is skipped only for a command that asks for this run.
        allow = cfg.trainer.allow_recipe_change
        check_run_dir(run_dir, cfg.to_dict(), allow, DATA_DERIVED + DECIDED_WHEN_RUN)
        done = completed_iterations(finished)
        log.info("%s already completed %d iterations; skipping", run_dir, done)
        return finished
    plan = plan_job(cfg, parallel_jobs)
    cfg = cfg.replace(info=dataclasses.replace(cfg.info, cpu_devices=plan.cpu_devices))
    job = functools.partial(start_and_train, run_dir, cfg, plan)
    return run_guarded(job, run_dir) if plan.guarded else run_here(job, run_dir)


def start_and_train(run_dir: Path, cfg: RunConfig, plan: JobPlan) -> dict:
    """Set up this process's devices and cache, then train (or resume) the run."""
    use_cpu_devices(plan.cpu_devices, single_threaded=plan.shares_cores)
    enable_compilation_cache(cfg.info.compilation_cache_dir)
    maybe_initialize_distributed()
    return train(run_dir, cfg)


def completed_summary(run_dir: Path, cfg: RunConfig) -> dict | None:
    """The summary of a job that already finished all its iterations (resumed sweeps skip it).

    A job training several seeds together is finished when every seed's run is.
    """
    seeds = [cfg.info.seed + k for k in range(cfg.trainer.vmap_seeds)]
    summaries = []
    for seed_dir in seed_run_dirs(run_dir, seeds):
        summary = read_summary(seed_dir)
        done = summary.get("status") == RunStatus.COMPLETED
        if not (done and int(summary.get("iterations") or 0) >= cfg.trainer.iterations):
            return None
        summaries.append(summary)
    if len(summaries) == 1:
        return summaries[0]
    return {"status": RunStatus.COMPLETED, "runs": summaries}


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


def outcome_line(run_dir: Path, summary: dict) -> str:
    """A job's last log line: its status and each run's final training and test error.

    A seed group's summary holds its seeds' summaries under "runs": each seed is named.
    """
    group = "runs" in summary
    parts = [f"{run_dir}: {summary.get('status')}"]
    for run in summary.get("runs") or [summary]:
        seed = f"seed {run.get('seed')}: {run.get('status')}, " if group else ""
        train, test = (_percent(run.get(f"final_{split}_error")) for split in ("train", "test"))
        parts.append(f"{seed}final training error {train}, test error {test}")
    return "; ".join(parts) if group else ", ".join(parts)


def _percent(error: float | None) -> str:
    """An error (a fraction) in percent; 'none' when the run recorded none."""
    return "none" if error is None else f"{100 * error:.2f}%"
