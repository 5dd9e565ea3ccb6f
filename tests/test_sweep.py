"""The real entry point in subprocesses: one-line config errors, smoke sweeps, resume, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from resnet_flax.analysis.runs import parse_override_dirname
from resnet_flax.training.cpu_devices import cpu_device_count, usable_cores

ROOT = Path(__file__).resolve().parent.parent
# A few iterations of depth-8 and depth-14 nets on the bundled digits: seconds per job.
TINY = [
    "dataset=digits",
    "trainer.iterations=4",
    "trainer.log_every=2",
    "trainer.eval_every=2",
    "trainer.checkpoint_every=4",
    "trainer.progress=false",
]
SMOKE_SWEEP = ["model=plain,residual", "depth=8,14", *TINY]
SMOKE_JOBS = {(m, d) for m in ("plain", "residual") for d in (8, 14)}


def run_train(*args: str, timeout: float = 120, env: dict | None = None):
    """Run ``python -m experiments.train`` from the repo root; return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def error_lines(stderr: str) -> list[str]:
    """The lines our entry point prints for a rejected configuration."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["depth=57"], "CIFAR depth must be 6n+2"),
        pytest.param(
            ["block=bottleneck", "depth=32"], "9n+2", marks=pytest.mark.slow, id="bottleneck"
        ),
        pytest.param(["model=dense"], "model must be one of", marks=pytest.mark.slow, id="model"),
        pytest.param(
            ["dataset=npz"], "dataset=npz needs dataset.path", marks=pytest.mark.slow, id="npz"
        ),
        pytest.param(
            ["cpu_devices=3"],
            "cpu_devices=3 does not divide the batch size 128",
            marks=pytest.mark.slow,
            id="cpu_devices",
        ),
    ],
)
def test_impossible_combination_fails_with_one_line_before_compiling(tmp_path, overrides, message):
    start = time.perf_counter()
    proc = run_train(*overrides, f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 45, f"took {elapsed:.0f} s: something compiled or trained"
    assert not (tmp_path / "run").exists(), "a rejected run leaves no run directory"


@pytest.mark.slow
def test_batch_not_divisible_by_devices_fails_with_one_line(tmp_path):
    proc = run_train(
        "dataset=digits",
        "trainer.batch_size=100",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"},
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "divisible by the 8 devices" in lines[0], proc.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["no_such_key=1"], "error: unknown key 'no_such_key'"),
        (["trainer.eval_evry=5"], "error: unknown key 'trainer.eval_evry'"),
        (
            ["+trainer.iteration=50"],
            "error: unknown trainer key(s) iteration; valid: allow_recipe_change, batch_size",
        ),
        (
            ["+lr=0.5"],
            "error: unknown key(s) lr; valid: activation, block, bn_batch",
        ),  # + adds keys Hydra lacks
        (
            ["dataset=imagenet21k"],
            "error: Could not find 'dataset/imagenet21k'; available: cifar10, cifar100, digits, "
            "fashion_mnist, imagenet2012, imagenette, mnist, npz, svhn_cropped",
        ),
        (["-m", "depth=8,9,57"], "error: job depth=9"),
    ],
)
def test_a_bad_key_or_option_fails_with_one_line_before_anything_starts(
    tmp_path, overrides, message
):
    # Fails when Hydra's multi-line message (or a traceback) reaches the user, or when a
    # sweep launches its valid jobs before saying that another one cannot run.
    proc = run_train(*overrides, f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    if "-m" in overrides:  # both bad jobs named, nothing launched
        assert len(lines) == 2 and "job depth=57" in lines[1], proc.stderr
        assert not (tmp_path / "run").exists()
    else:
        assert len(lines) == 1, proc.stderr


def test_a_misspelt_key_in_a_yaml_file_fails_with_one_line_naming_it(tmp_path):
    # Fails when a preset's unknown key is merged silently (no schema) or reported in
    # several lines.
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ntrainer:\n  eval_evry: 5\n"
    )
    search = f"hydra.searchpath=[file://{tmp_path}]"
    proc = run_train(search, "experiment=typo", f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: experiment/typo: unknown key 'trainer.eval_evry'; see docs/usage.md for the keys"
    ]


def check_sweep(sweep_dir: Path, parallel_jobs: int = 1) -> None:
    """One complete run directory per job, named by its overrides, and multirun.yaml."""
    assert (sweep_dir / "multirun.yaml").is_file()
    jobs = {p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert len(jobs) == len(SMOKE_JOBS)
    for name in jobs:
        run_dir = sweep_dir / name
        # Hydra's override_dirname: the job's overrides sorted by key, comma-separated.
        fields = parse_override_dirname(name)
        assert name.startswith("dataset=digits,depth=") and "trainer.progress" not in fields
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", summary
        assert summary["iterations"] == 4 and summary["dataset"] == "digits"
        # cpu_devices=auto: each job splits its share of the cores into devices (batch 128
        # allowing); jobs running at once share the cores.
        cores = max(1, usable_cores() // parallel_jobs)
        assert summary["device_count"] == cpu_device_count("auto", [128], cores)
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any("train_error" in x for x in lines) and any("test_error" in x for x in lines)
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        assert config["model"] == summary["model"] == fields["model"]
        assert config["depth"] == summary["depth"] == int(fields["depth"])
    found = {
        (parse_override_dirname(n)["model"], int(parse_override_dirname(n)["depth"])) for n in jobs
    }
    assert found == SMOKE_JOBS


def test_smoke_sweep_basic_launcher_and_resume(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_train("-m", *SMOKE_SWEEP, f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_sweep(sweep_dir)
    for job in (p for p in sweep_dir.iterdir() if p.is_dir()):  # each job's last line, once
        line = f"{job}: {final_errors(json.loads((job / 'summary.json').read_text()))}"
        assert (proc.stdout + proc.stderr).count(line) == 1, proc.stdout[-3000:]
    before = {p: (p / "metrics.jsonl").read_text() for p in sweep_dir.iterdir() if p.is_dir()}
    # Rerunning the same command on the same sweep dir resumes: finished runs are skipped.
    proc = run_train("-m", *SMOKE_SWEEP, f"hydra.sweep.dir={sweep_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr  # Hydra logs to stdout
    assert output.count("already completed") == 4, output[-3000:]
    assert before == {p: (p / "metrics.jsonl").read_text() for p in before}
    check_sweep(sweep_dir)


# Slow: the submitit path on one machine; the basic launcher sweep is in the fast set.
@pytest.mark.slow
def test_smoke_sweep_submitit_local(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "hydra/launcher=submitit_local",
        *SMOKE_SWEEP,
        f"hydra.sweep.dir={sweep_dir}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_sweep(sweep_dir)


@pytest.mark.slow
def test_smoke_sweep_multi_gpu_launcher_runs_on_cpu_too(tmp_path):
    # Without GPUs the pinning is harmless: both loky workers run their jobs on the CPU.
    sweep_dir = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "hydra/launcher=multi_gpu",
        "hydra.launcher.n_jobs=2",
        *SMOKE_SWEEP,
        f"hydra.sweep.dir={sweep_dir}",
        timeout=900,
        env={"JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_sweep(sweep_dir, parallel_jobs=2)
    assert (sweep_dir / ".gpu_locks").is_dir()


def final_errors(summary: dict) -> str:
    """'completed, final training error 1.25%, test error 2.50%' of one run's summary."""
    train, test = (100 * summary[f"final_{split}_error"] for split in ("train", "test"))
    return f"{summary['status']}, final training error {train:.2f}%, test error {test:.2f}%"


