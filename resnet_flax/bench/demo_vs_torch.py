"""`make demo`'s sweep, cold and warm compilation cache, against its PyTorch eager twin.

All three run back to back as subprocesses of one command on the same machine; our sweep is
`python -m experiments.train -m experiment=digits_degradation` with resnet_flax.bench's
JobTimer callback added, the twin `python -m resnet_flax.bench.torch_sweep`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from resnet_flax.bench.breakdown import PARTS, part_totals, sweep_breakdown, twin_breakdown
from resnet_flax.bench.torch_sweep import TwinRecipe

EXPERIMENT = "digits_degradation"
# What `make` exports for every run (Makefile): malloc's huge pages; an existing value stays.
MAKE_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def demo_sweep_command(sweep_dir: Path, overrides: list[str]) -> list[str]:
    """`make demo`'s sweep (without the plots) into sweep_dir, as experiments.demo runs it."""
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "-m",
        f"experiment={EXPERIMENT}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]


def sweep_command(sweep_dir: Path, timing_dir: Path, overrides: list[str]) -> list[str]:
    """The demo's sweep into sweep_dir, its jobs timed into timing_dir."""
    timer = "+hydra.callbacks.job_timer"
    return [
        *demo_sweep_command(sweep_dir, overrides),
        f"{timer}._target_=experiments.job_timer.JobTimer",
        f"{timer}.out_dir={timing_dir}",
    ]


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment with `make`'s settings and `extra`."""
    return {**MAKE_ENV, **os.environ, **extra}


def _run(command: list, env: dict, log: Path, cwd: Path) -> tuple[float, float]:
    """Run a command, its output into `log`; its start and end (epoch seconds)."""
    launched = time.time()
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    exited = time.time()
    if code.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(map(str, command))} exited with {code.returncode}:\n{tail}")
    return launched, exited


def run_ours(label: str, workdir: Path, cache: Path, overrides: list[str], cwd: Path) -> dict:
    """Our sweep with the compilation cache in `cache`; its wall time, breakdown, plot time."""
    sweep_dir, timing_dir = workdir / f"sweep_{label}", workdir / f"timing_{label}"
    env = _environment(JAX_COMPILATION_CACHE_DIR=str(cache))
    command = sweep_command(sweep_dir, timing_dir, overrides)
    launched, exited = _run(command, env, workdir / f"{label}.log", cwd)
    result = {"label": label, **sweep_breakdown(timing_dir, launched, exited)}
    result["cache_entries_after"] = sum(1 for p in cache.rglob("*") if p.is_file())
    # `make demo` then draws the figures and report: timed on its own.
    plot = [sys.executable, "-m", "experiments.plot", str(sweep_dir)]
    try:
        launched, exited = _run(plot, env, workdir / f"{label}_plot.log", cwd)
        result["plot_s"] = exited - launched
    except RuntimeError as err:  # the sweep's numbers stand without the plots
        result["plot_error"] = str(err).splitlines()[-1]
    return result


def run_twin(recipe: TwinRecipe, workdir: Path, cwd: Path) -> dict:
    """The PyTorch twin of the sweep; its wall time and breakdown."""
    recipe_file, out = workdir / "twin_recipe.json", workdir / "twin.json"
    recipe_file.write_text(json.dumps(asdict(recipe)))
    command = [sys.executable, "-m", "resnet_flax.bench.torch_sweep", recipe_file, out]
    launched, exited = _run(command, _environment(), workdir / "twin.log", cwd)
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


def run_demo_vs_torch(
    recipe: TwinRecipe, overrides: list[str], cwd: Path, cold_only: bool = False
) -> dict:
    """Our sweep from an empty compilation cache, again with it warm, then the twin."""
    workdir = Path(tempfile.mkdtemp(prefix="demo_vs_torch_"))
    cache = workdir / "jax_cache"
    cache.mkdir()
    ours = {"cold": run_ours("cold", workdir, cache, overrides, cwd)}
    if not cold_only:
        ours["warm"] = run_ours("warm", workdir, cache, overrides, cwd)
    torch_run = run_twin(recipe, workdir, cwd)
    shutil.rmtree(workdir)  # kept when a run fails: its logs are there
    shown = sweep_command(Path("<tmp>/sweep"), Path("<tmp>/timing"), overrides)
    return {
        "sweep_command": " ".join(["python", *shown[1:]]),
        "environment": {k: _environment()[k] for k in MAKE_ENV},
        "recipe": asdict(recipe),
        "ours": ours,
        "torch": torch_run,
        "ratio_to_torch": {k: run["wall_s"] / torch_run["wall_s"] for k, run in ours.items()},
    }


