"""`make demo`'s sweep from an empty, then a warm compilation cache, against its PyTorch twin.

All three run back to back as subprocesses on this machine. Our sweep is experiments.demo's
(experiments.cli.sweeps), each run recording where its time went in its summary.json; the twin,
`python -m benchmarks.torch_sweep`, trains the same nets on the same split with the same recipe
and jobs per core in PyTorch eager. Writes <out>/demo_vs_torch.{json,md}.

Run: python -m benchmarks.demo_vs_torch [--cold] [--out DIR] [--name STEM] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.breakdown import part_totals, sweep_breakdown, twin_breakdown
from benchmarks.common import (
    UsageError,
    add_output_args,
    exit_code,
    parser,
    provenance,
    require_torch,
    results_dir,
)
from benchmarks.demo_report import write_results
from benchmarks.twin import TwinRecipe, sweep_jobs, twin_recipe
from experiments.cli.sweeps import DEMO_EXPERIMENT as EXPERIMENT
from experiments.cli.sweeps import demo_sweep_command

REPO_ROOT = Path(__file__).resolve().parent.parent
# What `make` exports for every run (Makefile): malloc's huge pages; an existing value stays.
MAKE_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's command line."""
    p = parser("benchmarks.demo_vs_torch", __doc__)
    p.add_argument("--cold", action="store_true", help="the cold-cache sweep only")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides for both sweeps, e.g. trainer.iterations=22 "
        "hydra.sweeper.params.depth=8 \"hydra.sweeper.params.model='plain,residual'\"",
    )
    add_output_args(p, "demo_vs_torch")
    return p.parse_args(argv)


def demo_recipe(overrides: list[str]) -> TwinRecipe:
    """The PyTorch twin's recipe: the demo preset with `overrides`, its jobs in Hydra's order."""
    from experiments.cli.train_config import compose_train, run_config

    try:
        cfg = compose_train([f"experiment={EXPERIMENT}", *overrides])
        jobs = sweep_jobs(dict(cfg.hydra.sweeper.params or {}), cfg.model, cfg.depth)
        run = run_config(cfg)
        n_jobs = int(cfg.hydra.launcher.n_jobs)
        return twin_recipe(
            run.model, run.dataset, run.optim, run.trainer, run.info.seed, jobs, n_jobs
        )
    except Exception as err:  # Hydra's or the twin's message, in one line
        raise UsageError(f"{' '.join(overrides)}: {err}".splitlines()[0]) from err


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment with `make`'s settings and `extra`."""
    return {**MAKE_ENV, **os.environ, **extra}


def _run(command: list, env: dict, log: Path) -> tuple[float, float]:
    """Run a command from the repository root, its output into `log`; its start and end."""
    launched = time.time()
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    exited = time.time()
    if code.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(map(str, command))} exited with {code.returncode}:\n{tail}")
    return launched, exited


def run_ours(label: str, workdir: Path, cache: Path, overrides: list[str]) -> dict:
    """Our sweep with the compilation cache in `cache`; its wall time, breakdown, plot time."""
    sweep_dir = workdir / f"sweep_{label}"
    env = _environment(JAX_COMPILATION_CACHE_DIR=str(cache))
    command = demo_sweep_command(sweep_dir, overrides)
    launched, exited = _run(command, env, workdir / f"{label}.log")
    result = {"label": label, **sweep_breakdown(sweep_dir, launched, exited)}
    result["cache_entries_after"] = sum(1 for p in cache.rglob("*") if p.is_file())
    # `make demo` then draws the figures and report: timed on its own.
    plot = [sys.executable, "-m", "experiments.plot", str(sweep_dir)]
    try:
        launched, exited = _run(plot, env, workdir / f"{label}_plot.log")
        result["plot_s"] = exited - launched
    except RuntimeError as err:  # the sweep's numbers stand without the plots
        result["plot_error"] = str(err).splitlines()[-1]
    return result


def run_twin(recipe: TwinRecipe, workdir: Path) -> dict:
    """The PyTorch twin of the sweep; its wall time and breakdown."""
    recipe_file, out = workdir / "twin_recipe.json", workdir / "twin.json"
    recipe_file.write_text(json.dumps(asdict(recipe)))
    command = [sys.executable, "-m", "benchmarks.torch_sweep", recipe_file, out]
    launched, exited = _run(command, _environment(), workdir / "twin.log")
    raw = json.loads(out.read_text())
    jobs = [twin_breakdown(job) for job in raw["jobs"]]
    return {
        "framework": raw["framework"],
        "n_jobs": raw["n_jobs"],
        "threads_per_job": raw["threads_per_job"],
        "wall_s": exited - launched,
        "pool_wall_s": raw["pool_wall_s"],
        "jobs": jobs,
        "job_seconds": part_totals(jobs),
    }


def run_demo_vs_torch(recipe: TwinRecipe, overrides: list[str], cold_only: bool) -> dict:
    """Our sweep from an empty compilation cache, again with it warm, then the twin."""
    workdir = Path(tempfile.mkdtemp(prefix="demo_vs_torch_"))
    cache = workdir / "jax_cache"
    cache.mkdir()
    ours = {"cold": run_ours("cold", workdir, cache, overrides)}
    if not cold_only:
        ours["warm"] = run_ours("warm", workdir, cache, overrides)
    torch_run = run_twin(recipe, workdir)
    shutil.rmtree(workdir)  # kept when a run fails: its logs are there
    shown = demo_sweep_command(Path("<tmp>/sweep"), overrides)
    return {
        "sweep_command": " ".join(["python", *shown[1:]]),
        "environment": {k: _environment()[k] for k in MAKE_ENV},
        "recipe": asdict(recipe),
        "ours": ours,
        "torch": torch_run,
        "ratio_to_torch": {k: run["wall_s"] / torch_run["wall_s"] for k, run in ours.items()},
    }


def benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Check the request, run the three sweeps, write the files."""
    recipe = demo_recipe(args.overrides)
    require_torch("benchmarks.demo_vs_torch")
    meta = provenance("benchmarks.demo_vs_torch", argv)
    try:
        result = run_demo_vs_torch(recipe, args.overrides, args.cold)
    except RuntimeError as err:  # a sweep failed: its command, exit status and log tail
        print(f"error: {err}", file=sys.stderr)
        return 1
    paths = write_results(results_dir(args.out), args.name or "demo_vs_torch", {**meta, **result})
    print(f"wrote {paths[0]} and {paths[1].name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Time the demo sweep cold and warm and its PyTorch twin; one error line on bad input."""
    return exit_code(lambda: benchmark(parse_args(argv), argv))


if __name__ == "__main__":
    sys.exit(main())
