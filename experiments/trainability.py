"""The trainability sweep, then each net at its best lr: ``python -m experiments.trainability``.

Runs `python -m experiments.train -m experiment=trainability` (seven arms x depths x learning
rates), then `experiments.best_lr` on it and the signal-propagation probes of each net's best
run (report.md and figures in the sweep directory); --publish copies them with the command,
commit and wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from experiments.cli.sweeps import new_sweep_dir, run_sweep, train_sweep_command
from resnet_flax.analysis.best_of_group import DEFAULT_SWEPT, best_of_groups, depth_table_markdown
from resnet_flax.analysis.best_of_group_plots import write_best_report
from resnet_flax.analysis.best_probes import probe_best_runs
from resnet_flax.analysis.probes import ProbeConfig
from resnet_flax.analysis.publish import Provenance, publish
from resnet_flax.analysis.runs import load_runs

EXPERIMENT = "trainability"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(prog="python -m experiments.trainability", description=__doc__)
    parser.add_argument(
        "--sweep-dir",
        type=Path,
        default=None,
        help="sweep directory (default: a fresh results/sweeps/trainability/<time>); an "
        "existing one resumes, skipping completed runs",
    )
    parser.add_argument(
        "--publish", type=Path, default=None, help="copy report and figures into this folder"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the sweep")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep, report each group's best lr; returns the exit code."""
    args = parse_args(argv)
    sweep_dir = args.sweep_dir or new_sweep_dir(EXPERIMENT)
    start = time.perf_counter()
    if not run_sweep(train_sweep_command(EXPERIMENT, sweep_dir, args.overrides), sweep_dir):
        return 1
    sweep_s = time.perf_counter() - start
    report = sweep_dir / "report.md"
    print("\n".join(write_best_report(sweep_dir, DEFAULT_SWEPT, report)))
    runs = load_runs([sweep_dir])
    best = best_of_groups(runs, DEFAULT_SWEPT)
    print("\n".join(map(str, probe_best_runs(sweep_dir, runs, best, ProbeConfig(), report))))
    total_s = time.perf_counter() - start
    print(f"\nsweep {sweep_s:.0f} s, total wall time {total_s:.0f} s ({total_s / 60:.1f} min)")
    if args.publish:
        table = depth_table_markdown(best)
        line = "python -m experiments.trainability " + " ".join(argv or sys.argv[1:])
        publish(sweep_dir, args.publish, Provenance(line, sweep_dir, sweep_s, total_s, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
