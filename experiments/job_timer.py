"""A Hydra callback that records, inside each job of a sweep, where the job's time goes.

Added on a sweep's command line, it leaves the library unchanged: in each job's process it
wraps a few library functions with timers (HOOKS) and listens to JAX's compilation events.
    +hydra.callbacks.job_timer._target_=experiments.job_timer.JobTimer
    +hydra.callbacks.job_timer.out_dir=DIR
Each job writes DIR/job_<num>.json, the sweep's main process DIR/sweep.json
(resnet_flax.bench.breakdown reads them).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

# Library functions whose calls are timed as a phase: (module, class or None, name, phase).
HOOKS = (
    ("resnet_flax.training.loop", None, "open_data", "data"),
    ("resnet_flax.training.loop", None, "set_up", "set_up"),
    ("resnet_flax.training.seeds", "SeedGroup", "restore", "checkpoint"),
    ("resnet_flax.training.seeds", "SeedGroup", "open_records", "records"),
    ("resnet_flax.training.loop", None, "timed_chunk", "train"),
    ("resnet_flax.training.loop", None, "evaluate_all", "eval"),
    ("resnet_flax.training.seeds", "SeedGroup", "log_train", "records"),
    ("resnet_flax.training.seeds", "SeedGroup", "log_eval", "records"),
    ("resnet_flax.training.seeds", "SeedGroup", "save", "checkpoint"),
    ("resnet_flax.training.seeds", "SeedGroup", "close_checkpoints", "checkpoint"),
    ("resnet_flax.training.seeds", "SeedGroup", "finish", "summary"),
)
# The summary.json fields a job record keeps.
SUMMARY_FIELDS = (
    "model",
    "depth",
    "status",
    "final_train_error",
    "final_test_error",
    "compile_time_s",
    "wall_time_s",
    "images_per_sec",
)

_job: dict | None = None  # the record of the job running in this process
_process: dict = {"hooked": False, "last_end": None}


def process_start_time() -> float | None:
    """When this process started (epoch seconds), where psutil can tell."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().create_time()


def timed_phase(phase: str, fn: Callable) -> Callable:
    """`fn` recording each call's start and end under `phase` in the running job's record."""

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            if _job is not None:
                _job["phases"].append((phase, start, time.time()))

    timed.timed_phase = phase
    return timed


def install_hooks() -> list[str]:
    """Wrap every HOOKS function (once per process); the names no longer in the library."""
    missing = []
    for module_name, owner, name, phase in HOOKS:
        target: Any = importlib.import_module(module_name)
        if owner is not None:
            target = getattr(target, owner, None)
        fn = getattr(target, name, None)
        if fn is None:
            missing.append(f"{module_name}.{owner + '.' if owner else ''}{name}")
        elif not hasattr(fn, "timed_phase"):
            setattr(target, name, timed_phase(phase, fn))
    return missing


def _on_span(event: str, start: float, end: float, **kwargs) -> None:
    """JAX's time spans (tracing, lowering, backend compilation) of the running job."""
    if _job is not None:
        _job["spans"].append((event, start, end, str(kwargs.get("fun_name", ""))))


def _on_event(event: str, **kwargs) -> None:
    """JAX's compilation-cache events (hits, misses) of the running job, with their time."""
    if _job is not None and event.startswith("/jax/compilation_cache/"):
        _job["events"].append((event, time.time()))


def listen_to_jax() -> None:
    """Register the listeners once per process."""
    if _process["hooked"]:
        return
    import jax.monitoring

    jax.monitoring.register_event_time_span_listener(_on_span)
    jax.monitoring.register_event_listener(_on_event)
    _process["hooked"] = True


class JobTimer(Callback):
    """Writes each job's phases and compilation spans, and the sweep's start and end."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def _write(self, name: str, record: dict) -> None:
        """One JSON file in out_dir."""
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / name).write_text(json.dumps(record, default=str) + "\n")

    def on_multirun_start(self, config, **kwargs) -> None:
        """The main process is ready to launch the jobs."""
        self._sweep = {"pid": os.getpid(), "process_start": process_start_time()}
        self._sweep["multirun_start"] = time.time()
        self._write("sweep.json", self._sweep)

    def on_multirun_end(self, config, **kwargs) -> None:
        """Every job has returned."""
        self._write("sweep.json", {**self._sweep, "multirun_end": time.time()})

    def on_job_start(self, config, **kwargs) -> None:
        """Hook the library and JAX in this process and open the job's record."""
        global _job
        start = time.time()
        missing = install_hooks()
        listen_to_jax()
        _job = {
            "num": int(config.hydra.job.num),
            "overrides": list(config.hydra.overrides.task),
            "pid": os.getpid(),
            "process_start": process_start_time(),
            "previous_job_end": _process["last_end"],  # a worker reused from an earlier job
            "job_start": start,
            "unhooked": missing,
            "phases": [],
            "spans": [],
            "events": [],
        }

    def on_job_end(self, config, job_return, **kwargs) -> None:
        """Close the job's record and write it."""
        global _job
        end, record, _job = time.time(), _job, None
        if record is None:
            return
        record.update(job_end=end, status=job_return.status.name, summary={})
        # A failed job's return_value raises its exception again: read it only on success.
        if job_return.status.name != "COMPLETED":
            record["error"] = repr(getattr(job_return, "_return_value", None))
        elif isinstance(job_return.return_value, dict):
            record["summary"] = {k: job_return.return_value.get(k) for k in SUMMARY_FIELDS}
        self._write(f"job_{record['num']}.json", record)
        _process["last_end"] = end