@pytest.mark.slow
def test_a_seed_group_ends_with_each_seeds_errors(tmp_path):
    # Fails when the group's last line reads the group's summary as one run's ("final
    # training error None, test error None"), or when the line is logged twice.
    run_dir = tmp_path / "group"
    args = ["depth=8", *TINY, "trainer.vmap_seeds=2", "cpu_devices=1", "seed=3"]
    proc = run_train(*args, f"hydra.run.dir={run_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds = [json.loads((run_dir / f"seed_{s}" / "summary.json").read_text()) for s in (3, 4)]
    parts = [f"seed {s['seed']}: {final_errors(s)}" for s in seeds]
    line = "; ".join([f"{run_dir}: completed", *parts])
    assert (proc.stdout + proc.stderr).count(line) == 1, proc.stdout[-3000:]
    assert "None" not in proc.stdout


@pytest.mark.slow
def test_single_run_and_resume_into_the_same_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    args = ["model=residual", "depth=8", *TINY, "experiment_name=smoke"]
    proc = run_train(*args, f"hydra.run.dir={run_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["experiment"] == "smoke"
    # Asking the same run dir for more iterations continues from the checkpoint at 4.
    more = [a.replace("iterations=4", "iterations=8") for a in args]
    proc = run_train(*more, f"hydra.run.dir={run_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_its = [x["iteration"] for x in lines if "train_error" in x]
    assert train_its == [2, 4, 6, 8]
    assert json.loads((run_dir / "summary.json").read_text())["iterations"] == 8


@pytest.mark.slow
def test_demo_runs_the_sweep_and_plots(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.demo",
            "--sweep-dir",
            str(tmp_path / "demo"),
            "depth=8,14",
            *TINY,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report.md" in proc.stdout and "total wall time" in proc.stdout
    assert (tmp_path / "demo" / "report.md").is_file()
    assert any((tmp_path / "demo" / "figures").glob("*.png"))
    assert proc.stdout.count("completed") >= 4
