"""Signal-propagation probes (shattered gradients, per-layer signals, Jacobian, gradient flow):
``python -m experiments.probe [--models ..] [--depths ..] [overrides]`` for fresh nets,
``python -m experiments.probe --runs SWEEP_OR_RUN_DIR ...`` for trained runs (at init and end)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from experiments.cli.options import add_config_options, config_from_options, one_line
from experiments.cli.train_config import compose_train, run_config
from resnet_flax.analysis.layer_stats import AnalysisError
from resnet_flax.analysis.probe_plots import probe_figures
from resnet_flax.analysis.probe_study import probe_fresh, probe_runs
from resnet_flax.analysis.probes import ProbeConfig
from resnet_flax.analysis.runs import find_run_dirs
from resnet_flax.data.config import DataError
from resnet_flax.data.memory import load_dataset
from resnet_flax.models.spec import SpecError
from resnet_flax.training.config import ConfigError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments: what to probe, where to write, the ProbeConfig keys."""
    p = argparse.ArgumentParser(prog="python -m experiments.probe", description=__doc__)
    p.add_argument("--runs", nargs="+", type=Path, help="run or sweep directories (trained)")
    p.add_argument("--models", nargs="+", help="fresh nets: plain, residual, preact")
    p.add_argument("--depths", nargs="+", type=int, help="fresh nets' depths")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="fresh nets' seeds")
    p.add_argument("--out", type=Path, help="default: results/probes/<time>")
    add_config_options(p, ProbeConfig)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for fresh nets (dataset=digits)")
    return p.parse_args(argv)


def probe(args: argparse.Namespace, out: Path) -> list[dict]:
    """Check everything, then probe the runs or the fresh nets; the results."""
    cfg = config_from_options(ProbeConfig, args)
    cfg.check()
    if args.runs:
        return probe_runs(find_run_dirs(args.runs), cfg, out / "probes")
    run = run_config(compose_train(args.overrides))
    spec, data_cfg = run.model, run.dataset
    specs = [  # each checked as it is built, before the first compiles
        spec.replace(model=m, depth=d)
        for m in args.models or [spec.model]
        for d in args.depths or [spec.depth]
    ]
    data = load_dataset(data_cfg)
    return probe_fresh(specs, data, data_cfg.normalization, args.seeds, cfg, out / "probes")


def main(argv: Sequence[str] | None = None) -> int:
    """Probe, write one JSON per net and state, draw the figures; the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    out = args.out or Path("results", "probes", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    try:
        records = probe(args, out)
    except (AnalysisError, SpecError, DataError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as err:  # a bad override
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    for path in probe_figures(records, out / "figures"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
