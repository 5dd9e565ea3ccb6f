"""A sweep's figures, report and layer diagnostics, as the plot and analyze commands make them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from resnet_flax.analysis.plots import make_all_figures
from resnet_flax.analysis.report import write_report
from resnet_flax.analysis.runs import find_run_dirs, load_failed_jobs, load_runs


class NoRuns(ValueError):
    """The given paths hold no run; the message names them."""


def output_dirs(paths: Sequence[Path], out: Path | None) -> tuple[Path, Path]:
    """(figure directory, report directory) for the given inputs and an explicit figure dir."""
    if out is not None:
        return out, out.resolve().parent
    resolved = [p.resolve() for p in paths]
    base = resolved[0] if len(resolved) == 1 else Path(os.path.commonpath(resolved))
    return base / "figures", base


def plot_runs(paths: Sequence[Path], out: Path | None = None) -> list[str]:
    """Write the figures (PNG + PDF) and report.md of the runs under paths; lines to print."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no such directory: {', '.join(missing)}")
    runs = load_runs(paths)
    failed = [f"failed job {job['job']}: {job['message']}" for job in load_failed_jobs(paths)]
    if runs.empty:
        raise NoRuns(
            "no runs found (no summary.json, metrics.jsonl or .hydra/config.yaml) "
            f"under {', '.join(map(str, paths))}"
        )
    fig_dir, report_dir = output_dirs(paths, out)
    lines = failed + [f"{len(runs)} runs: {runs['status'].value_counts().to_dict()}"]
    for figure_paths in make_all_figures(runs, fig_dir).values():
        lines += [str(p) for p in figure_paths]
    report = write_report(runs, report_dir / "report.md")
    lines.append(str(report.path))
    lines += [f"verdict [{data}]: {v.text}" for data, v in report.verdicts.items()]
    return lines


def analyze_runs(
    paths: Sequence[Path],
    grad_batch: int = 256,
    allow_older_checkpoint: bool = False,
    allow_unfinished: bool = False,
) -> tuple[list[str], list[str]]:
    """Layer diagnostics (analysis.json) of every run under paths: (done lines, skip lines)."""
    from resnet_flax.analysis.layer_stats import AnalysisError, analyze_run

    runs = find_run_dirs([Path(p) for p in paths])
    if not runs:
        raise NoRuns("no run directories found under " + " ".join(map(str, paths)))
    done, skipped = [], []
    for run in runs:
        try:
            result = analyze_run(run, grad_batch, allow_older_checkpoint, allow_unfinished)
        except AnalysisError as err:
            skipped.append(f"skip {run}: {err}")
            continue
        layers, at = len(result["layers"]), result["checkpoint_step"]
        done.append(f"{run}/analysis.json: {layers} layers of the checkpoint at iteration {at}")
    return done, skipped