def _cell(value: object) -> str:
    """A number for the tables: seconds to 0.1, '-' when missing."""
    if value is None:
        return "-"
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def _errors(job: dict) -> str:
    """Final training / test error in percent."""
    return f"{100 * job['final_train_error']:.1f} / {100 * job['final_test_error']:.1f}"


def markdown(result: dict) -> str:
    """The results as Markdown: wall times and ratio, final errors, where the time went."""
    ours, twin = result["ours"], result["torch"]
    runs = {f"ours, {k} compilation cache": r for k, r in ours.items()}
    lines = [
        f"# Demo sweep vs PyTorch eager\n\nCommand: `{result['command']}`  ",
        f"Commit: `{result['git_commit']}`  \nMachine: {result['machine']}  ",
        f"Cores: {result['cores']}; {twin['n_jobs']} jobs at a time, each one single-threaded "
        f"process (ours: one CPU device; {twin['framework']}: {twin['threads_per_job']} thread)  ",
        f"Our sweep: `{result['sweep_command']}`  ",
        f"Environment: {result['environment']}\n",
        "| run | wall s | / PyTorch | plots after it, s |",
        "|---|---|---|---|",
    ]
    for (name, run), key in zip(runs.items(), ours, strict=True):
        ratio = result["ratio_to_torch"][key]
        lines.append(f"| {name} | {run['wall_s']:.1f} | {ratio:.2f} | {_cell(run.get('plot_s'))} |")
    lines += [f"| PyTorch eager twin | {twin['wall_s']:.1f} | 1.00 | - |", ""]
    lines += ["Final training / test error, %:\n", "| net | ours | PyTorch |", "|---|---|---|"]
    twin_jobs = {(j["model"], j["depth"]): j for j in twin["jobs"]}
    for mine in next(iter(ours.values()))["jobs"]:
        theirs = twin_jobs.get((mine.get("model"), mine.get("depth")))
        net = f"{mine.get('model')}-{mine.get('depth')}"
        lines.append(f"| {net} | {_errors(mine)} | {_errors(theirs) if theirs else '-'} |")
    lines += ["", f"Seconds summed over the jobs ({twin['n_jobs']} run at a time):\n"]
    lines += ["| part | " + " | ".join(runs) + " | PyTorch |", "|---" * (len(runs) + 2) + "|"]
    for key, label in PARTS:
        cells = [_cell(r["job_seconds"].get(key)) for r in (*runs.values(), twin)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| main process before the first job (imports, Hydra) | "
        + " | ".join(_cell(r.get("first_job_entry_s")) for r in runs.values())
        + " | - |"
    )
    for name, run in {**runs, "PyTorch eager twin": twin}.items():
        lines += ["", f"Jobs, {name}:\n", *job_table(run["jobs"])]
    return "\n".join(lines) + "\n"


def job_table(jobs: list[dict]) -> list[str]:
    """One line per job: its parts in seconds and its compilation-cache hits."""
    keys = [key for key, _ in PARTS if key not in ("records_s", "other_s")]
    head = "| job | net | worker reused | " + " | ".join(k[:-2] for k in keys)
    lines = [head + " | cache hits/misses |", "|---" * (len(keys) + 4) + "|"]
    for i, job in enumerate(jobs):
        cells = " | ".join(_cell(job.get(k)) for k in keys)
        net = f"{job.get('model')}-{job.get('depth')}"
        hits = f"{job['cache_hits']}/{job['cache_misses']}" if "cache_hits" in job else "-"
        num = job.get("num", i)
        lines.append(f"| {num} | {net} | {job['reused_worker']} | {cells} | {hits} |")
    return lines


def write_results(out_dir: Path, stem: str, result: dict) -> tuple[Path, Path]:
    """The result as out_dir/stem.json and stem.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path
