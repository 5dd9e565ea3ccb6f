"""report.md of the why-study: what each figure shows, with the numbers it shows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from resnet_flax.analysis.plots import model_label
from resnet_flax.analysis.probe_plots import QUANTITIES, probe_table, seed_means

TABLE_COLUMNS = (
    ("lag1", "lag-1 r", "{:.3f}"),
    ("correlation_length", "corr. length", "{:.1f}"),
    ("jacobian_std_log_sigma", "std ln sigma", "{:.2f}"),
    ("jacobian_log10_condition", "log10 cond", "{:.2f}"),
    ("cosine_last_eval", "cos last (eval BN)", "{:.3f}"),
    ("cosine_last_train", "cos last (train BN)", "{:.3f}"),
    ("second_moment_growth_eval", "log10 q growth (eval BN)", "{:+.2f}"),
    ("gradient_norm_ratio", "log10 grad first/last", "{:+.2f}"),
)


def _pct(value) -> str:
    """A fraction as a percentage, '-' when missing."""
    return "-" if value is None or pd.isna(value) else f"{100 * float(value):.1f}%"


def probe_markdown(records: Sequence[dict]) -> str:
    """The probes' table (seed means) and the sentences that compare plain with ResNet."""
    table = probe_table(records)
    means = seed_means(table)
    errors = table[table["state"] == "trained"].set_index(["model", "depth"])["final_train_error"]
    seeds = table[table["state"] == "init"].groupby(["model", "depth"])["seed"].nunique()
    head = ["net", "state", "seeds"] + [label for _, label, _ in TABLE_COLUMNS] + ["train err"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in means.sort_values(["state", "model", "depth"]).itertuples():
        key = (row.model, row.depth)
        n = seeds.get(key, 1) if row.state == "init" else 1
        err = _pct(errors.get(key)) if row.state == "trained" else "-"
        cells = [fmt.format(getattr(row, col)) for col, _, fmt in TABLE_COLUMNS]
        lines.append(
            f"| {model_label(*key)} | {row.state} | {n} | " + " | ".join(cells) + f" | {err} |"
        )
    return "\n".join([*_trend_sentences(means), "", *lines]) + "\n"


def _series(means: pd.DataFrame, model: str, state: str, key: str) -> pd.Series:
    """One quantity against depth for one family and state."""
    rows = means[(means["model"] == model) & (means["state"] == state)].sort_values("depth")
    return pd.Series(rows[key].to_numpy(), index=rows["depth"].astype(int))


def _listing(series: pd.Series, fmt: str) -> str:
    """'0.972 / 0.949 / 0.727 at depth 8 / 20 / 56'."""
    values = " / ".join(fmt.format(v) for v in series)
    return f"{values} at depth {' / '.join(map(str, series.index))}"


def _trend(series: pd.Series) -> str:
    """Whether a quantity falls, rises or neither with depth (strictly, over all depths)."""
    steps = np.diff(series.to_numpy())
    if len(steps) and np.all(steps < 0):
        return "falls with depth"
    if len(steps) and np.all(steps > 0):
        return "rises with depth"
    return "does not change monotonically with depth"


def _trend_sentences(means: pd.DataFrame) -> list[str]:
    """One sentence per quantity: plain and ResNet at init (and trained), with the numbers."""
    out = []
    labels = {key: f"{title}, {label}" for key, title, label in QUANTITIES}
    for key, _, fmt in TABLE_COLUMNS:
        parts = []
        for state in ("init", "trained"):
            for model in ("plain", "residual"):
                series = _series(means, model, state, key)
                if not series.empty:
                    parts.append(
                        f"{model_label(model)} {state}: {_listing(series, fmt)} ({_trend(series)})"
                    )
        if parts:
            out.append(f"- **{labels[key]}**: " + "; ".join(parts) + ".")
    return out


def landscape_markdown(records: Sequence[dict]) -> str:
    """The landscapes' numbers: loss ranges, centre, 1-D slice, trajectory, wall times."""
    head = "| net | iteration | subset | centre loss | 2-D loss range | 1-D loss at alpha=+-1 |"
    lines = [head, "| --- | ---: | ---: | ---: | --- | --- |"]
    for r in records:
        low, high = r["loss_range_2d"]
        centre = r["loss_1d"][len(r["loss_1d"]) // 2]
        ends = f"{r['loss_1d'][0]:.3g} / {r['loss_1d'][-1]:.3g}"
        lines.append(
            f"| {model_label(r['model'], r['depth'])} | {r['step']} | {r['subset_size']} | "
            f"{centre:.3g} | {low:.3g} .. {high:.3g} | {ends} |"
        )
    lines += ["", "| net | PCA explained variance (1st, 2nd) | checkpoints | 2-D grid wall time |"]
    lines += ["| --- | --- | --- | ---: |"]
    for r in records:
        explained = r.get("explained_variance") or [float("nan")] * 2
        steps = ", ".join(map(str, r.get("trajectory_steps", [])))
        side = len(r["xs"])
        lines.append(
            f"| {model_label(r['model'], r['depth'])} | {100 * explained[0]:.1f}%, "
            f"{100 * explained[1]:.1f}% | {steps} | {side}x{side} points in "
            f"{r['wall_2d_s']:.1f} s (compile {r['compile_s']:.1f} s) |"
        )
    return "\n".join(lines) + "\n"
