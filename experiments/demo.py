"""The laptop demo (`make demo`): the digits degradation sweep, its figures, report and table."""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from experiments import plot
from experiments.demo_sweep import EXPERIMENT, demo_sweep_command
from resnet_flax.analysis.runs import load_runs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.demo",
        description=f"Run the {EXPERIMENT} sweep through experiments.train, then plot it.",
    )
    parser.add_argument(
        "--sweep-dir",
        type=Path,
        default=None,
        help="sweep directory (default: a fresh results/sweeps/digits_degradation/<time>); "
        "an existing one resumes, skipping completed runs",
    )
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="also run experiments.analyze (Fig. 7 response std, gradient flow) before plotting",
    )
    parser.add_argument(
        "--publish",
        type=Path,
        default=None,
        help="copy figures and report into this folder with the command and commit that made them",
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides for the sweep, e.g. seed=1"
    )
    return parser.parse_args(argv)


def _percent(value: object) -> str:
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
            f"{_percent(row.final_train_error):>9} {_percent(row.final_test_error):>9}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep, plot it, print the table and the wall time; returns the exit code."""
    args = parse_args(argv)
    sweep_dir = args.sweep_dir or Path("results", "sweeps", EXPERIMENT) / datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S"
    )
    start = time.perf_counter()
    command = demo_sweep_command(sweep_dir, args.overrides)
    print("$", " ".join(command[1:]), flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        print(f"error: the sweep failed; see the logs under {sweep_dir}", file=sys.stderr)
        return 1
    sweep_time = time.perf_counter() - start
    if args.analyze:
        from experiments import analyze

        print(f"$ python -m experiments.analyze {sweep_dir}", flush=True)
        if analyze.main([str(sweep_dir)]) != 0:
            return 1
    print(f"$ python -m experiments.plot {sweep_dir}", flush=True)
    if plot.main([str(sweep_dir)]) != 0:
        return 1
    print()
    print(f"sweep:   {sweep_dir}")
    print(f"figures: {sweep_dir / 'figures'}")
    print(f"report:  {sweep_dir / 'report.md'}")
    print()
    print("final errors (training error in eval mode on the whole training set):")
    print(error_table(sweep_dir))
    total = time.perf_counter() - start
    print(f"\nsweep {sweep_time:.0f} s, total wall time {total:.0f} s ({total / 60:.1f} min)")
    if args.publish:
        publish(sweep_dir, args.publish, argv, sweep_time, total)
    return 0


def publish(
    sweep_dir: Path,
    target: Path,
    argv: Sequence[str] | None,
    sweep_s: float,
    total_s: float,
    command: str = "experiments.demo",
    table: str | None = None,
) -> None:
    """Copy the figures and report to a curated folder, with the command and commit.

    `table`: the final numbers to quote (default: error_table of the sweep).
    """
    from resnet_flax.rundir import git_commit

    # Before the copies below: they change tracked files, which would mark the commit dirty.
    commit = git_commit()
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*"):
        if old.is_file():
            old.unlink()
    for figure in sorted((sweep_dir / "figures").glob("*")):
        shutil.copy2(figure, target / figure.name)
    shutil.copy2(sweep_dir / "report.md", target / "report.md")
    args = " ".join(argv if argv is not None else sys.argv[1:])
    (target / "PROVENANCE.md").write_text(
        "# How these files were made\n\n"
        f"Command: `python -m {command} {args}`  \n"
        f"Commit: `{commit}`  \n"
        f"Sweep directory (not in git): `{sweep_dir}`  \n"
        f"Sweep wall time: {sweep_s:.0f} s; total with analysis and plots: {total_s:.0f} s "
        "(2 CPU cores)\n\n"
        "Final errors (training error in eval mode on the whole training set):\n\n"
        f"```\n{error_table(sweep_dir) if table is None else table}\n```\n"
    )
    print(f"published to {target}")


if __name__ == "__main__":
    sys.exit(main())
