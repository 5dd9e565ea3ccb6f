"""Load run directories (summary, metrics, Hydra config, analysis) into pandas tables."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from resnet_flax.rundir import (
    ANALYSIS_FILE,
    FAILED_JOBS_FILE,
    HYDRA_CONFIG_FILE,
    METRICS_FILE,
    SEED_GROUP_MARKER,
    SUMMARY_FILE,
    RunStatus,
    read_failed_jobs,
    read_json,
    read_metrics,
    read_summary,
)
from resnet_flax.rundir.owner import owner

# Files whose presence marks a directory as a run directory.
RUN_MARKERS = (SUMMARY_FILE, METRICS_FILE, HYDRA_CONFIG_FILE)
# Directories never searched for runs: outputs of this module's users and bulky run contents.
SKIP_DIRS = {"figures", "checkpoints", "__pycache__", "tensorboard"}
# A run without summary.json whose files changed this recently is considered still running.
RUNNING_WINDOW_S = 15 * 60
# Statuses whose final values are trustworthy; the others are counted but not averaged.
FINISHED = RunStatus.COMPLETED
PARTIAL_STATUSES = (RunStatus.RUNNING, RunStatus.INTERRUPTED, RunStatus.INCOMPLETE)

IDENTITY_FIELDS = ("experiment", "model", "depth", "shortcut", "family", "dataset", "seed")
SUMMARY_FIELDS = (
    "iterations",
    "epochs",
    "final_train_error",
    "final_test_error",
    "best_test_error",
    "final_train_loss",
    "final_test_loss",
    "final_val_error",
    "param_count",
    "wall_time_s",
    "compile_time_s",
    "images_per_sec",
    "device_kind",
    "device_count",
    "git_commit",
    "message",
)
TRAIN_COLUMNS = ("iteration", "epoch", "lr", "train_loss", "train_error", "images_per_sec")
ANALYSIS_COLUMNS = ("name", "index", "response_std", "grad_norm_init", "grad_norm_final")
EVAL_COLUMNS = ("iteration", "epoch", "test_loss", "test_error", "val_loss", "val_error")

# Where each identifying field may live in a resolved config, first match wins; the config
# groups may be flat strings ("model: plain") or nodes ("model: {name: plain, depth: 56}").
CONFIG_PATHS: dict[str, tuple[str, ...]] = {
    "experiment": ("experiment_name", "experiment.name", "experiment"),
    "model": ("model.name", "model.kind", "model"),
    "depth": ("depth", "model.depth"),
    "shortcut": ("shortcut", "model.shortcut"),
    "family": ("family", "model.family"),
    "dataset": ("dataset.name", "dataset"),
    "seed": ("seed", "trainer.seed"),
}
INT_FIELDS = ("depth", "seed", "iterations", "param_count", "device_count")


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Return the run directories at or below the given paths, sorted and without duplicates."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such run or sweep directory: {path}")
        for root, dirs, _files in os.walk(path):
            # Prune in place so os.walk skips figures/, checkpoints/ and hidden dirs (.hydra).
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            if is_run_dir(Path(root)):
                found.add(Path(root).resolve())
    return sorted(found)


def load_failed_jobs(paths: Sequence[str | Path]) -> list[dict]:
    """The jobs that sweeps at or below `paths` recorded as failed (failed_jobs.jsonl)."""
    found = []
    for path in map(Path, paths):
        for record in sorted(path.rglob(FAILED_JOBS_FILE)):
            found += [
                {**job, "sweep_dir": str(record.parent)} for job in read_failed_jobs(record.parent)
            ]
    return found


def is_run_dir(path: Path) -> bool:
    """Whether a directory holds any of the files a training run writes."""
    if (path / SEED_GROUP_MARKER).is_file():
        return False
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """Return metrics.jsonl of a run as a frame sorted by iteration (empty if absent)."""
    frame = pd.DataFrame.from_records(read_metrics(Path(run_dir) / METRICS_FILE, warn=True))
    if frame.empty or "iteration" not in frame:
        return pd.DataFrame(columns=["iteration", "epoch"])
    return frame.sort_values("iteration", kind="stable").reset_index(drop=True)


def split_curves(metrics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a metrics frame into (train curve, eval curve) frames with their own columns."""
    return _select_lines(metrics, "train_error", TRAIN_COLUMNS), _select_lines(
        metrics, "test_error", EVAL_COLUMNS
    )


def _select_lines(metrics: pd.DataFrame, marker: str, columns: Sequence[str]) -> pd.DataFrame:
    """Rows that carry ``marker`` (a train or an eval line), restricted to ``columns``."""
    if marker not in metrics:
        return pd.DataFrame(columns=list(columns))
    rows = metrics[metrics[marker].notna()]
    return rows.reindex(columns=list(columns)).reset_index(drop=True)


