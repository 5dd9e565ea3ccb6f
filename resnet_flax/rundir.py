"""The run-directory contract: its file names, the run statuses, one writer and one reader."""

from __future__ import annotations

import json
import math
import os
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: _finite(v) for k, v in content.items()}, indent=2) + "\n")
    os.replace(tmp, path)


def mark_unfinished_failed(run_dir: Path, message: str) -> list[Path]:
    """Set status failed with `message` in every summary under run_dir still running."""
    marked = []
    for path in sorted(Path(run_dir).glob(f"**/{SUMMARY_FILE}")):
        summary = read_summary(path.parent)
        if summary.get("status") != RunStatus.RUNNING:
            continue
        write_json(path, {**summary, "status": RunStatus.FAILED, "message": message})
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
    """JSON has no NaN: non-finite floats are written as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


class RunRecorder:
    """Appends metric lines to metrics.jsonl and TensorBoard; rewrites summary.json."""

    def __init__(self, run_dir: Path, resume_from: int, write: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        # Lines past the checkpoint we resume from will be produced again: drop them.
        kept = [m for m in read_metrics(self.metrics_path) if m["iteration"] <= resume_from]
        self.history = kept
        # In a multi-host job every process keeps the history, one (process 0) writes files.
        self.write = write
        if not write:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, self.metrics_path)
        self._file = self.metrics_path.open("a")
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
