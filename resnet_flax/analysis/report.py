"""Markdown report of a sweep: error tables, the paper's numbers and a degradation verdict."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from resnet_flax.analysis.runs import mean_std, select_final
from resnet_flax.data.config import STREAMED
from resnet_flax.rundir import RunStatus

# "Clearly higher": a rise of more than 2 percentage points of training error AND more than
# the seed noise, sqrt(std_shallow^2 + std_deep^2) (the std of a difference of two seed
# draws). 2 pp is well above run-to-run noise of converged CIFAR nets (about 0.2 pp in the
# paper) yet far below the effect the paper reports (plain-56 vs plain-20: several pp).
MARGIN = 0.02
VALUES = ("final_train_error", "final_test_error")
STATUSES = tuple(RunStatus)


@dataclass(frozen=True)
class Published:
    """One published test error (percent) with its source."""

    dataset: str
    model: str
    depth: int
    error_pct: str
    source: str


# The papers' numbers (docs/design.md). Table 2 is ImageNet top-1 10-crop; the others CIFAR-10.
PUBLISHED: tuple[Published, ...] = (
    Published("cifar10", "residual", 20, "8.75", "He 2015 Tab. 6"),
    Published("cifar10", "residual", 32, "7.51", "He 2015 Tab. 6"),
    Published("cifar10", "residual", 44, "7.17", "He 2015 Tab. 6"),
    Published("cifar10", "residual", 56, "6.97", "He 2015 Tab. 6"),
    Published("cifar10", "residual", 110, "6.43 (best of 5), 6.61 ± 0.16", "He 2015 Tab. 6"),
    Published("cifar10", "residual", 1202, "7.93", "He 2015 Tab. 6"),
    Published("cifar10", "residual", 164, "5.93 (bottleneck)", "He 2016 Tab. 3"),
    Published("cifar10", "residual", 1001, "7.61 (bottleneck)", "He 2016 Tab. 3"),
    Published("cifar10", "preact", 110, "6.37", "He 2016 Tab. 3"),
    Published("cifar10", "preact", 164, "5.46 (bottleneck)", "He 2016 Tab. 3"),
    Published("cifar10", "preact", 1001, "4.92 (bottleneck)", "He 2016 Tab. 3"),
    Published("imagenet2012", "plain", 18, "27.94 (top-1, 10-crop)", "He 2015 Tab. 2"),
    Published("imagenet2012", "plain", 34, "28.54 (top-1, 10-crop)", "He 2015 Tab. 2"),
    Published("imagenet2012", "residual", 18, "27.88 (top-1, 10-crop)", "He 2015 Tab. 2"),
    Published("imagenet2012", "residual", 34, "25.03 (top-1, 10-crop)", "He 2015 Tab. 2"),
)


@dataclass(frozen=True)
class Verdict:
    """Whether plain nets degrade with depth and residual nets avoid it, with the numbers."""

    plain_degrades: bool
    residual_avoids: bool
    text: str
    enough_data: bool = True


@dataclass
class Report:
    """A rendered report and the verdict per dataset."""

    text: str
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    path: Path | None = None


def published_for(dataset: str | None, model: str, depth: int) -> str:
    """Published test error text for a net, '' when the paper has none for this dataset."""
    hits = [
        f"{p.error_pct} [{p.source}]"
        for p in PUBLISHED
        if (p.dataset, p.model, p.depth) == (dataset, model, int(depth))
    ]
    return "; ".join(hits)


def status_counts(runs: pd.DataFrame) -> pd.DataFrame:
    """Number of runs per (model, depth) and status, one column per status."""
    runs = runs[runs["model"].notna() & runs["depth"].notna()]
    counts = runs.groupby(["model", "depth", "status"]).size().unstack("status", fill_value=0)
    counts = counts.reindex(columns=sorted(set(counts.columns) | set(STATUSES)), fill_value=0)
    return counts.reset_index()


def final_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, depth): mean, std, n of final errors over seeds, partial flag, statuses."""
    finals = select_final(runs)
    table = mean_std(finals.astype({v: float for v in VALUES}), ["model", "depth"], VALUES)
    partial = finals.groupby(["model", "depth"])["partial"].any().rename("partial").reset_index()
    table = table.merge(partial, on=["model", "depth"], how="left")
    # Outer merge keeps nets whose every run failed: they still belong in the status columns.
    table = status_counts(runs).merge(table, on=["model", "depth"], how="left")
    table["n"] = table["n"].fillna(0).astype(int)
    table["partial"] = table["partial"].astype("boolean").fillna(False).astype(bool)
    return table.sort_values(["model", "depth"]).reset_index(drop=True)


