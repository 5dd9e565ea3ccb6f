"""The run-directory records: their file names, the run statuses, one writer and one reader."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import subprocess
import sys
import time
import types
import warnings
from enum import StrEnum
from importlib import metadata
from pathlib import Path

# TensorBoard's writer would import all of TensorFlow (seconds, log noise) to write a file;
# this module name is TensorBoard's own switch to its built-in TF-free stub.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: E402
from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: E402

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RUN_CONFIG_FILE = "run_config.json"
ANALYSIS_FILE = "analysis.json"
HYDRA_CONFIG_FILE = os.path.join(".hydra", "config.yaml")
CHECKPOINT_DIR = "checkpoints"
# Written by a run constructed from a shallower trained run (init_from), before its first step.
CONSTRUCTION_FILE = "construction.json"
# Written by a job that trains several seeds as one program: the runs are its seed_<s>
# subdirectories, and the job directory itself is not a run.
SEED_GROUP_MARKER = "seed_group.json"
# In a sweep directory: one line per job that failed without a run of its own to say so
# (rejected configuration, dead trainer), with its one-line reason.
FAILED_JOBS_FILE = "failed_jobs.jsonl"
# Dated recipe changes a resumed run accepted (trainer.allow_recipe_change), one JSON line each.
RECIPE_CHANGES_FILE = "recipe_changes.jsonl"


def seed_run_dirs(run_dir: Path, seeds: list[int]) -> list[Path]:
    """Where each seed writes: run_dir itself, or run_dir/seed_<s> when seeds train together."""
    if len(seeds) == 1:
        return [Path(run_dir)]
    return [Path(run_dir) / f"seed_{s}" for s in seeds]


class RunDirError(ValueError):
    """A run directory that this command may not use as asked; the message says what to do."""


class RunDirUnwritable(RunDirError):
    """The run's files could not be written: a full disk, a read-only directory."""


# The OS errors that mean a directory cannot take the run's files, and how libraries that
# wrap them (Orbax, TensorStore) spell them.
UNWRITABLE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)
UNWRITABLE_TEXTS = tuple(os.strerror(code) for code in UNWRITABLE_ERRNOS)


def write_failure(err: BaseException | None) -> str | None:
    """The OS's words when `err`, or an exception it chains, failed to write a file for a
    full disk, a read-only directory or missing permissions; None for any other error."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in UNWRITABLE_ERRNOS:
            return os.strerror(err.errno)
        found = [text for text in UNWRITABLE_TEXTS if text in str(err)]
        if found:
            return found[0]
        err = err.__cause__ or err.__context__
    return None


def unwritable_message(run_dir: Path, why: str) -> str:
    """One line: the run's files could not be written, and what to do."""
    return (
        f"{run_dir}: cannot write the run's files ({why}): free space or make the directory "
        "writable (or choose another hydra.run.dir), then rerun to resume from its last "
        "checkpoint"
    )


class RunStatus(StrEnum):
    """A run's status in summary.json (INCOMPLETE: no summary and no recent writes)."""

    RUNNING = "running"
    INTERRUPTED = "interrupted"  # stopped on a signal after a checkpoint; a rerun resumes it
    COMPLETED = "completed"
    DIVERGED = "diverged"
    FAILED = "failed"
    INCOMPLETE = "incomplete"


def read_json(path: Path, warn: bool = False) -> dict:
    """A JSON object file, or {} when it is missing or unreadable (warn: say so if unreadable)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        if warn:
            warnings.warn(f"{path}: unreadable ({error})", stacklevel=2)
        return {}
    return content if isinstance(content, dict) else {}


def read_summary(run_dir: Path, warn: bool = False) -> dict:
    """A run's summary.json, or {} when it is missing or unreadable."""
    return read_json(Path(run_dir) / SUMMARY_FILE, warn)


def write_json(path: Path, content: dict) -> None:
    """Atomically replace a JSON file (non-finite floats become null)."""
    text = json.dumps(_finite(content), indent=2, allow_nan=False) + "\n"
    replace_text(Path(path), text)


