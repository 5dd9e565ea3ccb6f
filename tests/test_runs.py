"""Tests of the run-directory loader, with hand-built run directories (no JAX)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from resnet_flax.analysis.runs import (
    find_run_dirs,
    load_metrics,
    load_runs,
    mean_std,
    parse_override_dirname,
    run_curves,
    select_final,
)
from resnet_flax.rundir import read_metrics

ITERATIONS = 1000
# Final (train, test) errors of the synthetic sweep: plain degrades, residual does not.
FINALS = {
    ("plain", 20): (0.05, 0.10),
    ("plain", 56): (0.20, 0.25),
    ("residual", 20): (0.05, 0.09),
    ("residual", 56): (0.03, 0.08),
}


def _curve(final: float, iteration: int) -> float:
    """Error decaying from 0.9 to ``final``."""
    return final + (0.9 - final) * math.exp(-iteration / 200)


def write_run(
    root: Path,
    model: str,
    depth: int,
    seed: int,
    final_train: float = 0.1,
    final_test: float = 0.15,
    status: str | None = "completed",
    dataset: str = "cifar10",
    iterations: int = ITERATIONS,
    analysis: bool = False,
    malformed: bool = False,
) -> Path:
    """Write a run directory like the trainer does; ``status=None`` writes no summary.json."""
    run_dir = root / f"model={model},depth={depth},seed={seed}"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"experiment_name: test\nmodel: {model}\ndepth: {depth}\nshortcut: A\nfamily: cifar\n"
        f"seed: {seed}\ndataset:\n  name: {dataset}\n  batch_size: 128\noptim:\n  lr: 0.1\n"
    )
    lines = []
    for it in range(100, iterations + 1, 100):
        err = _curve(final_train, it) + 0.002 * seed
        lines.append(
            {"iteration": it, "epoch": it / 390, "lr": 0.1, "train_loss": 2 * err,
             "train_error": err, "images_per_sec": 1000.0 + it}
        )  # fmt: skip
        if it % 250 == 0 or it == iterations:
            test = _curve(final_test, it)
            lines.append({"iteration": it, "epoch": it / 390, "test_loss": 2 * test,
                          "test_error": test})  # fmt: skip
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    if malformed:
        text += '{"iteration": 99999, "epoch": 3, "train_err\n'
    (run_dir / "metrics.jsonl").write_text(text)
    if status is not None:
        summary = {
            "status": status, "experiment": "test", "model": model, "depth": depth,
            "shortcut": "A", "family": "cifar", "dataset": dataset, "seed": seed,
            "iterations": iterations, "epochs": iterations / 390,
            "final_test_error": final_test, "final_test_loss": 0.3,
            "best_test_error": final_test - 0.01, "final_train_error": final_train,
            "final_train_loss": 0.2, "final_val_error": None, "param_count": 1000 * depth,
            "wall_time_s": 60.0, "compile_time_s": 5.0, "images_per_sec": 1234.0,
            "device_kind": "cpu", "device_count": 1, "versions": {}, "git_commit": None,
            "message": None,
        }  # fmt: skip
        if status in ("diverged", "failed"):
            summary.update(final_test_error=None, final_train_error=None, message="loss is NaN")
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if analysis:
        n_layers = depth - 2
        layers = [
            {"name": f"layer{i}", "index": i,
             "response_std": (2.0 if model == "plain" else 1.0) / (1 + 0.01 * i * depth / 20),
             "grad_norm_init": 10 ** (-i / 10 if model == "plain" else -0.01 * i),
             "grad_norm_final": 0.1 * (1 + i)}
            for i in range(n_layers)
        ]  # fmt: skip
        (run_dir / "analysis.json").write_text(
            json.dumps({"model": model, "depth": depth, "layers": layers})
        )
    return run_dir


def age(run_dir: Path, seconds: float = 3600.0) -> None:
    """Make a run's files look old (a run killed long ago, not one still running)."""
    old = time.time() - seconds
    for path in run_dir.rglob("*"):
        os.utime(path, (old, old))


