"""Figures and report.md for a sweep: ``python -m experiments.plot <sweep_dir | run_dir ...>``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from resnet_flax.analysis.plots import make_all_figures
from resnet_flax.analysis.report import write_report
from resnet_flax.analysis.runs import load_failed_jobs, load_runs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.plot",
        description="Write the degradation figures (PNG + PDF) and report.md for runs.",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, help="a sweep directory, or one or more run directories"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="figure directory (default: <sweep_dir>/figures, or the run dirs' common "
        "parent/figures); report.md goes to its parent",
    )
    return parser.parse_args(argv)


def output_dirs(paths: Sequence[Path], out: Path | None) -> tuple[Path, Path]:
    """(figure directory, report directory) for the given inputs and ``--out``."""
    if out is not None:
        return out, out.resolve().parent
    resolved = [p.resolve() for p in paths]
    base = resolved[0] if len(resolved) == 1 else Path(os.path.commonpath(resolved))
    return base / "figures", base


def main(argv: Sequence[str] | None = None) -> int:
    """Load runs, write figures and report; print paths and the verdict. Returns exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"error: no such directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = load_runs(args.paths)
    for job in load_failed_jobs(args.paths):  # jobs that left no run to show
        print(f"failed job {job['job']}: {job['message']}")
    if runs.empty:
        print(
            "error: no runs found (no summary.json, metrics.jsonl or .hydra/config.yaml) "
            f"under {', '.join(map(str, args.paths))}",
            file=sys.stderr,
        )
        return 1
    fig_dir, report_dir = output_dirs(args.paths, args.out)
    print(f"{len(runs)} runs: {runs['status'].value_counts().to_dict()}")
    for paths in make_all_figures(runs, fig_dir).values():
        for path in paths:
            print(path)
    report = write_report(runs, report_dir / "report.md")
    print(report.path)
    for dataset, verdict in report.verdicts.items():
        print(f"verdict [{dataset}]: {verdict.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
