"""Loss landscapes of trained runs (Li et al. 2018): ``python -m experiments.landscape RUN_DIR
[RUN_DIR ...] [--points-2d 21] [--step N] ...``. Filter-normalised 1-D and 2-D surfaces of the
training loss and error, and the PCA plane of each run's checkpoints; nets side by side."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from experiments.cli.options import add_config_options, config_from_options
from resnet_flax.analysis.landscape import LandscapeConfig
from resnet_flax.analysis.landscape_plots import landscape_figures
from resnet_flax.analysis.landscape_run import landscape_run, plan_landscape
from resnet_flax.analysis.layer_stats import AnalysisError
from resnet_flax.data.config import DataError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments: the runs, where to write, the LandscapeConfig keys."""
    p = argparse.ArgumentParser(prog="python -m experiments.landscape", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="trained run directories")
    p.add_argument("--out", type=Path, help="default: results/landscapes/<time>")
    add_config_options(p, LandscapeConfig)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Check every run, then compute and save each landscape and draw the figures."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    cfg = config_from_options(LandscapeConfig, args)
    out = args.out or Path("results", "landscapes", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    try:
        plans = [plan_landscape(run, cfg) for run in args.runs]  # all checked before compiling
        records = [landscape_run(p, cfg, out / p.run.run_dir.name) for p in plans]
    except (AnalysisError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for record in records:
        low, high = record["loss_range_2d"]
        print(
            f"{record['model']}-{record['depth']}: loss {low:.3g}..{high:.3g} over the "
            f"{cfg.points_2d}x{cfg.points_2d} grid in {record['wall_2d_s']:.1f} s "
            f"(compile {record['compile_s']:.1f} s)"
        )
    for path in landscape_figures(records, out / "figures"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
