"""The landscape of one trained run: its surfaces and trajectory plane, saved beside each other."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jax.flatten_util import ravel_pytree

from resnet_flax.analysis.landscape import (
    LandscapeConfig,
    SurfaceEvaluator,
    axis,
    kernel_mask,
    net_loss,
    pca_plane,
    plane_coords,
    random_directions,
    trajectory_axes,
)
from resnet_flax.analysis.layer_stats import AnalysisError
from resnet_flax.analysis.run_state import (
    RunParts,
    RunStates,
    load_data,
    read_run,
    require_checkpoints,
    require_step,
)
from resnet_flax.backend import current_backend
from resnet_flax.rundir import write_json
from resnet_flax.training.config import compiler_options

log = logging.getLogger(__name__)

SURFACE_FILE = "surface.npz"  # every array, the two directions included
LANDSCAPE_FILE = "landscape.json"  # the same without the directions (small, for figures)


@dataclass(frozen=True)
class LandscapePlan:
    """A run checked for a landscape: the centre step and the trajectory's steps."""

    run: RunParts
    step: int
    trajectory_steps: tuple[int, ...]


def plan_landscape(run_dir: str | Path, cfg: LandscapeConfig) -> LandscapePlan:
    """Check the settings and the run (a run directory, the step kept, enough checkpoints for
    a trajectory) without loading data or compiling; AnalysisError says what is wrong."""
    cfg.check()
    run = read_run(run_dir)
    step = require_step(run, cfg.step)
    steps: tuple[int, ...] = ()
    if cfg.trajectory:
        kept = require_checkpoints(run, cfg.min_checkpoints)
        steps = tuple(s for s in kept if s <= step)
        if len(steps) < cfg.min_checkpoints:
            raise AnalysisError(
                f"{run.run_dir} kept {len(steps)} checkpoint(s) at or before iteration {step}; "
                f"the trajectory needs at least {cfg.min_checkpoints}: centre on a later step"
            )
    return LandscapePlan(run, step, steps)


def training_subset(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a fixed training subset (size 0 or >= n: all of them)."""
    if size == 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def landscape_run(plan: LandscapePlan, cfg: LandscapeConfig, out_dir: str | Path) -> dict:
    """The 1-D and 2-D surfaces around the plan's step and its trajectory plane; writes
    out_dir/surface.npz (with the directions) and out_dir/landscape.json; returns the latter."""
    run, out_dir = plan.run, Path(out_dir)
    data, mean, std = load_data(run)
    rows = training_subset(len(data.x_train), cfg.subset, cfg.seed)
    states = RunStates(run, data)
    centre = states.restore(plan.step)
    params, stats = centre["params"], centre["batch_stats"]
    loss_fn = functools.partial(net_loss, states.graphdef)
    net_data = (stats, data.x_train[rows], data.y_train[rows], mean, std)
    options = compiler_options(run.trainer, current_backend())
    evaluate = SurfaceEvaluator(loss_fn, net_data, cfg, options)
    d1, d2 = random_directions(cfg.seed, params)
    record = _identity(run, plan, cfg, len(rows))
    arrays: dict[str, np.ndarray] = {}

    alphas = axis(cfg.points_1d, -cfg.span, cfg.span)
    t0 = time.perf_counter()
    arrays["loss_1d"], arrays["error_1d"] = evaluate(params, d1, d2, plane_coords(alphas, [0.0]))
    record["wall_1d_s"] = time.perf_counter() - t0 - evaluate.compile_s
    arrays["alphas"] = alphas

    xs = axis(cfg.points_2d, -cfg.span, cfg.span)
    t0 = time.perf_counter()
    loss, error = evaluate(params, d1, d2, plane_coords(xs, xs))
    record["wall_2d_s"] = time.perf_counter() - t0
    shape = (len(xs), len(xs))
    arrays.update(xs=xs, ys=xs, loss_2d=loss.reshape(shape), error_2d=error.reshape(shape))
    record["compile_s"] = evaluate.compile_s
    if plan.trajectory_steps:
        t0 = time.perf_counter()
        arrays.update(_trajectory(plan, cfg, states, centre, evaluate, record))
        record["wall_trajectory_s"] = time.perf_counter() - t0
    flat = {k: np.asarray(v) for k, v in arrays.items()}
    record.update({k: v.tolist() for k, v in flat.items()})
    record["loss_range_2d"] = [float(np.min(loss)), float(np.max(loss))]
    out_dir.mkdir(parents=True, exist_ok=True)
    directions = {"direction_1": ravel_pytree(d1)[0], "direction_2": ravel_pytree(d2)[0]}
    np.savez(out_dir / SURFACE_FILE, **flat, **{k: np.asarray(v) for k, v in directions.items()})
    write_json(out_dir / LANDSCAPE_FILE, record)
    log.info("%s: 2-D grid of %d points in %.1f s", run.name, loss.size, record["wall_2d_s"])
    return record


def _trajectory(plan, cfg, states, centre, evaluate, record) -> dict[str, np.ndarray]:
    """The PCA plane of theta_k - theta_final (kernels only) and the loss over it."""
    final, unravel = ravel_pytree(centre["params"])
    mask = kernel_mask(centre["params"])
    points = [np.asarray(ravel_pytree(states.initial["params"])[0])]
    for step in plan.trajectory_steps:
        points.append(np.asarray(ravel_pytree(states.restore(step)["params"])[0]))
    diffs = (np.stack(points) - np.asarray(final)[None]) * mask[None]
    components, explained, coords = pca_plane(diffs)
    xs, ys = trajectory_axes(coords, cfg.trajectory_points)
    c1, c2 = unravel(components[0]), unravel(components[1])
    loss, error = evaluate(centre["params"], c1, c2, plane_coords(xs, ys))
    shape = (len(xs), len(ys))
    record["trajectory_steps"] = [0, *plan.trajectory_steps]
    record["explained_variance"] = [float(v) for v in explained]
    return {
        "trajectory": coords,
        "plane_xs": xs,
        "plane_ys": ys,
        "plane_loss": loss.reshape(shape),
        "plane_error": error.reshape(shape),
    }


def _identity(run: RunParts, plan: LandscapePlan, cfg: LandscapeConfig, subset: int) -> dict:
    """The fields that say which run, checkpoint and settings a surface belongs to."""
    return {
        "run_dir": str(run.run_dir),
        "model": run.spec.model,
        "depth": run.spec.depth,
        "seed": run.seed,
        "step": plan.step,
        "final_train_error": run.summary.get("final_train_error"),
        "final_train_loss": run.summary.get("final_train_loss"),
        "subset_size": subset,
        "config": cfg.to_dict(),
    }
