"""Hydra callbacks of experiments.train: a run directory's .hydra/ and a sweep's outcome.

Registered in conf/config.yaml. Hydra writes each job's config to .hydra_pending/ (its
output_subdir); it becomes the job's .hydra/ when the directory holds no run yet or the
command trains there, so a rejected or skipped command leaves a run's .hydra/ as it was.
Every job's configuration is checked before any starts (experiments.cli.preflight); a job
that fails when it runs is recorded in failed_jobs.jsonl, the other jobs run, and the sweep
exits with status 1 when any failed.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from resnet_flax.rundir import (
    FAILED_JOBS_FILE,
    HYDRA_CONFIG_FILE,
    RUN_CONFIG_FILE,
    read_failed_jobs,
)

log = logging.getLogger(__name__)

PENDING = ".hydra_pending"
HYDRA_DIR = str(Path(HYDRA_CONFIG_FILE).parent)


class RunRecords(Callback):
    """Keeps .hydra/ true to the run; checks a sweep's jobs first; sets a sweep's exit status."""

    def __init__(self) -> None:
        self._pending: dict[str, bytes] | None = None
        self._started = 0.0

    # --- one run ------------------------------------------------------------------------------
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse, in one line, a run directory this process cannot write."""
        refuse_unwritable(Path(str(config.hydra.run.dir)))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A new run directory gets .hydra/ now; an existing run's waits for the job's end."""
        run_dir = Path(str(config.hydra.runtime.output_dir))
        pending, final = run_dir / PENDING, run_dir / HYDRA_DIR
        self._started = time.time()
        self._pending = None
        if not pending.is_dir():
            return
        if not (final / "config.yaml").is_file():
            shutil.rmtree(final, ignore_errors=True)
            pending.rename(final)
            return
        self._pending = {p.name: p.read_bytes() for p in pending.iterdir() if p.is_file()}
        shutil.rmtree(pending, ignore_errors=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Replace an existing run's .hydra/ only when this command trained there."""
        run_dir = Path(str(config.hydra.runtime.output_dir))
        if self._pending is None or not trained_since(run_dir, self._started):
            return
        final = run_dir / HYDRA_DIR
        final.mkdir(parents=True, exist_ok=True)
        for name, content in self._pending.items():
            (final / name).write_bytes(content)
        self._pending = None

    # --- a sweep ------------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse a read-only sweep directory; forget an earlier sweep's failed jobs."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        refuse_unwritable(sweep_dir)
        (sweep_dir / FAILED_JOBS_FILE).unlink(missing_ok=True)  # this sweep's failures only

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Exit with status 1 when a job of the sweep failed (failed_jobs.jsonl names them)."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = read_failed_jobs(sweep_dir)
        if failed:
            print(
                f"error: {len(failed)} job(s) of the sweep failed: "
                f"{', '.join(f['job'] for f in failed)} ({sweep_dir / FAILED_JOBS_FILE})",
                file=sys.stderr,
            )
            sys.exit(1)


def refuse_unwritable(directory: Path) -> None:
    """Exit with one error line when `directory` (or the parent it would go in) is read-only."""
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        print(
            f"error: {existing} is not writable (read-only file system or permissions): "
            "choose another hydra.run.dir (or hydra.sweep.dir)",
            file=sys.stderr,
        )
        sys.exit(2)


def trained_since(run_dir: Path, started: float) -> bool:
    """Whether a run in run_dir (or a seed's, in a group) was (re)started after `started`."""
    configs = [run_dir / RUN_CONFIG_FILE, *run_dir.glob(f"seed_*/{RUN_CONFIG_FILE}")]
    return any(p.is_file() and p.stat().st_mtime >= started for p in configs)
