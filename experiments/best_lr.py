"""Each group's best learning rate: ``python -m experiments.best_lr <sweep_dir> [--swept KEY]``.

For a sweep over optim.lr (and any other swept key named with --swept), groups the runs by
everything else their sweep set, reports each group's best final training error and where it
was reached, draws training error against lr (one curve per depth) and the best against depth,
and judges degradation on the bests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from resnet_flax.analysis.best_of_group import DEFAULT_SWEPT
from resnet_flax.analysis.best_of_group_plots import write_best_report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(prog="python -m experiments.best_lr", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (or a parent of several)")
    parser.add_argument(
        "--swept",
        action="append",
        default=None,
        help="a swept key to choose the best over (repeat for several; default: optim.lr)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="where the markdown goes (default: <sweep_dir>/best_lr.md); figures beside it "
        "in figures/",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Report each group's best; print the bests and the verdict. Returns the exit code."""
    args = parse_args(argv)
    if not args.sweep_dir.exists():
        print(f"error: no such directory: {args.sweep_dir}", file=sys.stderr)
        return 2
    swept = tuple(args.swept or DEFAULT_SWEPT)
    report = args.report or args.sweep_dir / "best_lr.md"
    try:
        print("\n".join(write_best_report(args.sweep_dir, swept, report)))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