def comparison_table(table: pd.DataFrame) -> pd.DataFrame:
    """Plain vs residual at equal depth: errors and the difference plain - residual."""
    columns = [f"{v}_mean" for v in VALUES]
    plain = table.loc[table["model"] == "plain", ["depth", *columns]]
    residual = table.loc[table["model"] == "residual", ["depth", *columns]]
    both = plain.merge(residual, on="depth", suffixes=("_plain", "_residual"))
    for value in VALUES:
        both[f"{value}_diff"] = both[f"{value}_mean_plain"] - both[f"{value}_mean_residual"]
    return both.sort_values("depth").reset_index(drop=True)


def _pct(value: float) -> str:
    """Fraction as a percent string, '–' for missing."""
    return "–" if pd.isna(value) else f"{100 * value:.2f}"


def _pct_std(mean: float, std: float) -> str:
    """'mean ± std' in percent; the std is left out when unknown (one seed)."""
    return _pct(mean) if pd.isna(std) or pd.isna(mean) else f"{_pct(mean)} ± {100 * std:.2f}"


def _pp(value: float) -> str:
    """Signed difference of two fractions in percentage points."""
    return "–" if pd.isna(value) else f"{100 * value:+.2f} pp"


@dataclass(frozen=True)
class _Trend:
    """Training error of one model at its shallowest and deepest depth."""

    model: str
    shallow: int
    deep: int
    shallow_error: float
    deep_error: float
    threshold: float

    @property
    def rise(self) -> float:
        """Deep minus shallow training error (fraction)."""
        return self.deep_error - self.shallow_error

    def describe(self) -> str:
        """'plain 1.00% (20) -> 15.00% (56), +14.00 pp' style summary."""
        return (
            f"{self.model} training error {_pct(self.shallow_error)}% (depth {self.shallow})"
            f" -> {_pct(self.deep_error)}% (depth {self.deep}), {_pp(self.rise)}"
            f" vs margin {100 * self.threshold:.2f} pp"
        )


def depth_trend(table: pd.DataFrame, model: str, margin: float) -> _Trend | str:
    """The model's training-error trend over depth, or a 'not enough data' reason."""
    rows = table[(table["model"] == model) & table["final_train_error_mean"].notna()]
    rows = rows.sort_values("depth")
    if rows.empty:
        return f"no {model} runs with a final training error"
    if len(rows) < 2:
        return f"{model} runs at one depth only ({int(rows['depth'].iloc[0])})"
    first, last = rows.iloc[0], rows.iloc[-1]
    noise = math.hypot(
        *(
            0.0 if pd.isna(s) else s
            for s in (first.final_train_error_std, last.final_train_error_std)
        )
    )
    return _Trend(
        model,
        int(first.depth),
        int(last.depth),
        float(first.final_train_error_mean),
        float(last.final_train_error_mean),
        max(margin, noise),
    )


def _train_error_at(table: pd.DataFrame, model: str, depth: int) -> float:
    """Mean final training error of a (model, depth), NaN when absent."""
    rows = table[(table["model"] == model) & (table["depth"] == depth)]
    return float(rows["final_train_error_mean"].iloc[0]) if len(rows) else math.nan


