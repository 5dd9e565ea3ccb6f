"""Why plain nets degrade, on the digits: ``python -m experiments.why [--publish results/why]``.

Trains the why preset (plain and residual nets of depth 8, 20 and 56 with a checkpoint every
epoch), probes every run at initialisation and after training, computes the loss landscapes
and trajectories of plain-56 and ResNet-56, and writes the figures, their JSON and report.md.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from resnet_flax.analysis.landscape import LandscapeConfig
from resnet_flax.analysis.layer_stats import AnalysisError
from resnet_flax.analysis.probes import ProbeConfig
from resnet_flax.analysis.publish import Provenance, error_table, publish
from resnet_flax.analysis.why import plan_study, run_study
from resnet_flax.analysis.why_report import probe_markdown

EXPERIMENT = "why"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m experiments.why", description=__doc__)
    p.add_argument("--sweep-dir", type=Path, help="default: results/sweeps/why/<time>")
    p.add_argument("--depth", type=int, default=56, help="the landscapes' depth")
    seeds_help = "fresh draws probed at initialisation besides each run's seed"
    p.add_argument("--init-seeds", nargs="*", type=int, default=[1, 2], help=seeds_help)
    p.add_argument("--points-2d", type=int, default=LandscapeConfig.points_2d)
    p.add_argument("--publish", type=Path, help="copy figures, data and report here")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the sweep")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the sweep, run the study on it, publish it; the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    probe, landscape = ProbeConfig(), LandscapeConfig(points_2d=args.points_2d)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    sweep_dir = args.sweep_dir or Path("results", "sweeps", EXPERIMENT, stamp)
    start = time.perf_counter()
    try:
        probe.check()  # both before any training
        landscape.check()
        preset = ["-m", f"experiment={EXPERIMENT}", f"hydra.sweep.dir={sweep_dir}"]
        command = [sys.executable, "-m", "experiments.train", *preset, *args.overrides]
        print("$", " ".join(command[1:]), flush=True)
        if subprocess.run(command, check=False).returncode != 0:
            print(f"error: the sweep failed; see the logs under {sweep_dir}", file=sys.stderr)
            return 1
        sweep_s = time.perf_counter() - start
        plan = plan_study(sweep_dir, args.depth, landscape)
        result = run_study(plan, probe, landscape, args.init_seeds, sweep_dir)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = time.perf_counter() - start
    print(f"\nreport: {sweep_dir / 'report.md'}\nsweep {sweep_s:.0f} s, total {total:.0f} s")
    print(probe_markdown(result["probes"]))
    if args.publish:
        line = f"python -m experiments.{EXPERIMENT} " + " ".join(argv or sys.argv[1:])
        made = Provenance(line, sweep_dir, sweep_s, total, error_table(sweep_dir))
        publish(sweep_dir, args.publish, made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
