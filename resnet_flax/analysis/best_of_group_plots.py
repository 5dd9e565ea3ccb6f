"""Figures of a learning-rate sweep: training error vs lr per depth, and the best vs depth."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D

from resnet_flax.analysis.best_of_group import BestOfGroups
from resnet_flax.analysis.plots import (
    COLUMN_WIDTH,
    FULL_WIDTH,
    STYLE,
    _percent_axis,
    _zero_bottom,
    depth_colors,
    save_figure,
)


def error_vs_lr(result: BestOfGroups, out_dir: str | Path) -> list[Path]:
    """Final training error against the first swept key (log axis), a panel per series and a
    curve per depth; at each value the best over any other swept keys; stars mark the best."""
    key = result.swept[0]
    cells = result.cells
    if cells["final_train_error_mean"].isna().all():
        return []
    series = list(dict.fromkeys(result.best["series"]))
    colors = depth_colors(result.cells["depth"].dropna())
    cols = min(4, len(series))
    rows = math.ceil(len(series) / cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            rows, cols, figsize=(FULL_WIDTH, 1.9 * rows + 0.4), squeeze=False, sharey=True
        )
        for ax, name in zip(axes.flat, series, strict=False):
            _lr_panel(ax, cells[cells["series"] == name], result.best, key, colors)
            ax.set_title(name)
        for ax in list(axes.flat)[len(series) :]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        handles.append(Line2D([], [], color="grey", marker="x", linestyle="", label="diverged"))
        axes.flat[0].legend(handles=handles, loc="best", title="depth")
        _zero_bottom(axes.flat)
        fig.tight_layout()
        return save_figure(fig, out_dir, "error_vs_lr")


def _lr_panel(ax, cells: pd.DataFrame, best: pd.DataFrame, key: str, colors: dict) -> None:
    """One series: a line per depth over the swept values, its best marked with a star, values
    where every run diverged marked with a cross at 100%."""
    for depth, frame in cells.groupby("depth", sort=True):
        color = colors[int(depth)]
        diverged = frame[(frame["n"] == 0) & frame["not_counted"].str.contains("diverged")]
        ax.plot(diverged[key], [1.0] * len(diverged), "x", color=color, markersize=5)
        frame = frame[frame["final_train_error_mean"].notna()]
        line = frame.groupby(key)["final_train_error_mean"].min().sort_index()
        ax.plot(line.index, line.values, marker="o", markersize=3, color=color, label=int(depth))
        star = best[(best["group"].isin(frame["group"])) & (best["depth"] == depth)]
        ax.plot(star[key], star["final_train_error_mean"], "*", color=color, markersize=8)
    ax.set_xscale("log")
    ax.set_xlabel(key)
    _percent_axis(ax, "final training error")


def best_error_vs_depth(result: BestOfGroups, out_dir: str | Path) -> list[Path]:
    """Final training error at each group's best value against depth, one curve per series."""
    best = result.best[result.best["final_train_error_mean"].notna()]
    if best.empty:
        return []
    depths = sorted(int(d) for d in best["depth"].unique())
    cmap = plt.get_cmap("tab10")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH * 1.4, 2.8))
        for i, (name, frame) in enumerate(best.groupby("series", sort=False)):
            frame = frame.sort_values("depth")
            style = "--" if (frame["model"] == "plain").all() else "-"
            ax.plot(
                frame["depth"].astype(int),
                frame["final_train_error_mean"],
                style,
                marker="o",
                markersize=3,
                color=cmap(i % 10),
                label=name,
            )
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("depth (weighted layers)")
        _percent_axis(ax, f"final training error at the best {result.swept[0]}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
        _zero_bottom([ax])
        fig.tight_layout()
        return save_figure(fig, out_dir, "best_error_vs_depth")


def write_best_report(sweep_dir: Path, swept: tuple[str, ...], report: Path) -> list[str]:
    """best_lr.md (or `report`) and its figures for a sweep's runs; the lines to print."""
    from resnet_flax.analysis.best_of_group import best_markdown, best_of_groups, verdict_lines
    from resnet_flax.analysis.runs import load_runs

    runs = load_runs([sweep_dir])
    if runs.empty:
        raise FileNotFoundError(f"no runs found under {sweep_dir}")
    result = best_of_groups(runs, swept)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(best_markdown(result), encoding="utf-8")
    figures = report.parent / "figures"
    paths = [*error_vs_lr(result, figures), *best_error_vs_depth(result, figures)]
    return [*map(str, paths), str(report), *verdict_lines(result)]
