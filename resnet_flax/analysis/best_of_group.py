"""Each group's best learning rate: a sweep over optim.lr (and other keys) judged at its best.

Against "the deep plain net just needs another learning rate": the runs are grouped by
everything their sweep set except the swept keys and the seed, each group keeps the swept
values with the lowest final training error (mean over seeds of completed runs), and the
degradation verdict is computed on those bests.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from resnet_flax.analysis.report import (
    MARGIN,
    _markdown,
    _pct,
    degradation_verdict,
    depth_trend,
)
from resnet_flax.analysis.runs import FINISHED, config_value

DEFAULT_SWEPT = ("optim.lr",)
OVERRIDES_FILE = os.path.join(".hydra", "overrides.yaml")
# Overrides that never tell groups apart: seeds are averaged, the rest are names and paths.
NOT_GROUPING = (
    "seed",
    "experiment_name",
    "results_dir",
    "compilation_cache_dir",
    "cpu_devices",
    "trainer.progress",
    "dataset.data_dir",
)
# Identity fields that group runs made without Hydra overrides.
FALLBACK_GROUPING = ("experiment", "model", "depth", "shortcut", "family", "dataset")


@dataclass
class BestOfGroups:
    """The sweep's swept keys and values, every (group, values) cell, and each group's best."""

    swept: tuple[str, ...]
    values: dict[str, list]
    cells: pd.DataFrame
    best: pd.DataFrame


def run_overrides(run_dir: str | Path) -> dict[str, str]:
    """The key=value overrides a run was launched with (its seed group's, for one seed)."""
    run_dir = Path(run_dir)
    for directory in (run_dir, run_dir.parent):
        path = directory / OVERRIDES_FILE
        if path.is_file():
            items = yaml.safe_load(path.read_text(encoding="utf-8")) or []
            pairs = (str(item).split("=", 1) for item in items if "=" in str(item))
            return {key.lstrip("+~"): value for key, value in pairs}
    return {}


def _value(text: object) -> object:
    """A swept value as a number where it is one (so 0.1 and 1e-1 are one value)."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return text


def tag_runs(runs: pd.DataFrame, swept: tuple[str, ...]) -> pd.DataFrame:
    """Runs with a column per swept key and their group: every other override but the seed."""
    rows = []
    for run in runs.itertuples(index=False):
        overrides = run_overrides(run.run_dir)
        row = {key: _value(overrides.get(key) or config_value(run.run_dir, key)) for key in swept}
        if overrides:
            group = {k: v for k, v in overrides.items() if k not in swept and k not in NOT_GROUPING}
        else:
            group = {k: str(getattr(run, k)) for k in FALLBACK_GROUPING}
        rows.append({**row, "group_items": tuple(sorted(group.items()))})
    tagged = pd.concat([runs.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    return _label_groups(tagged)


def _label_groups(tagged: pd.DataFrame) -> pd.DataFrame:
    """Add group (the overrides that differ between groups) and series (the same without depth)."""
    items = [dict(g) for g in tagged["group_items"]]
    keys = sorted({k for d in items for k in d})
    varying = [k for k in keys if len({d.get(k) for d in items}) > 1]
    tagged["group"] = [",".join(f"{k}={d.get(k)}" for k in varying) or "all" for d in items]
    series_keys = [k for k in varying if k != "depth"]
    # One key: its value names the series ("residual_fixup" rather than "arm=residual_fixup").
    name = (lambda d: str(d.get(series_keys[0]))) if len(series_keys) == 1 else None
    tagged["series"] = [
        name(d) if name else ",".join(f"{k}={d.get(k)}" for k in series_keys) or "all"
        for d in items
    ]
    return tagged


def _cell(runs: pd.DataFrame) -> dict:
    """One (group, swept values) cell: seed mean and std of completed runs, and what else ran."""
    done = runs[runs["status"] == FINISHED]
    others = runs.loc[runs["status"] != FINISHED, "status"].value_counts()
    return {
        "n": len(done),
        "final_train_error_mean": done["final_train_error"].astype(float).mean(),
        "final_train_error_std": done["final_train_error"].astype(float).std(),
        "final_test_error_mean": done["final_test_error"].astype(float).mean(),
        "not_counted": ", ".join(f"{n} {s}" for s, n in others.items()),
    }


def _grid_cells(tagged: pd.DataFrame, swept: tuple[str, ...], values: dict) -> pd.DataFrame:
    """Every group at every combination of swept values; missing combinations say so."""
    rows = []
    for (group, series), runs in tagged.groupby(["group", "series"], sort=True):
        depth = runs["depth"].dropna().iloc[0] if runs["depth"].notna().any() else None
        model = runs["model"].dropna().iloc[0] if runs["model"].notna().any() else None
        for combo in itertools.product(*(values[k] for k in swept)):
            match = runs
            for key, value in zip(swept, combo, strict=True):
                match = match[match[key] == value]
            cell = _cell(match) if len(match) else {"n": 0, "not_counted": "no run"}
            base = {"group": group, "series": series, "model": model, "depth": depth}
            rows.append({**base, **dict(zip(swept, combo, strict=True)), **cell})
    cells = pd.DataFrame.from_records(rows)
    for column in ("final_train_error_mean", "final_train_error_std", "final_test_error_mean"):
        cells[column] = cells.get(column, pd.Series(dtype=float)).astype(float)
    return cells


def _best_rows(cells: pd.DataFrame, swept: tuple[str, ...], values: dict) -> pd.DataFrame:
    """Per group: the cell with the lowest mean training error, and whether it sits at an edge."""
    rows = []
    for _, frame in cells.groupby("group", sort=False):
        counted = frame[(frame["n"] > 0) & frame["final_train_error_mean"].notna()]
        missing = frame[frame["not_counted"] != ""]
        note = "; ".join(
            ",".join(f"{_short(k)}={_fmt(r[k])}" for k in swept) + f": {r['not_counted']}"
            for _, r in missing.iterrows()
        )
        if counted.empty:
            best = frame.iloc[0].copy()
            for key in (*swept, "final_train_error_mean", "final_test_error_mean"):
                best[key] = math.nan
            best["edge"] = False
        else:
            best = counted.sort_values("final_train_error_mean", kind="stable").iloc[0].copy()
            grid_edges = [(values[k][0], values[k][-1]) for k in swept if len(values[k]) > 1]
            best["edge"] = any(best[k] in ends for k, ends in zip(swept, grid_edges, strict=False))
        best["missing"] = note
        rows.append(best)
    best = pd.DataFrame(rows).reset_index(drop=True)
    return best.sort_values(["series", "depth"], kind="stable").reset_index(drop=True)


def best_of_groups(runs: pd.DataFrame, swept: tuple[str, ...] = DEFAULT_SWEPT) -> BestOfGroups:
    """Group a sweep's runs by everything but the swept keys and seed; find each group's best."""
    tagged = tag_runs(runs, swept)
    values = {
        key: sorted(tagged[key].dropna().unique(), key=lambda v: (isinstance(v, str), v))
        for key in swept
    }
    cells = _grid_cells(tagged, swept, values)
    return BestOfGroups(swept, values, cells, _best_rows(cells, swept, values))


def best_run_dirs(runs: pd.DataFrame, result: BestOfGroups) -> list[Path]:
    """The completed runs of each group's best cell (every seed), in the report's order."""
    tagged = tag_runs(runs, result.swept)
    dirs: list[Path] = []
    for _, best in result.best.iterrows():
        match = tagged[(tagged["group"] == best["group"]) & (tagged["status"] == FINISHED)]
        for key in result.swept:
            match = match[match[key] == best[key]]  # a group with no completed run: NaN, none
        dirs += [Path(d) for d in match["run_dir"]]
    return dirs


def _short(key: str) -> str:
    """A swept key's last part: optim.lr -> lr."""
    return key.rsplit(".", 1)[-1]


def _fmt(value: object) -> str:
    """A swept value as written in a command ('0.1', '1e-05'), '–' when missing."""
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:g}"
    return str(value)