def degradation_verdict(table: pd.DataFrame, margin: float = MARGIN) -> Verdict:
    """Judge degradation from a ``final_table``.

    Plain degrades when its training error at the deepest depth exceeds that at the
    shallowest by more than ``max(margin, seed noise)``. Residual avoids it when its own rise
    stays within that bound and its training error is below plain's at the deepest depth both
    have (or, without a common depth, at each one's deepest).
    """
    plain, residual = depth_trend(table, "plain", margin), depth_trend(table, "residual", margin)
    if isinstance(plain, str) or isinstance(residual, str):
        reasons = [t for t in (plain, residual) if isinstance(t, str)]
        known = [t.describe() for t in (plain, residual) if isinstance(t, _Trend)]
        degrades = isinstance(plain, _Trend) and plain.rise > plain.threshold
        text = "not enough data: " + "; ".join(reasons + known)
        return Verdict(degrades, False, text, enough_data=False)
    plain_degrades = plain.rise > plain.threshold
    common = set(table.loc[table["model"] == "plain", "depth"]) & set(
        table.loc[table["model"] == "residual", "depth"]
    )
    at = max(common) if common else None
    plain_deep = _train_error_at(table, "plain", at) if at else plain.deep_error
    residual_deep = _train_error_at(table, "residual", at) if at else residual.deep_error
    below = residual_deep < plain_deep
    residual_avoids = residual.rise <= residual.threshold and below
    where = f"depth {at}" if at else f"depths {residual.deep} vs {plain.deep}"
    text = (
        f"{'plain DEGRADES' if plain_degrades else 'plain does not degrade'}: "
        f"{plain.describe()}; "
        f"{'residual AVOIDS degradation' if residual_avoids else 'residual does not avoid it'}: "
        f"{residual.describe()}, residual {_pct(residual_deep)}% vs plain {_pct(plain_deep)}% "
        f"at {where}"
    )
    return Verdict(plain_degrades, residual_avoids, text)


# A markdown table column: its header and how a row (a namedtuple) becomes its cell.
Column = tuple[str, Callable[[Any], str]]


def _markdown(frame: pd.DataFrame, columns: Sequence[Column]) -> str:
    """A GitHub markdown table with one line per row of ``frame``."""
    header = [name for name, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(row) for _, cell in columns) + " |")
    return "\n".join(lines)


def _field(name: str, fmt: Callable[[Any], str] = str) -> Callable[[Any], str]:
    """A cell that formats one field of the row."""
    return lambda row: fmt(getattr(row, name))


def _count(value: Any) -> str:
    """An integer field, '–' for missing."""
    return "–" if pd.isna(value) else str(int(value))


def _status_text(row: pd.Series) -> str:
    """'3 completed, 1 diverged' from a final_table row's status-count columns."""
    not_counts = {"model", "depth", "n", "partial"}
    statuses = [c for c in row.index if c not in not_counts and not c.startswith("final_")]
    return ", ".join(f"{int(row[s])} {s}" for s in statuses if row[s]) or "–"


def _error_cell(value: str) -> Callable[[Any], str]:
    """'mean ± std' of a final error in percent, starred when the row is partial."""
    return lambda row: (
        _pct_std(getattr(row, f"{value}_mean"), getattr(row, f"{value}_std"))
        + ("*" if row.partial else "")
    )


def train_error_kind(dataset: str | None) -> str:
    """Which training error a run's final one is: eval mode on the whole training set, or, for
    streamed datasets (too large for that pass), the last log interval's running mean."""
    return "running, training mode" if dataset in STREAMED else "eval mode"


def final_errors_markdown(table: pd.DataFrame, dataset: str | None) -> str:
    """The per-(model, depth) table of final errors with published numbers beside ours."""
    return _markdown(
        table,
        [
            ("model", _field("model")),
            ("depth", _field("depth", _count)),
            (f"train error, {train_error_kind(dataset)} (%)", _error_cell("final_train_error")),
            ("test error, eval mode (%)", _error_cell("final_test_error")),
            (
                "published test error (%)",
                lambda row: published_for(dataset, row.model, row.depth) or "–",
            ),
            ("n seeds", _field("n")),
            ("runs", lambda row: _status_text(pd.Series(row._asdict()))),
        ],
    )


def comparison_markdown(table: pd.DataFrame, dataset: str | None = None) -> str:
    """Plain vs residual at equal depth as markdown ('' when no depth has both)."""
    both = comparison_table(table)
    if both.empty:
        return ""
    columns: list[Column] = [("depth", _field("depth", _count))]
    train = f"train, {train_error_kind(dataset)}"
    for value, label in (("final_train_error", train), ("final_test_error", "test")):
        columns += [
            (f"plain {label} (%)", _field(f"{value}_mean_plain", _pct)),
            (f"residual {label} (%)", _field(f"{value}_mean_residual", _pct)),
            (f"{label} diff", _field(f"{value}_diff", _pp)),
        ]
    return _markdown(both, columns)


