"""The laptop demo (`make demo`): the digits degradation sweep, its figures, report and table."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from experiments.cli.sweeps import DEMO_EXPERIMENT, demo_sweep_command, new_sweep_dir, run_sweep
from resnet_flax.analysis.publish import Provenance, error_table, publish
from resnet_flax.analysis.sweep_report import analyze_runs, plot_runs

EXAMPLES = """examples:
  python -m experiments.demo                                 # what `make demo` runs
  python -m experiments.demo --sweep-dir results/sweeps/digits_degradation/<time>  # resume it
  python -m experiments.demo --analyze --publish results/demo seed=1
more: docs/usage.md"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.demo",
        description=f"Run the {DEMO_EXPERIMENT} sweep through experiments.train (plain and "
        "residual\nnets of depth 8, 20, 56 on the bundled 8x8 digits: minutes on a laptop CPU), "
        "then draw\nits figures and report.md and print the table of final errors.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sweep-dir", type=Path, default=None,
        help="sweep directory (default: a fresh results/sweeps/digits_degradation/<time>); "
        "an existing one resumes, skipping completed runs",
    )  # fmt: skip
    parser.add_argument(
        "--analyze", action="store_true",
        help="also analyse every run (Fig. 7 response std, gradient flow) before plotting",
    )  # fmt: skip
    parser.add_argument(
        "--publish", type=Path, default=None,
        help="copy figures and report into this folder with the command and commit that made them",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. seed=1")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep, plot it, print the table and the wall time; returns the exit code."""
    args = parse_args(argv)
    sweep_dir = args.sweep_dir or new_sweep_dir(DEMO_EXPERIMENT)
    start = time.perf_counter()
    if not run_sweep(demo_sweep_command(sweep_dir, args.overrides), sweep_dir):
        return 1
    sweep_s = time.perf_counter() - start
    if args.analyze:
        done, skipped = analyze_runs([sweep_dir])
        print("\n".join(done + skipped))
    print("\n".join(plot_runs([sweep_dir])))
    table = error_table(sweep_dir)
    print(f"\nsweep:   {sweep_dir}\nfigures: {sweep_dir / 'figures'}")
    print(f"report:  {sweep_dir / 'report.md'}\n")
    print(f"final errors (training error in eval mode on the whole training set):\n{table}")
    total = time.perf_counter() - start
    print(f"\nsweep {sweep_s:.0f} s, total wall time {total:.0f} s ({total / 60:.1f} min)")
    if args.publish:
        line = "python -m experiments.demo " + " ".join(sys.argv[1:] if argv is None else argv)
        publish(sweep_dir, args.publish, Provenance(line, sweep_dir, sweep_s, total, table))
        print(f"published to {args.publish}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
