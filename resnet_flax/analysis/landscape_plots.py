"""Figures of loss landscapes as in Li et al. 2018: contours (Fig. 5), surfaces (Fig. 1), 1-D
slices, and the PCA trajectory over the loss contours of its plane; nets side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from resnet_flax.analysis.plots import (
    FULL_WIDTH,
    MODEL_COLORS,
    MODEL_ORDER,
    STYLE,
    model_label,
    save_figure,
)

# Contour levels of the loss: 20 steps up to at most 10 (Li et al.'s plots: 0.5 apart up to 10),
# higher values clipped.
LEVELS, LOSS_CAP = 21, 10.0


def _ordered(records: Sequence[dict]) -> list[dict]:
    """Records plain first, then ResNet, then by depth (side by side at equal depth)."""

    def key(r: dict) -> tuple:
        model = r["model"]
        return (r["depth"], MODEL_ORDER.index(model) if model in MODEL_ORDER else 9)

    return sorted(records, key=key)


def _title(record: dict) -> str:
    """'plain-56 (iteration 110)'."""
    return f"{model_label(record['model'], record['depth'])} (iteration {record['step']})"


def _levels(records: Sequence[dict], key: str) -> np.ndarray:
    """Shared contour levels from the lowest loss of any panel up to the cap."""
    low = min(float(np.min(r[key])) for r in records)
    high = min(max(float(np.max(r[key])) for r in records), LOSS_CAP)
    return np.linspace(low, max(high, low + 1e-3), LEVELS)


def landscape_contours(records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """2-D training-loss contours around each net's parameters (filter-normalised axes)."""
    records = _ordered(records)
    levels = _levels(records, "loss_2d")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(records), figsize=(3.2 * len(records), 3.0), squeeze=False)
        for ax, r in zip(axes[0], records, strict=True):
            loss = np.minimum(np.asarray(r["loss_2d"]), LOSS_CAP)
            contours = ax.contour(r["xs"], r["ys"], loss.T, levels=levels, cmap="viridis")
            ax.clabel(contours, contours.levels[::4], fontsize=5, fmt="%.2g")
            ax.plot([0], [0], marker="*", color="black", markersize=6)
            ax.set_title(_title(r))
            ax.set_xlabel("direction 1 (filter-normalised)")
            ax.set_ylabel("direction 2")
            ax.set_aspect("equal")
        fig.tight_layout()
        return save_figure(fig, out_dir, "landscape_contours")


def landscape_surfaces(records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """The same loss as 3-D surfaces (Li et al. Fig. 1), loss clipped at the cap."""
    records = _ordered(records)
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(3.2 * len(records), 3.0))
        for i, r in enumerate(records, start=1):
            ax = fig.add_subplot(1, len(records), i, projection="3d")
            a, b = np.meshgrid(r["xs"], r["ys"], indexing="ij")
            loss = np.minimum(np.asarray(r["loss_2d"]), LOSS_CAP)
            ax.plot_surface(a, b, loss, cmap="viridis", linewidth=0, antialiased=True)
            ax.set_title(_title(r))
            ax.set_zlabel("training loss")
        fig.tight_layout()
        return save_figure(fig, out_dir, "landscape_surfaces")


def landscape_slices(records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """1-D slices: training loss (left) and error (right) against alpha, one line per net."""
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.6))
        for r in _ordered(records):
            style = {"color": MODEL_COLORS.get(r["model"]), "label": _title(r)}
            style["linestyle"] = "-" if r["model"] != "plain" else "--"
            left.plot(r["alphas"], r["loss_1d"], **style)
            right.plot(r["alphas"], 100 * np.asarray(r["error_1d"]), **style)
        left.set_yscale("log")  # a chaotic net's loss spans decades
        left.set_ylabel("training loss")
        right.set_ylabel("training error (%)")
        for ax in (left, right):
            ax.set_xlabel("alpha (filter-normalised direction 1)")
        left.legend(loc="upper center")
        fig.tight_layout()
        return save_figure(fig, out_dir, "landscape_slices")


def trajectory(records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Each run's checkpoints projected on the PCA plane, over that plane's loss contours."""
    records = [r for r in _ordered(records) if "trajectory" in r]
    if not records:
        return []
    levels = _levels(records, "plane_loss")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(records), figsize=(3.4 * len(records), 3.0), squeeze=False)
        for ax, r in zip(axes[0], records, strict=True):
            loss = np.minimum(np.asarray(r["plane_loss"]), LOSS_CAP)
            xs, ys = r["plane_xs"], r["plane_ys"]
            contours = ax.contour(xs, ys, loss.T, levels=levels, cmap="viridis")
            ax.clabel(contours, contours.levels[::4], fontsize=5, fmt="%.2g")
            path = np.asarray(r["trajectory"])
            ax.plot(path[:, 0], path[:, 1], color="#d62728", marker=".", markersize=4)
            for (x, y), step in ((path[0], r["trajectory_steps"][0]), (path[-1], r["step"])):
                ax.annotate(str(step), (x, y), xytext=(3, 3), textcoords="offset points")
            first, second = r["explained_variance"]
            ax.set_xlabel(f"1st PC: {100 * first:.1f}%")
            ax.set_ylabel(f"2nd PC: {100 * second:.1f}%")
            ax.set_title(_title(r))
        fig.tight_layout()
        return save_figure(fig, out_dir, "trajectory")


def landscape_figures(records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Every landscape figure (PNG + PDF) for the records, nets side by side."""
    if not records:
        return []
    paths = landscape_contours(records, out_dir)
    paths += landscape_surfaces(records, out_dir)
    paths += landscape_slices(records, out_dir)
    return paths + trajectory(records, out_dir)