def verdict_lines(result: BestOfGroups, margin: float = MARGIN) -> list[str]:
    """Degradation judged on each group's best: a depth trend per series, and plain vs residual
    where each (model, depth) has one best (the classic verdict of the degradation report)."""
    best = result.best
    lines = [f"Computed on each group's best final training error over {_swept_text(result)}."]
    table = best.rename(columns={"model": "net_model", "series": "model"})
    for series in table["model"].drop_duplicates():
        rows = table[table["model"] == series]
        # A depth where no swept value completed failed to train at all: the worst outcome.
        failed = rows[rows["final_train_error_mean"].isna()].sort_values("depth")
        trend = depth_trend(table, series, margin)
        shown = trend if isinstance(trend, str) else trend.describe()
        if not failed.empty:
            where = "; ".join(f"depth {int(r.depth)}: {r.missing}" for r in failed.itertuples())
            lines.append(f"- {series} FAILS to train at any swept value ({where}); {shown}")
        elif isinstance(trend, str):
            lines.append(f"- {series}: not enough data ({trend})")
        else:
            word = "DEGRADES" if trend.rise > trend.threshold else "does not degrade"
            lines.append(f"- {series} {word}: {shown}")
    per_net = best.groupby(["model", "depth"]).size()
    if len(per_net) and (per_net == 1).all() and {"plain", "residual"} <= set(best["model"]):
        verdict = degradation_verdict(best)
        lines.append(f"- plain vs residual at their best learning rates: {verdict.text}")
    return lines


