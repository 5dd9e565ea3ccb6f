"""Degradation figures (He et al. 2015 Figs. 1, 6, 7 and error vs depth) from run tables."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only: no display on clusters or in CI.

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from resnet_flax.analysis.runs import load_analyses, load_curves, mean_std, select_final  # noqa: E402
from resnet_flax.rundir import RunStatus  # noqa: E402

log = logging.getLogger(__name__)

FULL_WIDTH = 7.0  # inches: a two-column paper's text width
COLUMN_WIDTH = 3.4  # inches: one column
MODEL_ORDER = ("plain", "residual", "preact")
MODEL_LABELS = {"plain": "plain", "residual": "ResNet", "preact": "pre-act ResNet"}
MODEL_COLORS = {"plain": "#d62728", "residual": "#1f77b4", "preact": "#2ca02c"}
# Within-figure model distinction when colour already encodes depth.
MODEL_LINESTYLES = {"plain": "--", "residual": "-", "preact": ":"}
MODEL_MARKERS = {"plain": "s", "residual": "o", "preact": "^"}
DEEP_RESIDUAL = 110  # Fig. 6 right panel: ResNet-110 and deeper.
DIVERGED = "diverged"  # curve column: the run diverged, so its curve is drawn alone, marked
# Two training errors, which can differ several-fold: the curves show the
# running mean over each log interval in training mode (augmented batches, batch statistics,
# weights still moving); a run's final one is measured afterwards in eval mode on the whole
# training set (streamed datasets, too large for that pass, keep the last running one).
RUNNING_TRAIN = "training error: running mean of each log interval, training mode"
EVAL_TEST = "test error: whole test set, eval mode"
FINAL_TRAIN = {
    "eval": "final training error: whole training set, eval mode",
    "running": "final training error: last log interval's running mean, training mode",
    "mixed": "final training error: eval mode on the whole set (running where not measured)",
}
STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.0,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "savefig.bbox": "tight",
}


def depth_colors(depths: Iterable[int]) -> dict[int, tuple]:
    """Fixed depth -> colour map over the sorted depths (shallow = light, deep = dark)."""
    unique = sorted({int(d) for d in depths if not pd.isna(d)})
    cmap = plt.get_cmap("viridis_r")
    # Stay inside [0.15, 1]: the lightest viridis yellow is unreadable on white.
    positions = np.linspace(0.15, 1.0, len(unique)) if len(unique) > 1 else [0.6]
    return {depth: cmap(pos) for depth, pos in zip(unique, positions, strict=True)}


def model_label(model: str, depth: int | None = None) -> str:
    """Legend label such as 'plain-56' or 'ResNet-110'."""
    name = MODEL_LABELS.get(model, str(model))
    return name if depth is None else f"{name}-{int(depth)}"


def save_figure(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Save a figure as PNG and PDF under ``out_dir``, close it and return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=200)
    plt.close(fig)
    return paths


def _iteration_axis(ax: plt.Axes) -> None:
    """Label an iteration x axis, writing large counts as '32k'."""
    ax.set_xlabel("iterations")
    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda x, _: f"{x / 1000:g}k" if abs(x) >= 1000 else f"{x:g}")
    )


def _percent_axis(ax: plt.Axes, label: str) -> None:
    """Label a y axis that shows errors (fractions in files) as percent."""
    ax.set_ylabel(f"{label} (%)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{100 * y:.3g}%"))


def _zero_bottom(axes: Iterable[plt.Axes]) -> None:
    """Start y axes just below 0 (a line at 0% stays visible); call after drawing all panels."""
    for ax in axes:
        ax.set_ylim(bottom=-0.02 * ax.get_ylim()[1])


def seed_mean_curve(curves: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean of a curve column over seeds per (model, depth, iteration)."""
    curves = curves[curves[value].notna()]
    return mean_std(curves.astype({value: float}), ["model", "depth", "iteration"], [value])


