"""He et al. 2015's construction argument in one command: ``python -m experiments.construction``.

Trains plain and residual nets of the source depth and of the deep depth from scratch, then
each deep net from its trained source with identity blocks added (init_from), and writes the
figure and report.md. Extra Hydra overrides (dataset=cifar10, ...) go to every run.

examples:
  python -m experiments.construction                       # digits, depth 20 -> 56
  python -m experiments.construction --sweep-dir results/sweeps/construction/<time>  # resume
  python -m experiments.construction --source-depth 8 --depth 20 seed=1
more: docs/usage.md (The construction argument)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from experiments.cli.sweeps import new_sweep_dir, run_sweep, train_sweep_command
from resnet_flax.analysis.construction import runs_table, sentence, write_construction
from resnet_flax.analysis.publish import Provenance, publish

EXPERIMENT = "construction"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.construction",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sweep-dir",
        type=Path,
        default=None,
        help="sweep directory (default: a fresh results/sweeps/construction/<time>); an "
        "existing one resumes, skipping completed runs",
    )
    parser.add_argument("--source-depth", type=int, default=20, help="the shallow nets' depth")
    parser.add_argument("--depth", type=int, default=56, help="the deep nets' depth")
    parser.add_argument(
        "--publish", type=Path, default=None, help="copy figure and report here, with provenance"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. dataset=cifar10")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the sources and the deep nets, then the constructed ones; figure and report."""
    args = parse_args(argv)
    if args.source_depth > args.depth:
        print(f"error: --source-depth {args.source_depth} > --depth {args.depth}", file=sys.stderr)
        return 2
    sweep_dir = args.sweep_dir or new_sweep_dir(EXPERIMENT)
    trained, constructed = sweep_dir / "trained", sweep_dir / "constructed"
    start = time.perf_counter()
    # The preset names each run dir <model>-<depth>, so ${model} picks each kind's source.
    source = f"init_from='{trained}/${{model}}-{args.source_depth}'"
    phases = [
        (trained, [f"depth={args.depth},{args.source_depth}", *args.overrides]),
        (constructed, [f"depth={args.depth}", source, *args.overrides]),
    ]
    for directory, overrides in phases:
        if not run_sweep(train_sweep_command(EXPERIMENT, directory, overrides), directory):
            return 1
    sweep_s = time.perf_counter() - start
    trios = write_construction([sweep_dir], sweep_dir)
    if not trios:
        print(f"error: no constructed run with its source under {sweep_dir}", file=sys.stderr)
        return 1
    print()
    for trio in trios.values():
        print(sentence(trio))
    print(f"\nfigure: {sweep_dir / 'figures'}\nreport: {sweep_dir / 'report.md'}")
    total = time.perf_counter() - start
    print(f"sweeps {sweep_s:.0f} s, total wall time {total:.0f} s ({total / 60:.1f} min)")
    if args.publish:
        table = "\n".join(sentence(t) for t in trios.values()) + "\n\n" + runs_table(trios)
        line = f"python -m experiments.{EXPERIMENT} " + " ".join(argv or sys.argv[1:])
        publish(sweep_dir, args.publish, Provenance(line, sweep_dir, sweep_s, total, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
