"""Probes of fresh nets or trained runs on the same images, one JSON file per net and state."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_flax.analysis.layer_stats import AnalysisError, gradient_norm_fn, kernel_layers
from resnet_flax.analysis.probes import (
    ProbeConfig,
    compiled,
    compiler_options,
    layer_signal,
    line_points,
    net_jacobian,
    net_line_gradients,
    net_signals,
    shattering_summary,
    signal_table,
    spectrum_summary,
)
from resnet_flax.analysis.run_state import RunStates, load_data, read_run, require_step
from resnet_flax.data import augment as aug
from resnet_flax.data.memory import Dataset
from resnet_flax.models.resnet import abstract_model, build_model
from resnet_flax.models.spec import ModelSpec, complete_spec
from resnet_flax.rundir import write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeInputs:
    """The normalised images every net is probed on (the same for all, so they compare)."""

    line_x: np.ndarray  # (lines * points, *image): the points of every line
    line_u: np.ndarray  # the direction of each point's line
    line_y: np.ndarray  # the label of each line's image, per point
    batch_x: np.ndarray  # (batch, *image): for the per-layer signals, Jacobian, gradients
    batch_y: np.ndarray

    @classmethod
    def from_dataset(cls, data: Dataset, normalization: str, cfg: ProbeConfig) -> ProbeInputs:
        """Draw the images and directions with cfg.seed from the training split."""
        mean, std = aug.normalization_stats(data.x_train, normalization)
        x = np.asarray(aug.normalize(jnp.asarray(data.x_train), mean, std))
        rng = np.random.default_rng(cfg.seed)
        rms = float(np.sqrt(np.mean(np.sum(x.reshape(len(x), -1) ** 2, axis=1))))
        lines = rng.choice(len(x), cfg.lines, replace=False)
        pts, dirs, _ = line_points(x[lines], rms, cfg, rng)
        batch = rng.choice(len(x), cfg.batch, replace=False)
        labels = np.repeat(data.y_train[lines], cfg.points)
        return cls(pts, dirs, labels, x[batch], data.y_train[batch])


def graphdefs(spec: ModelSpec) -> tuple[nnx.GraphDef, nnx.GraphDef]:
    """(the net's definition, the one the forward-mode probe runs): XLA's convolutions for
    the latter, since jax.jvp cannot pass the CPU conv's custom VJP (same parameters and
    function; the custom VJP's backward is the fast one on CPU, so the rest keep it)."""

    def split(s: ModelSpec) -> nnx.GraphDef:
        return nnx.split(abstract_model(s), nnx.Param, nnx.BatchStat)[0]

    return split(spec), split(spec.replace(conv_impl="xla"))


class Prober:
    """Runs every probe on one network's parameters; compiles once per network definition."""

    def __init__(self, inputs: ProbeInputs, cfg: ProbeConfig):
        self.inputs, self.cfg = inputs, cfg
        self._grad_norms: dict = {}

    def probe(self, spec: ModelSpec, params, batch_stats) -> dict:
        """The probes' results for these parameters (BN statistics as given)."""
        (graphdef, forward_mode), inp, cfg = graphdefs(spec), self.inputs, self.cfg
        lines = compiled(net_line_gradients)(
            forward_mode, params, batch_stats, inp.line_x, inp.line_u, inp.line_y
        )
        g = np.asarray(lines).reshape(cfg.lines, cfg.points)
        sigma = np.asarray(compiled(net_jacobian)(graphdef, params, batch_stats, inp.batch_x))
        names = [name for name, _ in kernel_layers(params)]
        signals = compiled(net_signals)(graphdef, params, batch_stats, inp.batch_x)
        if graphdef not in self._grad_norms:
            x, y = jnp.asarray(inp.batch_x), jnp.asarray(inp.batch_y)
            self._grad_norms[graphdef] = gradient_norm_fn(graphdef, x, y, compiler_options())
        norms = self._grad_norms[graphdef](params, batch_stats)
        return {
            "shattered": {**shattering_summary(g, cfg.max_lag), "example": g[0].tolist()},
            "signal": {
                "input_cosine": float(layer_signal(jnp.asarray(inp.batch_x))[1]),
                **signal_table(signals, names),
            },
            "jacobian": {**spectrum_summary(sigma), "singular_values": sigma.tolist()},
            "gradient_norms": [{"name": n, "norm": norms[n]} for n in names],
        }


def log10_ratio(a: float, b: float) -> float:
    """log10(a / b); NaN where either is 0 (a zero-initialised classifier, as Fixup's, leaves
    every earlier layer without a gradient at initialisation: no ratio to draw)."""
    return float(np.log10(a / b)) if a > 0 and b > 0 else math.nan


def summary_row(result: dict) -> dict:
    """The scalar quantities of one result that the figures draw against depth."""
    signal, grads = result["signal"], result["gradient_norms"]
    return {
        "lag1": result["shattered"]["lag1"],
        "correlation_length": result["shattered"]["correlation_length"],
        "jacobian_std_log_sigma": result["jacobian"]["std_log_sigma"],
        "jacobian_log10_condition": result["jacobian"]["log10_condition"],
        "cosine_last_train": signal["train"][-1]["cosine"],
        "cosine_last_eval": signal["eval"][-1]["cosine"],
        "second_moment_growth_eval": log10_ratio(
            signal["eval"][-1]["second_moment"], signal["eval"][0]["second_moment"]
        ),
        "gradient_norm_ratio": log10_ratio(grads[0]["norm"], grads[-1]["norm"]),
    }


def _record(out_dir: Path, fields: dict, result: dict) -> dict:
    """Write one net's result as <net>-<depth>_seed<s>_<state>[_<run id>].json; return it.

    A trained run's file names its run directory by a short digest, so runs of one net that
    differ in anything else (a learning rate of a sweep) keep a file each.
    """
    record = {**fields, **result}
    record["summary"] = summary_row(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{fields['net']}-{fields['depth']}_seed{fields['seed']}_{fields['state']}"
    if fields["run_dir"] is not None:
        name += "_" + hashlib.sha1(fields["run_dir"].encode()).hexdigest()[:8]
    name += ".json"
    write_json(out_dir / name, record)
    log.info("%s: lag-1 autocorrelation %.3f", name, record["summary"]["lag1"])
    return record


def probe_fresh(
    specs: Sequence[ModelSpec],
    data: Dataset,
    normalization: str,
    seeds: Sequence[int],
    cfg: ProbeConfig,
    out_dir: str | Path,
) -> list[dict]:
    """Probe freshly initialised nets (every spec x seed); JSON files under out_dir."""
    prober = Prober(ProbeInputs.from_dataset(data, normalization, cfg), cfg)
    records = []
    for spec in specs:
        spec = complete_spec(spec, data.num_classes, data.image_shape[-1])
        for seed in seeds:
            _, params, stats = nnx.split(build_model(spec, seed), nnx.Param, nnx.BatchStat)
            fields = _fields(spec, seed, "init", 0, None, cfg)
            records.append(_record(Path(out_dir), fields, prober.probe(spec, params, stats)))
    return records


def probe_runs(
    run_dirs: Sequence[str | Path],
    cfg: ProbeConfig,
    out_dir: str | Path,
    init_seeds: Sequence[int] = (),
) -> list[dict]:
    """Probe each run at initialisation (its seed, and fresh draws from `init_seeds`) and at
    its newest checkpoint.

    Every run is read and checked before anything compiles; they must share one dataset.
    """
    runs = [read_run(d) for d in run_dirs]
    if not runs:
        raise AnalysisError("no run directories to probe")
    mixed = sorted({r.data.name for r in runs if r.data != runs[0].data})
    if mixed:
        raise AnalysisError(
            f"probe runs of one dataset at a time; {runs[0].run_dir} used "
            f"{runs[0].data.name!r}, others {', '.join(mixed)} (or other dataset settings)"
        )
    steps = [require_step(run, None) for run in runs]
    data, _, _ = load_data(runs[0])
    prober = Prober(ProbeInputs.from_dataset(data, runs[0].data.normalization, cfg), cfg)
    records = []
    for run, step in zip(runs, steps, strict=True):
        states = RunStates(run, data)
        spec = complete_spec(run.spec, data.num_classes, data.image_shape[-1])
        final = states.restore(step)
        for state, name, at in ((states.initial, "init", 0), (final, "trained", step)):
            fields = _fields(spec, run.seed, name, at, run, cfg)
            result = prober.probe(spec, state["params"], state["batch_stats"])
            records.append(_record(Path(out_dir), fields, result))
        for seed in (s for s in init_seeds if s != run.seed):
            _, params, stats = nnx.split(build_model(spec, seed), nnx.Param, nnx.BatchStat)
            fields = _fields(spec, seed, "init", 0, None, cfg)
            records.append(_record(Path(out_dir), fields, prober.probe(spec, params, stats)))
    return records


def _fields(spec: ModelSpec, seed: int, state: str, iteration: int, run, cfg: ProbeConfig) -> dict:
    """The identifying fields of one result."""
    summary = run.summary if run is not None else {}
    return {
        "model": spec.model,
        "net": spec.variant,  # the model and its non-default options
        "depth": spec.depth,
        "seed": seed,
        "state": state,
        "iteration": iteration,
        "run_dir": str(run.run_dir) if run is not None else None,
        "final_train_error": summary.get("final_train_error"),
        "probe": cfg.to_dict(),
    }