def _plot_curves(ax, curves, value, colors, linestyle="-", linewidth=1.0, label=True) -> None:
    """Draw one seed-averaged line per (model, depth) of ``curves[value]``; diverged runs'
    curves (column DIVERGED) are drawn one by one, never averaged."""
    style = {"linestyle": linestyle, "linewidth": linewidth}
    diverged = curves.get(DIVERGED, pd.Series(False, index=curves.index)).astype(bool)
    for (model, depth), line in seed_mean_curve(curves[~diverged], value).groupby(
        ["model", "depth"]
    ):
        ax.plot(
            line["iteration"],
            line[f"{value}_mean"],
            color=colors.get(int(depth), "grey"),
            label=model_label(model, depth) if label else None,
            **style,
        )
    _plot_diverged(ax, curves[diverged], value, colors, style, label)


def _plot_diverged(ax, curves, value, colors, style: dict, label: bool) -> None:
    """Each diverged run's own curve: an 'x' at its last point, '(diverged)' in its label."""
    for _, line in curves[curves[value].notna()].groupby("run_dir"):
        line, first = line.sort_values("iteration"), line.iloc[0]
        seed = "" if pd.isna(first["seed"]) else f" seed {int(first['seed'])}"
        ax.plot(
            line["iteration"],
            line[value].astype(float),
            color=colors.get(int(first["depth"]), "grey"),
            marker="x",
            markevery=[len(line) - 1],
            label=f"{model_label(first['model'], first['depth'])}{seed} (diverged)"
            if label
            else None,
            **style,
        )


def mark_diverged(curves: pd.DataFrame, diverged: pd.DataFrame) -> pd.DataFrame:
    """The curves with column DIVERGED: whether each line belongs to a run in ``diverged``."""
    return curves.assign(**{DIVERGED: curves["run_dir"].isin(set(diverged["run_dir"]))})


def fig1_plain(
    train: pd.DataFrame, evals: pd.DataFrame, colors: dict[int, tuple], out_dir: str | Path
) -> list[Path]:
    """Fig. 1: plain nets' training error (left) and test error (right) vs iterations."""
    train, evals = train[train["model"] == "plain"], evals[evals["model"] == "plain"]
    if train.empty and evals.empty:
        log.info("fig1_plain skipped: no plain runs with metrics")
        return []
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.6), sharex=True, sharey=True)
        _plot_curves(left, train, "train_error", colors)
        _plot_curves(right, evals, "test_error", colors, linewidth=1.5)
        for ax, label, title in (
            (left, "training error", RUNNING_TRAIN),
            (right, "test error", EVAL_TEST),
        ):
            _iteration_axis(ax)
            _percent_axis(ax, label)
            ax.set_title(title)
            ax.legend(loc="upper right")
        right.yaxis.set_tick_params(labelleft=True)
        _zero_bottom((left, right))
        fig.tight_layout()
        return save_figure(fig, out_dir, "fig1_plain")


def fig6_panel_specs(finals: pd.DataFrame) -> list[tuple[str, str, list[int]]]:
    """Fig. 6 panels as (title, model, depths): plain, ResNet, deep ResNet, pre-act."""
    depths = {m: sorted(int(d) for d in g["depth"].unique()) for m, g in finals.groupby("model")}
    panels = []
    if depths.get("plain"):
        panels.append(("plain", "plain", depths["plain"]))
    residual = depths.get("residual", [])
    if residual and max(residual) > DEEP_RESIDUAL:
        # As the paper: 20-110 in the middle panel, 110 and deeper on the right.
        panels.append(("ResNet", "residual", [d for d in residual if d <= DEEP_RESIDUAL]))
        panels.append(("deep ResNet", "residual", [d for d in residual if d >= DEEP_RESIDUAL]))
    elif residual:
        panels.append(("ResNet", "residual", residual))
    if depths.get("preact"):
        panels.append(("pre-act ResNet", "preact", depths["preact"]))
    return [panel for panel in panels if panel[2]]