def make_sweep(root: Path, analysis: bool = False) -> Path:
    """A sweep: 2 seeds of each net in FINALS, plus incomplete, diverged and failed runs."""
    sweep = root / "sweep"
    for (model, depth), (train, test) in FINALS.items():
        for seed in (0, 1):
            # Seed 1 differs slightly so the std is non-zero.
            write_run(sweep, model, depth, seed, train + 0.002 * seed, test, analysis=analysis)
    age(write_run(sweep, "plain", 56, 2, status=None, iterations=500, malformed=True))
    write_run(sweep, "residual", 56, 3, status="diverged")
    failed = sweep / "model=residual,depth=110,seed=0"
    failed.mkdir(parents=True)
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "message": "OOM"}))
    (sweep / "figures").mkdir()
    (sweep / "figures" / "summary.json").write_text("{}")  # must be ignored
    return sweep


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A synthetic sweep directory."""
    return make_sweep(tmp_path)


def _row(runs: pd.DataFrame, model: str, depth: int, seed: int) -> pd.Series:
    """The single row of a run."""
    rows = runs[(runs["model"] == model) & (runs["depth"] == depth) & (runs["seed"] == seed)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_find_run_dirs_skips_figures(sweep: Path) -> None:
    dirs = find_run_dirs([sweep])
    assert len(dirs) == 8 + 3
    assert all("figures" not in d.parts for d in dirs)


def test_load_runs_table(sweep: Path) -> None:
    with pytest.warns(UserWarning, match="malformed"):
        runs = load_runs([sweep])
    assert len(runs) == 11
    for column in ("run_dir", "experiment", "model", "depth", "shortcut", "family", "dataset",
                   "seed", "status", "iterations", "final_train_error", "final_test_error",
                   "best_test_error", "final_train_loss", "final_test_loss", "param_count",
                   "wall_time_s", "images_per_sec"):  # fmt: skip
        assert column in runs, column
    done = _row(runs, "plain", 56, 1)
    assert done["status"] == "completed"
    assert done["final_train_error"] == pytest.approx(0.202)
    assert done["final_test_error"] == pytest.approx(0.25)
    assert done["param_count"] == 56000
    assert done["dataset"] == "cifar10" and done["experiment"] == "test"
    assert done["values_from"] == "summary" and done["train_error_source"] == "eval"
    assert runs["status"].value_counts().to_dict() == {
        "completed": 8,
        "incomplete": 1,
        "diverged": 1,
        "failed": 1,
    }


def test_incomplete_run_filled_from_metrics(sweep: Path) -> None:
    with pytest.warns(UserWarning):
        runs = load_runs([sweep])
    row = _row(runs, "plain", 56, 2)
    assert row["status"] == "incomplete"
    assert row["iterations"] == 500
    assert row["values_from"] == "metrics" and row["train_error_source"] == "running"
    assert row["final_train_error"] == pytest.approx(_curve(0.1, 500) + 0.004)
    assert row["final_test_error"] == pytest.approx(_curve(0.15, 500))
    assert row["best_test_error"] == pytest.approx(_curve(0.15, 500))


def test_failed_run_kept_with_identity_from_dirname(sweep: Path) -> None:
    with pytest.warns(UserWarning):
        runs = load_runs([sweep])
    row = _row(runs, "residual", 110, 0)
    assert row["status"] == "failed" and row["message"] == "OOM"
    assert math.isnan(row["final_test_error"])
    assert _row(runs, "residual", 56, 3)["status"] == "diverged"


def test_recent_run_without_summary_is_running(tmp_path: Path) -> None:
    write_run(tmp_path, "plain", 20, 0, status=None)
    runs = load_runs([tmp_path])
    assert runs["status"].tolist() == ["running"]


def test_config_only_and_identity_from_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "0"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        "experiment_name: e\nmodel: {name: residual, depth: 32}\nseed: 4\ndataset: {name: digits}\n"
    )
    row = load_runs([run_dir]).iloc[0]
    assert (row["model"], row["depth"], row["seed"], row["dataset"]) == (
        "residual",
        32,
        4,
        "digits",
    )
    assert math.isnan(row["final_test_error"]) and row["values_from"] == "none"


def test_read_metrics_keeps_json_objects_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\n\n[1]\n{"iteration": 2, "tor\n')
    assert read_metrics(path) == [{"iteration": 1}]
    with pytest.warns(UserWarning, match="skipping malformed") as warned:
        assert read_metrics(path, warn=True) == [{"iteration": 1}]
    # lines 3 and 4; the blank line 2 is no error
    assert [str(w.message).split(":")[-2] for w in warned] == ["3", "4"]
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_load_metrics_and_curves(sweep: Path) -> None:
    run_dir = sweep / "model=plain,depth=20,seed=0"
    metrics = load_metrics(run_dir)
    assert metrics["iteration"].is_monotonic_increasing
    train, evals = run_curves(run_dir)
    assert len(train) == 10 and len(evals) == 2
    assert train["train_error"].notna().all() and evals["test_error"].notna().all()
    assert "test_error" not in train and "train_error" not in evals
    assert load_metrics(sweep / "model=residual,depth=110,seed=0").empty


def test_select_final_and_mean_std(sweep: Path) -> None:
    with pytest.warns(UserWarning):
        runs = load_runs([sweep])
    finals = select_final(runs)
    assert set(finals["status"]) == {"completed"}
    assert not finals["partial"].any()
    table = mean_std(finals, ["model", "depth"], ["final_train_error"])
    row = table[(table["model"] == "plain") & (table["depth"] == 56)].iloc[0]
    assert row["n"] == 2
    assert row["final_train_error_mean"] == pytest.approx(0.201)
    assert row["final_train_error_std"] == pytest.approx(0.002 / math.sqrt(2))


def test_select_final_partial_when_nothing_completed(tmp_path: Path) -> None:
    age(write_run(tmp_path, "plain", 20, 0, status=None))
    write_run(tmp_path, "plain", 20, 1, status="diverged")
    finals = select_final(load_runs([tmp_path]))
    assert len(finals) == 1 and finals["partial"].all()


def test_parse_override_dirname() -> None:
    assert parse_override_dirname("+model.depth=56,seed=1,model=plain") == {
        "depth": "56",
        "seed": "1",
        "model": "plain",
    }


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_runs([tmp_path / "nope"])