def run_curves(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (train curve, eval curve) frames of one run directory."""
    return split_curves(load_metrics(run_dir))


def load_analysis(run_dir: str | Path) -> dict[str, Any] | None:
    """Return a run's analysis.json, or None when absent or unreadable."""
    return read_json(Path(run_dir) / ANALYSIS_FILE, warn=True) or None


def _read_config(run_dir: Path) -> dict[str, Any]:
    """Read .hydra/config.yaml as plain data (empty dict when absent or broken)."""
    path = run_dir / HYDRA_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        warnings.warn(f"{path}: unreadable config ({error})", stacklevel=2)
        return {}
    return data if isinstance(data, dict) else {}


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    """Value at a dotted key of nested dicts; None if absent or a node rather than a scalar."""
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return None if isinstance(node, dict | list) else node


def config_value(run_dir: str | Path, dotted: str) -> Any:
    """A scalar of a run's .hydra/config.yaml at a dotted key (None if absent or a node)."""
    return _lookup(_read_config(Path(run_dir)), dotted)


def parse_override_dirname(name: str) -> dict[str, str]:
    """Parse a Hydra override dirname such as ``model=plain,depth=56,seed=0``."""
    fields = {}
    for part in name.split(","):
        if "=" not in part:
            continue
        key, value = part.split("=", 1)
        # "+model.depth" and "model.depth" both mean the field "depth".
        fields[key.lstrip("+~").rsplit(".", 1)[-1]] = value
    return fields


def _identity(run_dir: Path, summary: dict, config: dict) -> dict[str, Any]:
    """Identifying fields: summary.json first, then the config, then the directory name."""
    from_name = parse_override_dirname(run_dir.name)
    identity = {}
    for field in IDENTITY_FIELDS:
        value = summary.get(field)
        for dotted in CONFIG_PATHS[field]:
            if value is not None:
                break
            value = _lookup(config, dotted)
        identity[field] = value if value is not None else from_name.get(field)
    return identity


def _to_int(value: Any) -> int | None:
    """Coerce to int, None for missing or unparsable values."""
    try:
        return None if value is None else int(float(value))
    except (TypeError, ValueError):
        return None


def _to_float(value: Any) -> float:
    """Coerce to float, NaN for missing or unparsable values."""
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _status_without_summary(run_dir: Path) -> str:
    """'running' if the run's files changed recently, else 'incomplete' (killed or crashed)."""
    mtimes = [(run_dir / m).stat().st_mtime for m in RUN_MARKERS if (run_dir / m).is_file()]
    recent = bool(mtimes) and time.time() - max(mtimes) < RUNNING_WINDOW_S
    return RunStatus.RUNNING if recent else RunStatus.INCOMPLETE


def run_status(run_dir: Path, summary: dict) -> str:
    """The run's status: its summary's, except that a run no process owns is not running.

    A run killed outright (SIGKILL, a lost node) cannot write its summary, which keeps
    saying 'running'; its lock tells (resnet_flax.rundir.owner). Without a summary, a run
    whose files changed recently counts as running.
    """
    status = summary.get("status") or _status_without_summary(run_dir)
    if summary.get("status") == RunStatus.RUNNING and owner(run_dir) is None:
        return RunStatus.INCOMPLETE
    return status


def _fill_from_metrics(row: dict[str, Any], metrics: pd.DataFrame) -> None:
    """Fill missing final values from the last metrics lines; record where values came from."""
    train, evals = split_curves(metrics)
    row["n_train_lines"], row["n_eval_lines"] = len(train), len(evals)
    filled = False
    if not evals.empty:
        last = evals.iloc[-1]
        for key, value in (
            ("final_test_error", last["test_error"]),
            ("final_test_loss", last["test_loss"]),
            ("final_val_error", last["val_error"]),
            ("best_test_error", evals["test_error"].min()),
        ):
            if math.isnan(row[key]) and not pd.isna(value):
                row[key], filled = float(value), True
    if math.isnan(row["final_train_error"]) and not train.empty:
        # Running mean over the last log interval, not the eval-mode whole-set error.
        row["final_train_error"] = float(train["train_error"].iloc[-1])
        row["final_train_loss"] = _to_float(train["train_loss"].iloc[-1])
        row["train_error_source"], filled = "running", True
    reached = _to_int(metrics["iteration"].max()) if "iteration" in metrics else None
    if reached is not None and row["status"] != FINISHED and reached > (row["iterations"] or 0):
        # A run that did not finish got as far as its metrics, past its last summary.
        row["iterations"], filled = reached, True
    if math.isnan(row["images_per_sec"]) and len(train) > 1:
        # Skip the first interval: it includes compilation.
        row["images_per_sec"] = float(train["images_per_sec"].iloc[1:].median())
    if filled:
        row["values_from"] = "metrics" if row["values_from"] == "none" else "summary+metrics"


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Return one row describing a run directory (never raises for broken run contents)."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir, warn=True)
    row: dict[str, Any] = {"run_dir": str(run_dir)}
    row.update(_identity(run_dir, summary, _read_config(run_dir)))
    row["status"] = run_status(run_dir, summary)
    for field in SUMMARY_FIELDS:
        row[field] = summary.get(field)
    for field in SUMMARY_FIELDS:
        if field not in ("device_kind", "git_commit", "message") and field not in INT_FIELDS:
            row[field] = _to_float(row[field])
    for field in INT_FIELDS:
        row[field] = _to_int(row[field])
    has_summary_values = not math.isnan(row["final_test_error"])
    row["values_from"] = "summary" if has_summary_values else "none"
    row["train_error_source"] = "eval" if not math.isnan(row["final_train_error"]) else None
    _fill_from_metrics(row, load_metrics(run_dir))
    row["has_analysis"] = (run_dir / ANALYSIS_FILE).is_file()
    return row


def load_runs(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Load every run at or below ``paths`` into a frame with one row per run."""
    rows = [load_run(run_dir) for run_dir in find_run_dirs(paths)]
    frame = pd.DataFrame.from_records(rows)
    if frame.empty:
        return frame
    for field in INT_FIELDS:
        frame[field] = frame[field].astype("Int64")
    return frame.sort_values(["model", "depth", "seed"], na_position="last").reset_index(drop=True)


def select_final(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs whose final values should be averaged, with a boolean ``partial`` column.

    Per (model, depth): completed runs when any exist; otherwise running or incomplete runs
    that have values (marked partial). Diverged and failed runs never enter averages; they
    are counted in status tables instead.
    """
    if runs.empty:
        return runs.assign(partial=pd.Series(dtype=bool))
    runs = runs[runs["model"].notna() & runs["depth"].notna()]
    parts = []
    for _, group in runs.groupby(["model", "depth"], sort=True):
        done = group[group["status"] == FINISHED]
        if done.empty:
            partial = group[group["status"].isin(PARTIAL_STATUSES)]
            parts.append(partial.assign(partial=True))
        else:
            parts.append(done.assign(partial=False))
    parts = [part for part in parts if not part.empty]
    if not parts:
        return runs.iloc[0:0].assign(partial=pd.Series(dtype=bool))
    return pd.concat(parts, ignore_index=True)


def mean_std(
    frame: pd.DataFrame, by: Sequence[str], values: Iterable[str], count: str = "n"
) -> pd.DataFrame:
    """Mean and sample std of ``values`` per group: columns ``<v>_mean``, ``<v>_std``, ``n``.

    The single aggregation over seeds used by both plots and report. The std of one seed is
    NaN (unknown), not 0.
    """
    values = list(values)
    grouped = frame.groupby(list(by), sort=True)
    result = grouped[values].agg(["mean", "std"])
    result.columns = [f"{value}_{stat}" for value, stat in result.columns]
    result[count] = grouped.size()
    return result.reset_index()


def load_curves(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long (train, eval) curve frames of the given runs, tagged with model, depth and seed."""
    trains, evals = [], []
    for run in runs.itertuples(index=False):
        train, evaluation = run_curves(run.run_dir)
        tags = {"run_dir": run.run_dir, "model": run.model, "depth": run.depth, "seed": run.seed}
        trains.append(train.assign(**tags))
        evals.append(evaluation.assign(**tags))
    return _concat(trains, TRAIN_COLUMNS), _concat(evals, EVAL_COLUMNS)


def load_analyses(runs: pd.DataFrame) -> pd.DataFrame:
    """Long frame of analysis.json layers (one row per run and layer), empty if none exist."""
    frames = []
    for run in runs.itertuples(index=False):
        analysis = load_analysis(run.run_dir)
        if not analysis or not analysis.get("layers"):
            continue
        layers = pd.DataFrame.from_records(analysis["layers"])
        if "index" not in layers:
            layers["index"] = range(len(layers))
        # Older or partial analyses may lack a measurement: keep the column, as NaN.
        layers = layers.reindex(columns=sorted({*layers.columns, *ANALYSIS_COLUMNS}))
        tags = {"run_dir": run.run_dir, "model": run.model, "depth": run.depth, "seed": run.seed}
        frames.append(layers.assign(**tags))
    return _concat(frames, ANALYSIS_COLUMNS)


def _concat(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """Concatenate frames, dropping empty ones; an empty result still has ``columns``."""
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return pd.DataFrame(columns=[*columns, "run_dir", "model", "depth", "seed"])
    return pd.concat(frames, ignore_index=True)
