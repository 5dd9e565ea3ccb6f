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


def _cell(value: float, fmt: str) -> str:
    """A probe's value; '–' where it is undefined (a zero gradient or singular value)."""
    return fmt.format(value) if np.isfinite(value) else "–"


def _pct(value) -> str:
    """A fraction as a percentage, '-' when missing."""
    return "-" if value is None or pd.isna(value) else f"{100 * float(value):.1f}%"


def probe_markdown(records: Sequence[dict]) -> str:
    """The probes' table (seed means) and the sentences that compare plain with ResNet."""
    means = seed_means(probe_table(records))
    sentences = [*_published_checks(means), "", *_trend_sentences(means)]
    return "\n".join([*sentences, "", probe_table_markdown(records)])


def probe_table_markdown(records: Sequence[dict]) -> str:
    """One row per net, depth and state: the probes' seed means and the final training error."""
    table = probe_table(records)
    means = seed_means(table)
    trained = table[table["state"] == "trained"]
    errors = trained.groupby(["net", "depth"])["final_train_error"].mean()
    seeds = table[table["state"] == "init"].groupby(["net", "depth"])["seed"].nunique()
    head = ["net", "state", "seeds"] + [label for _, label, _ in TABLE_COLUMNS] + ["train err"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in means.sort_values(["state", "net", "depth"]).itertuples():
        key = (row.net, row.depth)
        n = seeds.get(key, 1) if row.state == "init" else 1
        err = _pct(errors.get(key)) if row.state == "trained" else "-"
        cells = [_cell(getattr(row, col), fmt) for col, _, fmt in TABLE_COLUMNS]
        lines.append(
            f"| {model_label(*key)} | {row.state} | {n} | " + " | ".join(cells) + f" | {err} |"
        )
    return "\n".join(lines) + "\n"


def _series(means: pd.DataFrame, model: str, state: str, key: str) -> pd.Series:
    """One quantity against depth for one family and state."""
    rows = means[(means["net"] == model) & (means["state"] == state)].sort_values("depth")
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


def _deeper_and_below(plain: pd.Series, resnet: pd.Series) -> bool:
    """Plain falls with depth and ends below ResNet at the deepest depth."""
    return _trend(plain) == "falls with depth" and plain.iloc[-1] < resnet.iloc[-1]


def _rises(plain: pd.Series, resnet: pd.Series) -> bool:
    """Plain rises with depth (ResNet shown for comparison only)."""
    return _trend(plain) == "rises with depth"


# Published claims about nets at initialisation, each checked on this sweep's numbers.
PUBLISHED = (
    (
        "lag1",
        "Balduzzi et al. 2017: without shortcuts the gradient decorrelates with depth "
        "(lag-1 autocorrelation falls), with shortcuts far less",
        _deeper_and_below,
    ),
    ("correlation_length", "Balduzzi et al. 2017, as a correlation length", _deeper_and_below),
    (
        "cosine_last_eval",
        "the mean-field papers: in a plain ReLU net (BN the identity: eval mode at "
        "initialisation) two inputs' pre-activations align with depth",
        _rises,
    ),
    (
        "gradient_norm_ratio",
        "Yang et al. 2019: in a plain net with BN (training mode) the gradient grows towards "
        "the input with depth at initialisation",
        _rises,
    ),
)


def _published_checks(means: pd.DataFrame) -> list[str]:
    """One line per published claim: whether it holds here, with the numbers."""
    out = []
    formats = {key: fmt for key, _, fmt in TABLE_COLUMNS}
    for key, claim, holds in PUBLISHED:
        plain, resnet = (_series(means, m, "init", key) for m in ("plain", "residual"))
        if plain.empty or resnet.empty:
            continue
        verdict = "holds here" if holds(plain, resnet) else "does NOT hold here"
        out.append(
            f"- {claim}: {verdict} (plain {_listing(plain, formats[key])}; ResNet "
            f"{_listing(resnet, formats[key])})."
        )
    return out


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


def grid_minima(loss: np.ndarray) -> int:
    """Points of a 2-D grid lower than each of their (up to 8) neighbours: 1 for a bowl."""
    loss = np.asarray(loss, float)
    padded = np.pad(loss, 1, constant_values=np.inf)
    rows, cols = loss.shape
    neighbours = [
        padded[1 + di : 1 + di + rows, 1 + dj : 1 + dj + cols]
        for di in (-1, 0, 1)
        for dj in (-1, 0, 1)
        if (di, dj) != (0, 0)
    ]
    return int(np.sum(np.all([loss < n for n in neighbours], axis=0)))


def landscape_markdown(records: Sequence[dict]) -> str:
    """The landscapes' numbers: loss ranges, grid minima, 1-D slice, trajectory, wall times."""
    head = "| net | iteration | subset | centre loss | 2-D loss range | grid minima | "
    lines = [
        head + "1-D loss at alpha = -1 / +1 |",
        "| --- |" + " ---: |" * 3 + " --- | ---: | --- |",
    ]
    for r in records:
        low, high = r["loss_range_2d"]
        centre = r["loss_1d"][len(r["loss_1d"]) // 2]
        lines.append(
            f"| {model_label(r['model'], r['depth'])} | {r['step']} | {r['subset_size']} | "
            f"{centre:.3g} | {low:.3g} .. {high:.3g} | {grid_minima(r['loss_2d'])} | "
            f"{r['loss_1d'][0]:.3g} / {r['loss_1d'][-1]:.3g} |"
        )
    lines += [
        "",
        "| net | PCA explained variance (1st, 2nd) | distance to the end: init, "
        "first checkpoint | checkpoints | 2-D grid wall time |",
    ]
    lines += ["| --- | --- | --- | --- | ---: |"]
    for r in records:
        explained = r.get("explained_variance") or [float("nan")] * 2
        path = np.asarray(r.get("trajectory", [[np.nan, np.nan]] * 2))
        init, first = np.linalg.norm(path[0]), np.linalg.norm(path[1])
        steps = ", ".join(map(str, r.get("trajectory_steps", [])))
        side = len(r["xs"])
        lines.append(
            f"| {model_label(r['model'], r['depth'])} | {100 * explained[0]:.4g}%, "
            f"{100 * explained[1]:.4g}% | {init:.3g}, {first:.3g} | {steps} | {side}x{side} "
            f"points in {r['wall_2d_s']:.1f} s (compile {r['compile_s']:.1f} s) |"
        )
    return "\n".join(lines) + "\n"
