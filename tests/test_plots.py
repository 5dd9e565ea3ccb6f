"""Tests that every figure is written as non-empty PNG and PDF (no JAX)."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # share the run builders of test_runs
from test_runs import make_sweep, write_run  # noqa: E402

from experiments.plot import main  # noqa: E402
from resnet_flax.analysis.plots import (  # noqa: E402
    depth_colors,
    fig1_plain,
    fig6_panel_specs,
    gradient_flow,
    layer_response_std,
    make_all_figures,
)
from resnet_flax.analysis.runs import load_analyses, load_curves, load_runs, select_final  # noqa: E402
from resnet_flax.analysis.sweep_report import output_dirs  # noqa: E402

ALL_FIGURES = {
    "fig1_plain",
    "fig6_panels",
    "degradation_curve",
    "layer_response_std",
    "gradient_flow",
}


def _load(path: Path):
    """Load runs, silencing the expected malformed-line warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_runs([path])


def _assert_written(paths: list[Path]) -> None:
    """PNG and PDF exist and are non-empty."""
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000, path


def test_all_figures_written(tmp_path: Path) -> None:
    runs = _load(make_sweep(tmp_path, analysis=True))
    written = make_all_figures(runs, tmp_path / "figs")
    assert set(written) == ALL_FIGURES
    for paths in written.values():
        _assert_written(paths)


def test_analysis_figures_skipped_without_analysis(tmp_path: Path, caplog) -> None:
    write_run(tmp_path, "plain", 20, 0)
    runs = _load(tmp_path)
    layers, colors = load_analyses(runs), depth_colors(runs["depth"])
    with caplog.at_level("INFO"):
        assert layer_response_std(layers, colors, tmp_path / "figs") == []
        assert gradient_flow(layers, colors, tmp_path / "figs") == []
    assert "layer_response_std skipped" in caplog.text
    assert "gradient_flow skipped" in caplog.text


def test_residual_only_sweep_has_no_fig1(tmp_path: Path) -> None:
    write_run(tmp_path, "residual", 20, 0)
    finals = select_final(_load(tmp_path))
    train, evals = load_curves(finals)
    assert fig1_plain(train, evals, depth_colors([20]), tmp_path / "figs") == []
    assert fig6_panel_specs(finals) == [("ResNet", "residual", [20])]


def test_depth_colors_fixed_and_distinct() -> None:
    colors = depth_colors([56, 20, 110, 20])
    assert list(colors) == [20, 56, 110]
    assert len(set(colors.values())) == 3
    assert depth_colors([20, 56, 110])[56] == colors[56]


def test_fig6_deep_panel(tmp_path: Path) -> None:
    for depth in (20, 110, 1202):
        write_run(tmp_path, "residual", depth, 0)
    write_run(tmp_path, "plain", 20, 0)
    specs = fig6_panel_specs(select_final(_load(tmp_path)))
    assert specs == [
        ("plain", "plain", [20]),
        ("ResNet", "residual", [20, 110]),
        ("deep ResNet", "residual", [110, 1202]),
    ]


@pytest.mark.filterwarnings("ignore:.*malformed")
def test_cli_writes_figures_and_report(tmp_path: Path, capsys) -> None:
    sweep = make_sweep(tmp_path)
    assert main([str(sweep)]) == 0
    _assert_written(sorted((sweep / "figures").glob("fig6_panels.*")))
    assert (sweep / "report.md").is_file()
    out = capsys.readouterr().out
    assert "verdict [cifar10]: plain DEGRADES" in out


def test_output_dirs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    assert output_dirs([sweep], None) == (sweep.resolve() / "figures", sweep.resolve())
    runs = [sweep / "a", sweep / "b"]
    assert output_dirs(runs, None) == (sweep.resolve() / "figures", sweep.resolve())
    out = tmp_path / "o" / "figs"
    assert output_dirs(runs, out) == (out, (tmp_path / "o").resolve())


def test_cli_out(tmp_path: Path) -> None:
    run = write_run(tmp_path / "s", "plain", 20, 0)
    assert main([str(run), "--out", str(tmp_path / "o" / "figs")]) == 0
    assert (tmp_path / "o" / "figs" / "fig1_plain.png").is_file()
    assert (tmp_path / "o" / "report.md").is_file()


def test_cli_no_runs(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path)]) == 1
    assert "no runs found" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("status", ["failed", "diverged"])
def test_only_broken_runs_do_not_crash(tmp_path: Path, status: str) -> None:
    write_run(tmp_path, "plain", 20, 0, status=status)
    make_all_figures(_load(tmp_path), tmp_path / "figs")


def test_diverged_run_curve_is_marked_not_averaged(tmp_path: Path, monkeypatch) -> None:
    from resnet_flax.analysis import plots

    for seed in (0, 1):
        write_run(tmp_path, "plain", 20, seed, final_train=0.05)
    write_run(tmp_path, "plain", 20, 7, final_train=0.9, status="diverged", iterations=500)
    figures = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, _, name: figures.update({name: fig}))
    make_all_figures(_load(tmp_path), tmp_path / "figs")
    for name in ("fig1_plain", "fig6_panels"):
        lines = {line.get_label(): line for line in figures[name].axes[0].get_lines()}
        marked = lines["plain-20 seed 7 (diverged)"]
        x, _ = marked.get_data()
        assert marked.get_marker() == "x" and marked.get_markevery() == [len(x) - 1], name
        assert x[-1] == 500, name  # the curve ends where the run stopped
    # fig1's left panel: training error; the seed mean of plain-20 holds seeds 0 and 1 only
    lines = {line.get_label(): line for line in figures["fig1_plain"].axes[0].get_lines()}
    assert lines["plain-20 seed 7 (diverged)"].get_data()[1][-1] > 0.5
    x, y = lines["plain-20"].get_data()
    seed_mean = 0.05 + 0.85 * math.exp(-1000 / 200) + 0.001  # test_runs._curve, seeds 0 and 1
    assert x[-1] == 1000 and y[-1] == pytest.approx(seed_mean)


def test_figures_say_which_training_error_they_show(tmp_path: Path, monkeypatch) -> None:
    # Fails when a training curve (running mean of each log interval, training mode) and a
    # final training error (eval mode, whole training set) carry the same unqualified label.
    from resnet_flax.analysis import plots

    figures = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, _, name: figures.update({name: fig}))
    make_all_figures(_load(make_sweep(tmp_path)), tmp_path / "figs")
    curves, tests = (ax.get_title() for ax in figures["fig1_plain"].axes[:2])
    assert "running" in curves and "training mode" in curves and "eval mode" in tests
    legend = [t.get_text() for t in figures["fig6_panels"].axes[0].get_legend().get_texts()]
    assert "train (running)" in legend and "test (eval mode)" in legend
    final = figures["degradation_curve"].axes[0].get_title()
    assert final == plots.FINAL_TRAIN["eval"] and "whole training set" in final
    # Runs without a summary yet: their final training error is the last running mean.
    figures.clear()
    for depth in (20, 56):
        write_run(tmp_path / "partial", "plain", depth, 0, status=None)
    make_all_figures(_load(tmp_path / "partial"), tmp_path / "figs2")
    assert figures["degradation_curve"].axes[0].get_title() == plots.FINAL_TRAIN["running"]
