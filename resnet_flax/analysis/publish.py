"""Curated copies of a sweep's figures and report, with the command and commit that made them."""

from __future__ import annotations

import math
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from resnet_flax.analysis.runs import load_runs
from resnet_flax.rundir import git_commit


def percent(value: object) -> str:
    """A fraction as a percentage, '-' when missing."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(number) else f"{100 * number:.1f}%"


def error_table(sweep_dir: Path) -> str:
    """Final training and test error of every run in the sweep, as an aligned text table."""
    runs = load_runs([sweep_dir])
    if runs.empty:
        return "(no runs found)"
    lines = [f"{'model':<9} {'depth':>5} {'status':<10} {'train err':>9} {'test err':>9}"]
    for row in runs.itertuples():
        lines.append(
            f"{row.model!s:<9} {row.depth!s:>5} {row.status!s:<10} "
            f"{percent(row.final_train_error):>9} {percent(row.final_test_error):>9}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Provenance:
    """How a published folder was made: the command line, the sweep and its wall times."""

    command: str  # e.g. "python -m experiments.demo --publish results/demo"
    sweep_dir: Path
    sweep_s: float
    total_s: float
    table: str  # the final numbers to quote


def processor_name() -> str:
    """The CPU model (its kernels decide XLA:CPU's rounding), or the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """Cores this process may use, the processor and the load averages: what a wall time means."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cores} CPU cores, {processor_name()}; load average (1, 5, 15 min) at the end: {load}"


def publish(sweep_dir: Path, target: Path, made: Provenance) -> None:
    """Copy the figures and report.md to `target`, with PROVENANCE.md (command and commit)."""
    # Before the copies below: they change tracked files, which would mark the commit dirty.
    commit = git_commit()
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*"):
        if old.is_file():
            old.unlink()
    for figure in sorted((sweep_dir / "figures").glob("*")):
        shutil.copy2(figure, target / figure.name)
    shutil.copy2(sweep_dir / "report.md", target / "report.md")
    (target / "PROVENANCE.md").write_text(
        "# How these files were made\n\n"
        f"Command: `{made.command}`  \n"
        f"Commit: `{commit}`  \n"
        f"Sweep directory (not in git): `{made.sweep_dir}`  \n"
        f"Sweep wall time: {made.sweep_s:.0f} s; total with analysis and plots: "
        f"{made.total_s:.0f} s  \n"
        f"Machine: {machine_line()}\n\n"
        "Final errors (training error in eval mode on the whole training set):\n\n"
        f"```\n{made.table}\n```\n"
    )
