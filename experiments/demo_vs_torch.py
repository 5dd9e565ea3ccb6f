"""The benchmark's --demo-vs-torch mode: the demo sweep cold and warm against its PyTorch twin."""

from __future__ import annotations

import argparse
import sys

from experiments.benchmark import ResultFiles, UsageError
from experiments.config import REPO_ROOT, compose_config, to_library
from resnet_flax.bench.demo_vs_torch import EXPERIMENT, run_demo_vs_torch, write_results
from resnet_flax.bench.torch_baseline import torch_available
from resnet_flax.bench.torch_sweep import TwinRecipe, sweep_jobs, twin_recipe


def demo_recipe(overrides: list[str]) -> TwinRecipe:
    """The PyTorch twin's recipe: the demo preset with `overrides`, its jobs in Hydra's order."""
    try:
        cfg = compose_config([f"experiment={EXPERIMENT}", *overrides])
        jobs = sweep_jobs(dict(cfg.hydra.sweeper.params or {}), cfg.model, cfg.depth)
        spec, data_cfg, optim, trainer, info = to_library(cfg)
        n_jobs = int(cfg.hydra.launcher.n_jobs)
        return twin_recipe(spec, data_cfg, optim, trainer, info.seed, jobs, n_jobs)
    except Exception as err:  # Hydra's or the twin's message, in one line
        raise UsageError(f"--demo-vs-torch: {err}".splitlines()[0]) from err


def demo_vs_torch(args: argparse.Namespace, argv: list[str] | None) -> int:
    """--demo-vs-torch: our demo sweep cold and warm, then its PyTorch twin, written to files."""
    if not torch_available():
        raise UsageError("--demo-vs-torch needs PyTorch (pip install torch==2.13.0)")
    recipe = demo_recipe(args.demo_overrides)
    files = ResultFiles(args, argv)
    try:
        result = run_demo_vs_torch(recipe, args.demo_overrides, REPO_ROOT, args.cold)
    except RuntimeError as err:  # a sweep failed: its command, exit status and log tail
        print(f"error: {err}", file=sys.stderr)
        return 1
    paths = write_results(files.out, args.name or "demo_vs_torch", {**files.meta, **result})
    print(f"wrote {paths[0]} and {paths[1].name}")
    return 0