def excluded_runs_markdown(runs: pd.DataFrame) -> str:
    """Runs that are not completed, with status and message ('' when all completed)."""
    others = runs[runs["status"] != RunStatus.COMPLETED]
    if others.empty:
        return ""
    return _markdown(
        others,
        [
            ("model", _field("model")),
            ("depth", _field("depth", _count)),
            ("seed", _field("seed", _count)),
            ("status", _field("status")),
            ("iterations", _field("iterations", _count)),
            ("message", _field("message", lambda m: m if isinstance(m, str) and m else "–")),
            ("run", _field("run_dir", lambda path: f"`{path}`")),
        ],
    )


def _dataset_section(runs: pd.DataFrame, dataset: str | None) -> tuple[str, Verdict]:
    """Markdown section for the runs of one dataset and its verdict."""
    table = final_table(runs)
    verdict = degradation_verdict(table)
    parts = [f"## Dataset: {dataset or 'unknown'}", "", final_errors_markdown(table, dataset)]
    if dataset in STREAMED:  # evaluated on the validation split, never re-scored on train
        parts += [
            "",
            "Our test error here is the single centre-crop error on the validation split; "
            "the training error is the running mean of the last log interval (augmented "
            "crops), as in the paper's Fig. 4. Table 2's numbers are 10-crop.",
        ]
    if table["partial"].any():
        parts += [
            "",
            "\\* partial: no completed run yet; values from the last metrics lines "
            "(training error is the running mean of the last log interval).",
        ]
    shortcuts = runs.loc[runs["model"] != "plain", "shortcut"].dropna().unique()
    if len(shortcuts) > 1:
        parts += [
            "",
            f"Note: shortcut options {', '.join(map(str, sorted(shortcuts)))} are "
            "pooled per (model, depth).",
        ]
    comparison = comparison_markdown(table, dataset)
    if comparison:
        parts += [
            "",
            "### Plain vs residual at equal depth (diff = plain - residual)",
            "",
            comparison,
        ]
    parts += ["", "### Degradation verdict", "", verdict.text]
    excluded = excluded_runs_markdown(runs)
    if excluded:
        parts += ["", "### Runs not completed (not averaged unless marked partial)", "", excluded]
    return "\n".join(parts), verdict


def build_report(runs: pd.DataFrame, title: str = "Degradation report") -> Report:
    """Render the report for a run table, one section per dataset."""
    sections, verdicts = [f"# {title}", "", _preamble(runs)], {}
    datasets = runs["dataset"].astype(object).where(runs["dataset"].notna(), None)
    known = set(datasets.dropna())
    if len(known) == 1:
        # A run that failed before writing its config still belongs to the sweep's dataset.
        datasets = datasets.fillna(known.pop())
    for dataset in sorted(set(datasets), key=str):
        section, verdict = _dataset_section(runs[datasets == dataset], dataset)
        sections += ["", section]
        verdicts[str(dataset)] = verdict
    return Report("\n".join(sections) + "\n", verdicts)


def _preamble(runs: pd.DataFrame) -> str:
    """Run counts and how to read the numbers."""
    counts = runs["status"].value_counts()
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    return (
        f"{len(runs)} runs ({summary}). Errors in percent, mean ± sample std over seeds of "
        "completed runs. The final training error here is measured after training in eval "
        "mode on the whole training set (streamed datasets: the running mean of the last log "
        "interval); the figures' training curves are the running training-mode error of each "
        "log interval (augmented batches, batch statistics), which can be far below or above "
        f"it. Degradation margin: {100 * MARGIN:.0f} pp and more than the seed noise."
    )


def write_report(runs: pd.DataFrame, path: str | Path) -> Report:
    """Write report.md to ``path`` (a file, or a directory to hold report.md)."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = build_report(runs)
    path.write_text(report.text, encoding="utf-8")
    report.path = path
    return report