def fig6_panels(
    train: pd.DataFrame,
    evals: pd.DataFrame,
    finals: pd.DataFrame,
    colors: dict[int, tuple],
    out_dir: str | Path,
) -> list[Path]:
    """Fig. 6: one panel per net family; dashed = training error (running, training mode),
    bold = test error (eval mode)."""
    panels = fig6_panel_specs(finals)
    if not panels:
        log.info("fig6_panels skipped: no runs with curves")
        return []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            1, len(panels), figsize=(FULL_WIDTH, 2.6), sharey=True, squeeze=False
        )
        for ax, (title, model, depths) in zip(axes[0], panels, strict=True):
            pick_train = train[(train["model"] == model) & train["depth"].isin(depths)]
            pick_eval = evals[(evals["model"] == model) & evals["depth"].isin(depths)]
            _plot_curves(ax, pick_train, "train_error", colors, "--", 0.8, label=False)
            _plot_curves(ax, pick_eval, "test_error", colors, "-", 1.6)
            ax.set_title(title)
            _iteration_axis(ax)
            _percent_axis(ax, "error")
            handles, _ = ax.get_legend_handles_labels()
            ax.legend(handles=[*handles, *_train_test_handles()], loc="upper right")
        _zero_bottom(axes[0])
        fig.tight_layout()
        return save_figure(fig, out_dir, "fig6_panels")


def _train_test_handles() -> list[Line2D]:
    """Legend entries explaining the line styles of Fig. 6."""
    return [
        Line2D([], [], color="grey", linestyle="--", linewidth=0.8, label="train (running)"),
        Line2D([], [], color="grey", linestyle="-", linewidth=1.6, label="test (eval mode)"),
    ]


def degradation_curve(finals: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Final training and test error vs depth per model, mean ± std over seeds."""
    table = mean_std(finals, ["model", "depth"], ["final_train_error", "final_test_error"])
    if table.empty:
        log.info("degradation_curve skipped: no runs with final values")
        return []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.6), sharey=True)
        for ax, value, label, title in (
            (axes[0], "final_train_error", "final training error", final_train_title(finals)),
            (axes[1], "final_test_error", "final test error", EVAL_TEST),
        ):
            _plot_error_vs_depth(ax, table, value)
            ax.set_xlabel("depth (weighted layers)")
            _percent_axis(ax, label)
            ax.set_title(title)
            ax.legend(loc="best")
        axes[1].yaxis.set_tick_params(labelleft=True)
        _zero_bottom(axes)
        fig.tight_layout()
        return save_figure(fig, out_dir, "degradation_curve")


def final_train_title(finals: pd.DataFrame) -> str:
    """Which training error the runs' final values are: eval mode, running, or both."""
    sources = set(finals.get("train_error_source", pd.Series(dtype=object)).dropna())
    if sources == {"running"}:
        return FINAL_TRAIN["running"]
    return FINAL_TRAIN["mixed"] if "running" in sources else FINAL_TRAIN["eval"]


def _plot_error_vs_depth(ax: plt.Axes, table: pd.DataFrame, value: str) -> None:
    """One errorbar line per model of ``<value>_mean`` ± ``<value>_std`` against depth."""
    for model in _ordered_models(table["model"]):
        rows = table[table["model"] == model].sort_values("depth")
        ax.errorbar(
            rows["depth"].astype(int),
            rows[f"{value}_mean"],
            yerr=rows[f"{value}_std"].fillna(0.0),
            color=MODEL_COLORS.get(model),
            marker=MODEL_MARKERS.get(model, "o"),
            markersize=3,
            capsize=2,
            label=model_label(model),
        )
    depths = sorted(int(d) for d in table["depth"].unique())
    if depths[-1] / max(depths[0], 1) > 20:  # 20..1202 spans decades
        ax.set_xscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _ordered_models(models: Iterable[str]) -> list[str]:
    """Models present, in the canonical plain/residual/preact order, others after."""
    present = set(models)
    return [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))


