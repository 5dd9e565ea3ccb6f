"""The construction experiment's figure and report: source, deep from scratch, deep constructed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from resnet_flax.analysis.plots import (
    FULL_WIDTH,
    MODEL_COLORS,
    MODEL_ORDER,
    STYLE,
    _iteration_axis,
    _percent_axis,
    _zero_bottom,
    model_label,
    save_figure,
)
from resnet_flax.analysis.runs import find_run_dirs, run_curves
from resnet_flax.rundir import read_summary

FIGURE = "construction"


@dataclass(frozen=True)
class Run:
    """One run directory and its summary."""

    run_dir: Path
    summary: dict

    @property
    def depth(self) -> int:
        """The net's depth."""
        return int(self.summary["depth"])


@dataclass(frozen=True)
class Trio:
    """One model kind's shallow source, deep net from scratch and deep net constructed."""

    model: str
    source: Run
    scratch: Run | None
    constructed: Run


def find_trios(paths: Sequence[str | Path]) -> dict[str, Trio]:
    """{model: Trio} of the constructed runs under `paths` (the first of each model kind).

    A constructed run's source is the run of its kind at its init_from_depth that was not
    constructed itself; its scratch twin the one at its own depth.
    """
    runs = [Run(d, read_summary(d)) for d in find_run_dirs(paths)]
    runs = [r for r in runs if r.summary.get("depth") is not None]
    plain = [r for r in runs if not r.summary.get("init_from")]
    trios = {}
    for run in (r for r in runs if r.summary.get("init_from")):
        model = run.summary["model"]
        if model in trios:
            continue

        def twin(depth: int, model: str = model) -> Run | None:
            found = [r for r in plain if r.summary["model"] == model and r.depth == depth]
            return found[0] if found else None

        source = twin(int(run.summary["init_from_depth"]))
        if source is not None:
            trios[model] = Trio(model, source, twin(run.depth), run)
    return {m: trios[m] for m in MODEL_ORDER if m in trios}


def _pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals, '-' when missing."""
    return "-" if value is None else f"{100 * float(value):.2f}%"


def sentence(trio: Trio) -> str:
    """The construction argument for one model kind, in numbers (eval-mode training errors)."""
    deep, shallow = trio.constructed.depth, model_label(trio.model, trio.source.depth)
    kind = "plain net" if trio.model == "plain" else model_label(trio.model)
    scratch = trio.scratch.summary.get("final_train_error") if trio.scratch else None
    return (
        f"A {deep}-layer {kind} with {shallow}'s training error "
        f"({_pct(trio.source.summary.get('final_train_error'))}) exists (constructed: "
        f"{_pct(trio.constructed.summary.get('initial_train_error'))}); trained from scratch it "
        f"reaches {_pct(scratch)}; trained from the construction it reaches "
        f"{_pct(trio.constructed.summary.get('final_train_error'))}."
    )


def construction_markdown(trios: dict[str, Trio]) -> str:
    """The report section: one sentence per model kind and a table of the runs."""
    lines = [
        "## The construction argument (He et al. 2015, sec. 1)",
        "",
        "Training errors are in eval mode on the whole training set. The constructed net copies "
        "the shallow net's stem, classifier and first blocks of each stage; its extra blocks "
        "are identities (plain: Dirac convs and self-undoing BatchNorms; residual: branches "
        "whose last BN scale and shift are zero). The figure's curves are the running "
        "training error of each logging interval (training mode); its star is the "
        "constructed net's error before any step, its circles the final errors above.",
        "",
    ]
    lines += [f"- {sentence(trio)}" for trio in trios.values()]
    return "\n".join(lines) + "\n\n" + runs_table(trios)


def runs_table(trios: dict[str, Trio]) -> str:
    """A markdown table of the trios' runs: starting, final training and final test error."""
    lines = [
        "| net | depth | start train err | final train err | final test err | run |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for trio in trios.values():
        for role, run in _roles(trio):
            s = run.summary
            start = _pct(s.get("initial_train_error")) if role == "constructed" else "-"
            lines.append(
                f"| {model_label(trio.model)} {role} | {run.depth} | {start} | "
                f"{_pct(s.get('final_train_error'))} | {_pct(s.get('final_test_error'))} | "
                f"`{run.run_dir.parent.name}/{run.run_dir.name}` |"
            )
    return "\n".join(lines) + "\n"


def _roles(trio: Trio) -> list[tuple[str, Run]]:
    """(role, run) of a trio's runs that exist, shallow first."""
    roles = [("source", trio.source), ("scratch", trio.scratch), ("constructed", trio.constructed)]
    return [(role, run) for role, run in roles if run is not None]


# Within a panel the colour says the role; the panel says the model kind.
ROLE_STYLES = {
    "source": {"color": "#7f7f7f", "linestyle": "--"},
    "scratch": {"color": None, "linestyle": "-"},
    "constructed": {"color": "#2ca02c", "linestyle": "-"},
}


ARROW = {"arrowstyle": "-", "color": "#2ca02c", "linewidth": 0.6}
EVAL_HANDLE = Line2D(
    [], [], color="grey", marker="o", markerfacecolor="none", linestyle="", label="eval mode, end"
)


def construction_figure(trios: dict[str, Trio], out_dir: str | Path) -> list[Path]:
    """Training error vs iterations, one panel per model kind: the source, the deep net from
    scratch and the deep net constructed, whose starting error is marked at iteration 0."""
    if not trios:
        return []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            1, len(trios), figsize=(FULL_WIDTH, 2.6), sharey=True, squeeze=False
        )
        for ax, trio in zip(axes[0], trios.values(), strict=True):
            for role, run in _roles(trio):
                train, _ = run_curves(run.run_dir)
                style = dict(ROLE_STYLES[role])
                style["color"] = style["color"] or MODEL_COLORS.get(trio.model)
                label = model_label(trio.model, run.depth)
                if role == "constructed":
                    label += f" from {trio.source.depth}"
                ax.plot(train["iteration"], train["train_error"], label=label, **style)
                end, at = run.summary.get("final_train_error"), run.summary.get("iterations")
                if end is not None and at is not None:
                    ax.plot([at], [end], marker="o", markersize=4,
                            markerfacecolor="none", color=style["color"])  # fmt: skip
            start = trio.constructed.summary.get("initial_train_error")
            if start is not None:
                ax.plot([0], [start], marker="*", markersize=8, color="#2ca02c", linestyle="")
                ax.annotate(f"constructed: {_pct(start)}", (0, start), xytext=(14, 16),
                            textcoords="offset points", arrowprops=ARROW)  # fmt: skip
            ax.set_title(model_label(trio.model))
            _iteration_axis(ax)
            _percent_axis(ax, "training error")
            handles, _ = ax.get_legend_handles_labels()
            ax.legend(handles=[*handles, EVAL_HANDLE], loc="center right")
        _zero_bottom(axes[0])
        fig.tight_layout()
        return save_figure(fig, out_dir, FIGURE)


def write_construction(paths: Sequence[str | Path], out_dir: str | Path) -> dict[str, Trio]:
    """Write the figure (PNG + PDF) under out_dir/figures and out_dir/report.md; the trios."""
    trios = find_trios(paths)
    out_dir = Path(out_dir)
    construction_figure(trios, out_dir / "figures")
    out_dir.mkdir(parents=True, exist_ok=True)
    body = construction_markdown(trios) if trios else "No constructed run found.\n"
    (out_dir / "report.md").write_text("# Construction report\n\n" + body)
    return trios