def best_markdown(result: BestOfGroups) -> str:
    """The report: each group's best, the training error at every swept value, the verdict."""
    swept, best = result.swept, result.best
    columns = [("group", lambda r: r.series), ("depth", lambda r: _fmt(float(r.depth)))]
    columns += [(f"best {_short(k)}", lambda r, k=k: _fmt(getattr(r, _col(k)))) for k in swept]
    columns += [
        ("train error (%)", lambda r: _pct(r.final_train_error_mean) + ("†" if r.edge else "")),
        ("test error (%)", lambda r: _pct(r.final_test_error_mean)),
        ("n seeds", lambda r: str(int(r.n))),
        ("not counted", lambda r: r.missing or "–"),
    ]
    renamed = best.rename(columns={k: _col(k) for k in swept})
    return "\n".join(
        [
            "# Training error at each group's best learning rate",
            "",
            f"Swept: {_swept_text(result)}. Runs are grouped by every other override of their "
            "sweep (seeds averaged: mean of completed runs); training error is measured in eval "
            "mode on the whole training set at the end of training. † the best value is at the "
            "edge of the swept range.",
            "",
            depth_table_markdown(result),
            "",
            "## Each group's best",
            "",
            _markdown(renamed, columns),
            "",
            "## Final training error (%) at every swept value",
            "",
            _grid_markdown(result),
            "",
            "## Degradation verdict on the best of each group",
            "",
            *verdict_lines(result),
            "",
        ]
    )


def _col(key: str) -> str:
    """A swept key as a namedtuple-safe column name."""
    return "swept_" + key.replace(".", "_")


def _swept_text(result: BestOfGroups) -> str:
    """'optim.lr = 0.01, 0.1, 1' for every swept key."""
    return "; ".join(f"{key} = {', '.join(map(_fmt, result.values[key]))}" for key in result.swept)


def _grid_markdown(result: BestOfGroups) -> str:
    """Rows: group and depth; columns: each combination of swept values; cells: error or why not."""
    cells, swept = result.cells, result.swept
    combos = list(itertools.product(*(result.values[k] for k in swept)))
    header = ",".join(_short(k) for k in swept)
    names = [f"{header}={','.join(map(_fmt, combo))}" for combo in combos]
    rows = []
    for (series, depth), frame in cells.groupby(["series", "depth"], sort=True):
        row = {"group": series, "depth": _fmt(float(depth))}
        for _, cell in frame.iterrows():
            name = names[combos.index(tuple(cell[k] for k in swept))]
            counted = cell["n"] and not pd.isna(cell["final_train_error_mean"])
            extra = f" ({cell['not_counted']})" if cell["not_counted"] else ""
            row[name] = _pct(cell["final_train_error_mean"]) + extra if counted else extra[2:-1]
        rows.append(row)
    grid = pd.DataFrame(rows, columns=["group", "depth", *names]).fillna("–")
    return _markdown(grid, [(c, lambda r, i=i: str(r[i])) for i, c in enumerate(grid.columns)])


def depth_table_markdown(result: BestOfGroups) -> str:
    """Series by depth: the best final training error (%) and the swept values reaching it."""
    best = result.best.rename(columns={k: _col(k) for k in result.swept})
    depths = sorted(int(d) for d in best["depth"].dropna().unique())
    rows = []
    for series, frame in best.groupby("series", sort=False):
        row = {"group": series}
        for r in frame.itertuples(index=False):
            where = ", ".join(f"{_short(k)} {_fmt(getattr(r, _col(k)))}" for k in result.swept)
            error = _pct(r.final_train_error_mean) + ("†" if r.edge else "")
            row[f"depth {int(r.depth)}"] = f"{error} ({where})" if r.n else "–"
        rows.append(row)
    table = pd.DataFrame(rows, columns=["group", *(f"depth {d}" for d in depths)]).fillna("–")
    return _markdown(table, [(c, lambda r, i=i: str(r[i])) for i, c in enumerate(table.columns)])
