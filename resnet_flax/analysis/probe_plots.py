"""Figures of the probes: each quantity against depth, per-layer signals, gradient series."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from resnet_flax.analysis.plots import (
    FULL_WIDTH,
    MODEL_COLORS,
    MODEL_LINESTYLES,
    MODEL_MARKERS,
    MODEL_ORDER,
    STYLE,
    _ordered_models,
    _percent_axis,
    depth_colors,
    model_label,
    save_figure,
)

# The quantities drawn against depth: (summary key, panel title, y label).
QUANTITIES = (
    ("lag1", "shattered gradients", "lag-1 autocorrelation of g(t)"),
    ("correlation_length", "shattered gradients", "correlation length (lags)"),
    ("jacobian_std_log_sigma", "input-output Jacobian", "std of ln(singular value)"),
    ("jacobian_log10_condition", "input-output Jacobian", "log10 max/min singular value"),
    ("cosine_last_eval", "last layer, BN eval mode", "cosine of two inputs"),
    ("cosine_last_train", "last layer, BN training mode", "cosine of two inputs"),
    ("second_moment_growth_eval", "signal scale, BN eval mode", "log10 q(last) / q(first)"),
    ("gradient_norm_ratio", "gradient flow", "log10 |grad first| / |grad last|"),
)
STATE_STYLES = {
    "init": {"linestyle": "--", "markerfacecolor": "white"},
    "trained": {"linestyle": "-"},
}
STATE_LABELS = {"init": "at init", "trained": "trained"}
# Nets other than the papers' (model options: plain-nobn-tat-suo_delta) take these colours in
# turn: tab10 without the papers' red, blue and green.
OTHER_NET_COLORS = ("#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def probe_table(records: Sequence[dict]) -> pd.DataFrame:
    """One row per result: identity fields and the summary quantities."""
    keys = ("model", "depth", "seed", "state", "iteration", "final_train_error")
    rows = [{**{k: r.get(k) for k in keys}, "net": net_of(r), **r["summary"]} for r in records]
    return pd.DataFrame(rows)


def net_of(record: dict) -> str:
    """A result's net: its model and non-default options (records before options: the model)."""
    return record.get("net") or record["model"]


def net_colors(nets: Sequence[str]) -> dict[str, str]:
    """A colour per net: the papers' nets keep theirs, the others take OTHER_NET_COLORS."""
    others = [n for n in _ordered_models(nets) if n not in MODEL_COLORS]
    cycle = {n: OTHER_NET_COLORS[i % len(OTHER_NET_COLORS)] for i, n in enumerate(others)}
    return {n: MODEL_COLORS.get(n) or cycle[n] for n in set(nets)}