def replace_text(path: Path, text: str) -> None:
    """Atomically replace a text file through a temporary file of a name no other writer uses.

    On failure (a full disk) the temporary file is removed and the old file stays whole.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def metrics_iterations(run_dir: Path) -> int | None:
    """The last iteration metrics.jsonl reached, or None without a metrics line."""
    its = [m["iteration"] for m in read_metrics(Path(run_dir) / METRICS_FILE) if "iteration" in m]
    return int(max(its)) if its else None


def mark_unfinished_failed(run_dir: Path, message: str) -> list[Path]:
    """Set status failed with `message` in every summary under run_dir still running.

    The iterations recorded are those the metrics reached, which passed the last summary.
    """
    marked = []
    for path in sorted(Path(run_dir).glob(f"**/{SUMMARY_FILE}")):
        summary = read_summary(path.parent)
        if summary.get("status") != RunStatus.RUNNING:
            continue
        reached = metrics_iterations(path.parent)
        iterations = max(int(summary.get("iterations") or 0), reached or 0)
        fields = {"status": RunStatus.FAILED, "message": message, "iterations": iterations}
        write_json(path, {**summary, **fields})
        marked.append(path)
    return marked


VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide the numbers."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The commit of the code that runs (with '+dirty' if it has uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def record_failed_job(sweep_dir: Path, run_dir: Path, message: str) -> dict:
    """Add a failed job of a sweep to its failed_jobs.jsonl; the job's return value."""
    line = {
        "job": Path(run_dir).name,
        "status": RunStatus.FAILED,
        "message": message,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    # One write of a short line in append mode: lines of jobs running at once never mix.
    with (Path(sweep_dir) / FAILED_JOBS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return {"status": RunStatus.FAILED, "message": message}


def read_failed_jobs(sweep_dir: Path) -> list[dict]:
    """The failed jobs a sweep recorded (failed_jobs.jsonl), oldest first."""
    return read_metrics(Path(sweep_dir) / FAILED_JOBS_FILE)


def read_metrics(path: Path, warn: bool = False) -> list[dict]:
    """The JSON-object lines of a metrics file; others (a line torn by a kill) are dropped.

    warn: a UserWarning names each dropped line that is not blank.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = _json_object(raw)
        if line is not None:
            lines.append(line)
        elif warn and raw.strip():
            warnings.warn(f"{path}:{number}: skipping malformed JSON line", stacklevel=2)
    return lines


def _json_object(raw: str) -> dict | None:
    """The JSON object on one line, or None (blank, torn, or not an object)."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _finite(value):
    """JSON has no NaN: non-finite floats, at any depth, are written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value if not isinstance(value, float) or math.isfinite(value) else None


def keep_metrics(path: Path, resume_from: int, write: bool = True) -> list[dict]:
    """The metrics lines a run resumed at `resume_from` keeps; with `write`, the file too.

    Lines past the checkpoint will be produced again, and a run restarted from 0 produces
    every line again: both are dropped, as are lines torn by a kill or without an iteration.
    The lines kept are normally the file's beginning, which is then cut in place (the file
    is never replaced under another handle); otherwise the file is rewritten.
    """
    raw = path.read_bytes() if path.is_file() else b""
    kept, prefix, offset, contiguous = [], 0, 0, True
    for raw_line in raw.splitlines(keepends=True):
        start, offset = offset, offset + len(raw_line)
        line = _json_object(raw_line.decode("utf-8", errors="replace"))
        at = line.get("iteration") if line is not None else None
        whole = raw_line.endswith(b"\n")  # a line a kill cut short has no newline
        if whole and resume_from > 0 and isinstance(at, int | float) and at <= resume_from:
            kept.append(line)
            contiguous = contiguous and prefix == start
            prefix = offset if contiguous else prefix
    if not write or prefix == len(raw):
        return kept
    if contiguous:
        with path.open("r+b") as f:
            f.truncate(prefix)
    else:
        replace_text(path, "".join(json.dumps(m) + "\n" for m in kept))
    return kept


class RunRecorder:
    """Appends metric lines to metrics.jsonl and TensorBoard; rewrites summary.json."""

    def __init__(self, run_dir: Path, resume_from: int, write: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        # In a multi-host job every process keeps the history, one (process 0) writes files.
        self.write = write
        if write:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history = keep_metrics(self.metrics_path, resume_from, write)
        if not write:
            return
        self._file = self.metrics_path.open("a", encoding="utf-8")
        self._events = EventFileWriter(str(self.run_dir))

    def log(self, line: dict) -> None:
        """Record one metrics line (must hold 'iteration' and 'epoch')."""
        line = {k: _finite(v) for k, v in line.items()}
        self.history.append(line)
        if not self.write:
            return
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        values = [
            summary_pb2.Summary.Value(tag=k, simple_value=float(v))
            for k, v in line.items()
            if k != "iteration" and isinstance(v, int | float)
        ]
        self._events.add_event(
            event_pb2.Event(
                wall_time=time.time(),
                step=int(line["iteration"]),
                summary=summary_pb2.Summary(value=values),
            )
        )

    def write_summary(self, summary: dict) -> None:
        """Atomically replace summary.json."""
        if not self.write:
            return
        write_json(self.run_dir / SUMMARY_FILE, summary)

    def close(self) -> None:
        """Flush and close the files."""
        if not self.write:
            return
        self._file.close()
        self._events.close()
