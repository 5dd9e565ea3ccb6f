"""Each group's best learning rate, on fake sweeps with known numbers (no JAX)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from experiments import best_lr
from resnet_flax.analysis.best_of_group import best_markdown, best_of_groups, verdict_lines
from resnet_flax.analysis.best_of_group_plots import best_error_vs_depth, error_vs_lr
from resnet_flax.analysis.runs import load_runs

# Final training error of (model, depth) at lr 0.01, 0.1, 1 (None: the run diverged). The
# deep plain net does best at another lr than the shallow one, and still degrades.
ERRORS = {
    ("plain", 20): (0.10, 0.04, 0.30),
    ("plain", 56): (0.15, 0.20, None),
    ("residual", 20): (0.08, 0.02, 0.05),
    ("residual", 56): (0.06, 0.01, 0.03),
}
LRS = (0.01, 0.1, 1.0)


def write_run(sweep: Path, overrides: dict, summary: dict) -> Path:
    """A run directory as a Hydra sweep job leaves it: overrides, config and summary."""
    run_dir = sweep / ",".join(f"{k}={v}" for k, v in overrides.items())
    (run_dir / ".hydra").mkdir(parents=True)
    items = [f"{k}={v}" for k, v in overrides.items()]
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(items))
    config = {"model": overrides.get("model"), "depth": overrides.get("depth"), "optim": {}}
    config["optim"]["lr"] = overrides.get("optim.lr", 0.1)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def summary(model: str, depth: int, seed: int, error: float | None) -> dict:
    """summary.json of a completed (error given) or diverged (None) run."""
    done = error is not None
    return {
        "status": "completed" if done else "diverged",
        "model": model,
        "depth": depth,
        "seed": seed,
        "dataset": "digits",
        "final_train_error": error + 0.002 * seed if done else None,
        "final_test_error": error + 0.1 if done else None,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """model x depth x lr x 2 seeds; residual-56 never ran at lr 1, one plain-20 seed failed."""
    root = tmp_path / "sweep"
    for (model, depth), errors in ERRORS.items():
        for lr, error in zip(LRS, errors, strict=True):
            for seed in (0, 1):
                if (model, depth, lr) == ("residual", 56, 1.0):
                    continue
                overrides = {"experiment": "x", "model": model, "depth": depth}
                overrides |= {"optim.lr": lr, "seed": seed}
                info = summary(model, depth, seed, error)
                if (model, depth, lr, seed) == ("plain", 20, 1.0, 1):
                    info = {**info, "status": "failed", "final_train_error": None}
                write_run(root, overrides, info)
    return root


def best_row(result, model: str, depth: int):
    """The best-of-group row of one net."""
    best = result.best
    return best[(best["model"] == model) & (best["depth"] == depth)].iloc[0]


def test_each_group_keeps_its_best_lr_and_its_mean_over_seeds(sweep):
    result = best_of_groups(load_runs([sweep]))
    assert result.values == {"optim.lr": [0.01, 0.1, 1.0]}
    assert sorted(result.best["group"]) == sorted(
        f"depth={d},model={m}" for m, d in ERRORS
    )  # seed and lr are not part of a group; the shared experiment=x does not name it
    expected = {  # (lr, mean of seeds 0 and 1, at the grid's edge)
        ("plain", 20): (0.1, 0.041, False),
        ("plain", 56): (0.01, 0.151, True),
        ("residual", 20): (0.1, 0.021, False),
        ("residual", 56): (0.1, 0.011, False),
    }
    for (model, depth), (lr, error, edge) in expected.items():
        row = best_row(result, model, depth)
        assert row["optim.lr"] == lr
        assert row["final_train_error_mean"] == pytest.approx(error)
        # the sample std of two seeds 0.002 apart
        assert row["final_train_error_std"] == pytest.approx(0.002 / math.sqrt(2))
        assert row["final_test_error_mean"] == pytest.approx(error - 0.001 + 0.1)
        assert bool(row["edge"]) is edge
        assert row["n"] == 2


def test_groups_missing_a_value_say_which_and_why(sweep):
    result = best_of_groups(load_runs([sweep]))
    assert best_row(result, "residual", 56)["missing"] == "lr=1: no run"
    assert best_row(result, "plain", 56)["missing"] == "lr=1: 2 diverged"
    assert best_row(result, "plain", 20)["missing"] == "lr=1: 1 failed"  # seed 0 still counts
    cells = result.cells
    cell = cells[(cells["group"] == "depth=20,model=plain") & (cells["optim.lr"] == 1.0)]
    assert cell["n"].item() == 1 and cell["final_train_error_mean"].item() == pytest.approx(0.3)
    text = best_markdown(result)
    assert "| lr=0.01 | lr=0.1 | lr=1 |" in text
    # One key varies besides depth: its value names the group's curve.
    assert "| residual | 56 | 6.10 | 1.10 | no run |" in text
    assert "| plain | 56 | 15.10 | 20.10 | 2 diverged |" in text
    assert "| plain | 20 | 10.10 | 4.10 | 30.00 (1 failed) |" in text
    assert "15.10†" in text  # plain-56's best sits at the smallest lr tried
    assert "| group | depth 20 | depth 56 |" in text
    assert "| plain | 4.10 (lr 0.1) | 15.10† (lr 0.01) |" in text


def test_the_verdict_is_computed_on_the_bests_and_says_so(sweep):
    lines = verdict_lines(best_of_groups(load_runs([sweep])))
    assert lines[0] == (
        "Computed on each group's best final training error over optim.lr = 0.01, 0.1, 1."
    )
    assert lines[1].startswith("- plain DEGRADES: plain training error 4.10% (depth 20)")
    assert "15.10% (depth 56), +11.00 pp" in lines[1]
    assert lines[2].startswith("- residual does not degrade:")
    assert lines[3].startswith("- plain vs residual at their best learning rates: plain DEGRADES")
    assert "residual AVOIDS degradation" in lines[3]


def test_a_depth_where_every_value_diverged_fails_rather_than_shortening_the_trend(tmp_path):
    root = tmp_path / "sweep"
    for depth, errors in ((8, (0.02, 0.01)), (20, (0.03, 0.5)), (56, (None, None))):
        for lr, error in zip((0.01, 0.1), errors, strict=True):
            overrides = {"depth": depth, "optim.lr": lr}
            write_run(root, overrides, summary("plain", depth, 0, error))
    result = best_of_groups(load_runs([root]))
    assert len(error_vs_lr(result, tmp_path / "f")) == 2  # the diverged depth is drawn too
    lines = verdict_lines(result)
    assert lines[1] == (
        "- all FAILS to train at any swept value (depth 56: lr=0.01: 1 diverged; lr=0.1: 1 "
        "diverged); all training error 1.00% (depth 8) -> 3.00% (depth 20), +2.00 pp vs "
        "margin 2.00 pp"
    )


def test_two_swept_keys_choose_the_best_over_both(tmp_path):
    root = tmp_path / "sweep"
    errors = {(0.1, 0.0): 0.3, (0.1, 1e-4): 0.2, (1.0, 0.0): 0.1}  # (1, 1e-4) never ran
    for (lr, wd), error in errors.items():
        overrides = {"depth": 20, "optim.lr": lr, "optim.weight_decay": wd}
        write_run(root, overrides, summary("plain", 20, 0, error))
    result = best_of_groups(load_runs([root]), ("optim.lr", "optim.weight_decay"))
    row = result.best.iloc[0]
    assert (row["optim.lr"], row["optim.weight_decay"]) == (1.0, 0.0)
    assert row["missing"] == "lr=1,weight_decay=0.0001: no run"
    assert result.best["group"].tolist() == ["all"]


def test_figures_and_the_entry_point(sweep, tmp_path, capsys):
    result = best_of_groups(load_runs([sweep]))
    paths = error_vs_lr(result, tmp_path / "f") + best_error_vs_depth(result, tmp_path / "f")
    assert sorted(p.name for p in paths) == [
        "best_error_vs_depth.pdf",
        "best_error_vs_depth.png",
        "error_vs_lr.pdf",
        "error_vs_lr.png",
    ]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert best_lr.main([str(sweep)]) == 0
    assert (sweep / "best_lr.md").read_text().startswith("# Training error at each group's best")
    assert (sweep / "figures" / "error_vs_lr.png").is_file()
    assert "- plain DEGRADES" in capsys.readouterr().out
    assert best_lr.main([str(tmp_path / "nowhere")]) == 2


def test_the_runs_behind_each_groups_best_are_its_completed_seeds(sweep):
    # Fails when a run of another lr or another group is taken for a group's
    # best (its probes would then describe another net than the report's).
    from resnet_flax.analysis.best_of_group import best_run_dirs

    runs = load_runs([sweep])
    dirs = best_run_dirs(runs, best_of_groups(runs))
    names = sorted(d.name for d in dirs)
    best_lrs = {("plain", 20): 0.1, ("plain", 56): 0.01, ("residual", 20): 0.1}
    best_lrs[("residual", 56)] = 0.1
    expected = sorted(
        f"experiment=x,model={m},depth={d},optim.lr={lr},seed={s}"
        for (m, d), lr in best_lrs.items()
        for s in (0, 1)
    )
    assert names == expected