def _layer_lines(layers: pd.DataFrame, value: str) -> pd.DataFrame:
    """Seed mean of a per-layer value per (model, depth, layer index)."""
    layers = layers[layers[value].notna()].astype({value: float})
    return mean_std(layers, ["model", "depth", "index"], [value])


def _plot_layers(ax, lines: pd.DataFrame, value: str, colors, sort: bool = False) -> None:
    """One line per (model, depth) of a per-layer value, optionally sorted descending."""
    for model in _ordered_models(lines["model"]):
        for depth, line in lines[lines["model"] == model].groupby("depth"):
            y = line.sort_values("index")[f"{value}_mean"].to_numpy()
            if sort:
                y = np.sort(y)[::-1]
            ax.plot(
                np.arange(1, len(y) + 1),
                y,
                color=colors.get(int(depth), "grey"),
                linestyle=MODEL_LINESTYLES.get(model, "-"),
                marker=MODEL_MARKERS.get(model) if len(y) <= 25 else None,
                markersize=2,
                label=model_label(model, depth),
            )


def layer_response_std(
    layers: pd.DataFrame, colors: dict[int, tuple], out_dir: str | Path
) -> list[Path]:
    """Fig. 7: std of each 3x3 layer's response, in layer order (top) and sorted (bottom)."""
    if layers.empty or layers["response_std"].isna().all():
        log.info("layer_response_std skipped: no run has analysis.json with response_std")
        return []
    lines = _layer_lines(layers, "response_std")
    with plt.rc_context(STYLE):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(COLUMN_WIDTH * 1.4, 4.4))
        _plot_layers(top, lines, "response_std", colors)
        _plot_layers(bottom, lines, "response_std", colors, sort=True)
        top.set_xlabel("layer index (original)")
        bottom.set_xlabel("layer index (sorted by magnitude)")
        for ax in (top, bottom):
            ax.set_ylabel("std of response")
            ax.set_ylim(bottom=0)
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        return save_figure(fig, out_dir, "layer_response_std")


def gradient_flow(
    layers: pd.DataFrame, colors: dict[int, tuple], out_dir: str | Path
) -> list[Path]:
    """Per-layer gradient norm at initialisation (left) and after training (right), log y."""
    values = [v for v in ("grad_norm_init", "grad_norm_final") if layers[v].notna().any()]
    if layers.empty or not values:
        log.info("gradient_flow skipped: no run has analysis.json with gradient norms")
        return []
    titles = {"grad_norm_init": "at initialisation", "grad_norm_final": "end of training"}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            1, len(values), figsize=(FULL_WIDTH, 2.6), sharey=True, squeeze=False
        )
        for ax, value in zip(axes[0], values, strict=True):
            _plot_layers(ax, _layer_lines(layers, value), value, colors)
            ax.set_yscale("log")
            ax.set_title(titles[value])
            ax.set_xlabel("layer index (input to output)")
            ax.set_ylabel("gradient norm (L2, weights)")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        return save_figure(fig, out_dir, "gradient_flow")


def make_all_figures(runs: pd.DataFrame, out_dir: str | Path) -> dict[str, list[Path]]:
    """Write every applicable figure for a run table; returns name -> written paths."""
    finals = select_final(runs)
    colors = depth_colors(runs["depth"].dropna())
    known = runs[runs["model"].notna() & runs["depth"].notna()]
    # Diverged runs stay out of every average, but their curves show where they broke down.
    diverged = known[known["status"] == RunStatus.DIVERGED]
    drawn = pd.concat([f for f in (finals, diverged) if not f.empty] or [finals])
    train, evals = (mark_diverged(c, diverged) for c in load_curves(drawn))
    layers = load_analyses(known)
    written = {
        "fig1_plain": fig1_plain(train, evals, colors, out_dir),
        "fig6_panels": fig6_panels(train, evals, drawn, colors, out_dir),
        "degradation_curve": degradation_curve(finals, out_dir),
        "layer_response_std": layer_response_std(layers, colors, out_dir),
        "gradient_flow": gradient_flow(layers, colors, out_dir),
    }
    return {name: paths for name, paths in written.items() if paths}