def seed_means(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of every quantity over seeds (and runs) per (net, depth, state)."""
    columns = [q for q, _, _ in QUANTITIES if q in table]
    return table.groupby(["net", "depth", "state"], as_index=False)[columns].mean()


def probes_vs_depth(records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Each probe against depth, one line per family and state; final training error too."""
    table = probe_table(records)
    means = seed_means(table)
    trained = table[(table["state"] == "trained") & table["final_train_error"].notna()]
    panels = len(QUANTITIES) + (0 if trained.empty else 1)
    cols = 3
    rows = -(-panels // cols)
    colors = net_colors(list(table["net"]))
    legend_rows = -(-2 * len(colors) // 3)  # a line per net and state, three to a row
    with plt.rc_context(STYLE):
        height = 2.0 * rows + 0.16 * legend_rows
        fig, axes = plt.subplots(rows, cols, figsize=(FULL_WIDTH, height), squeeze=False)
        flat = list(axes.ravel())
        for ax, (key, title, ylabel) in zip(flat, QUANTITIES, strict=False):
            _depth_lines(ax, means, key, colors)
            ax.set_title(title)
            ax.set_ylabel(ylabel)
        if not trained.empty:
            groups = trained.groupby(["net", "depth", "state"], as_index=False)
            ax = flat[len(QUANTITIES)]
            _depth_lines(ax, groups["final_train_error"].mean(), "final_train_error", colors)
            ax.set_title("final training error")
            _percent_axis(ax, "training error")
        for ax in flat[panels:]:
            ax.set_visible(False)
        for ax in flat[:panels]:
            ax.set_xlabel("depth")
            ax.set_xticks(sorted(means["depth"].unique()))
        handles, labels = flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
        fig.tight_layout(rect=(0, 0.16 * legend_rows / height + 0.01, 1, 1))
        return save_figure(fig, out_dir, "probes_vs_depth")


def _depth_lines(ax, means: pd.DataFrame, key: str, colors: dict[str, str]) -> None:
    """One line per (net, state) of `key` against depth."""
    for model in _ordered_models(means["net"]):
        for state, style in STATE_STYLES.items():
            rows = means[(means["net"] == model) & (means["state"] == state)]
            if rows.empty:
                continue
            rows = rows.sort_values("depth")
            style = {**style, "color": colors[model], "markersize": 3}
            label = f"{model_label(model)} {STATE_LABELS[state]}"
            ax.plot(
                rows["depth"], rows[key], marker=MODEL_MARKERS.get(model, "o"), label=label, **style
            )


def signal_layers(records: Sequence[dict], state: str, out_dir: str | Path) -> list[Path]:
    """Per-layer second moment and cosine of two inputs, BN training and eval mode."""
    chosen = [r for r in records if r["state"] == state]
    if not chosen:
        return []
    colors = depth_colors(r["depth"] for r in chosen)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(FULL_WIDTH, 5.0), sharex=True)
        for row, mode in enumerate(("train", "eval")):
            means = _layer_means(chosen, mode)
            for (model, depth), layers in means.items():
                style = {"color": colors[depth], "linestyle": MODEL_LINESTYLES.get(model, "-")}
                x = np.arange(1, len(layers) + 1)
                label = model_label(model, depth)
                axes[row][0].plot(x, layers[:, 0], label=label, **style)
                axes[row][1].plot(x, layers[:, 1], label=label, **style)
            q = np.concatenate([layers[:, 0] for layers in means.values()])
            if q.min() > 0 and q.max() / q.min() > 10:  # scales that drift over decades
                axes[row][0].set_yscale("log")
            else:
                axes[row][0].ticklabel_format(axis="y", useOffset=False)
            axes[row][0].set_ylabel("second moment q")
            axes[row][1].set_ylabel("cosine of two inputs")
            axes[row][0].set_title(f"BN {mode} mode")
            axes[row][1].set_title(f"BN {mode} mode")
        for ax in axes[1]:
            ax.set_xlabel("branch layer (input to output)")
        axes[0][1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.suptitle(f"signal propagation, {STATE_LABELS[state]}")
        fig.tight_layout()
        return save_figure(fig, out_dir, f"signal_propagation_{state}")


def _layer_means(records: Sequence[dict], mode: str) -> dict[tuple, np.ndarray]:
    """{(model, depth): (layers, 2) second moment and cosine, mean over seeds}."""
    groups: dict[tuple, list] = {}
    for r in records:
        values = [(x["second_moment"], x["cosine"]) for x in r["signal"][mode]]
        groups.setdefault((net_of(r), int(r["depth"])), []).append(values)
    return {
        k: np.mean(np.asarray(groups[k], float), axis=0) for k in sorted(groups, key=_net_order)
    }


def shattered_gradients(records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Balduzzi et al. Fig. 1 style: g(t) along one line for the deepest nets at init, and
    the mean autocorrelation against lag for every net at init."""
    init = [r for r in records if r["state"] == "init"]
    if not init:
        return []
    deepest = max(r["depth"] for r in init)
    colors = depth_colors(r["depth"] for r in init)
    by_net = net_colors([net_of(r) for r in init])
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.6))
        shown = set()
        for r in init:
            key = (net_of(r), r["depth"])
            if r["depth"] == deepest and key not in shown:
                shown.add(key)
                g = np.asarray(r["shattered"]["example"], float)
                t = np.linspace(-r["probe"]["span"], r["probe"]["span"], len(g))
                style = {"color": by_net[key[0]], "linewidth": 0.7}
                left.plot(t, g / (np.max(np.abs(g)) or 1.0), label=model_label(*key), **style)
        left.set_xlabel("t (position on the line)")
        left.set_ylabel("g(t) / max |g|")
        left.legend(loc="lower right")
        for (model, depth), acfs in _acf_means(init).items():
            style = {"color": colors[depth], "linestyle": MODEL_LINESTYLES.get(model, "-")}
            right.plot(np.arange(len(acfs)), acfs, label=model_label(model, depth), **style)
        right.axhline(0.5, color="grey", linewidth=0.6)
        right.set_xlabel("lag")
        right.set_ylabel("autocorrelation of g")
        right.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        return save_figure(fig, out_dir, "shattered_gradients")


def _acf_means(records: Sequence[dict]) -> dict[tuple, np.ndarray]:
    """{(model, depth): mean autocorrelation over seeds}, plain first, shallow first."""
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((net_of(r), int(r["depth"])), []).append(
            r["shattered"]["autocorrelation"]
        )
    with warnings.catch_warnings():  # a net with no gradient at init (Fixup): NaN, no noise
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            k: np.nanmean(np.asarray(groups[k], float), axis=0)
            for k in sorted(groups, key=_net_order)
        }


def _net_order(key: tuple) -> tuple:
    """Sort key of (model, depth): plain, ResNet, pre-act, others; shallow first."""
    model, depth = key
    return (MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER), depth)


def probe_figures(records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Every probe figure the records allow (PNG + PDF)."""
    paths = probes_vs_depth(records, out_dir)
    paths += shattered_gradients(records, out_dir)
    for state in STATE_STYLES:
        paths += signal_layers(records, state, out_dir)
    return paths
