"""Figures and report.md for a sweep: ``python -m experiments.plot <sweep_dir | run_dir ...>``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from resnet_flax.analysis.sweep_report import NoRuns, plot_runs

EXAMPLES = """examples:
  python -m experiments.plot results/sweeps/digits_degradation/<time>   # figures/ + report.md
  python -m experiments.plot results/runs/default/<time> results/runs/default/<time2>
  python -m experiments.plot results/sweeps/he2015_fig6/<time> --out /tmp/figures
more: docs/usage.md (Plots and report)"""


def main(argv: Sequence[str] | None = None) -> int:
    """Load runs, write figures and report; print paths and the verdict. Returns exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.plot",
        description="Write the degradation figures (PNG + PDF: Fig. 1 and Fig. 6 style curves, "
        "error vs depth,\nlayer diagnostics where analysed) and report.md with the error tables "
        "and a degradation\nverdict, for finished or partial runs.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    args = parser.parse_args(argv)
    try:
        print("\n".join(plot_runs(args.paths, args.out)))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NoRuns as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
