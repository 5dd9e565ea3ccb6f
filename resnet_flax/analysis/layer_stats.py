"""Per-layer diagnostics of a trained run: response std (Fig. 7) and gradient norms."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_flax.analysis.runs import run_status
from resnet_flax.data import augment as aug
from resnet_flax.data.memory import load_dataset
from resnet_flax.models.resnet import flatten_responses
from resnet_flax.rundir import (
    ANALYSIS_FILE,
    CHECKPOINT_DIR,
    RUN_CONFIG_FILE,
    RunStatus,
    metrics_iterations,
    read_summary,
    write_json,
)
from resnet_flax.training.checkpoints import Checkpointer, CheckpointMismatch, abstract_like
from resnet_flax.training.optim import make_optimizer
from resnet_flax.training.run_config import RunConfig, read_run_config
from resnet_flax.training.state import initial_state
from resnet_flax.training.steps import cross_entropy

log = logging.getLogger(__name__)


class AnalysisError(ValueError):
    """A run directory that cannot be analysed; the message says why."""


def load_run_config(run_dir: Path) -> RunConfig:
    """The configuration that train() recorded in the run directory."""
    cfg = read_run_config(run_dir)
    if cfg is None:
        raise AnalysisError(f"{run_dir} has no {RUN_CONFIG_FILE}: is it a training run directory?")
    return cfg


def kernel_layers(params) -> list[tuple[str, jax.Array]]:
    """Each branch conv's kernel (3x3 and others) in layer order, named as the responses are."""
    stages = [
        {"first": _kernels(stage["first"]), "rest": _kernels(stage.get("rest"))}
        for _, stage in sorted(params["stages"].items())
    ]
    return flatten_responses(stages)


def _kernels(blocks) -> list[jax.Array]:
    """The conv kernels of a block (or of stacked blocks) in order; [] for no blocks."""
    if blocks is None:
        return []
    return [conv["conv"]["kernel"] for _, conv in sorted(blocks["convs"].items())]


def gradient_norm_fn(
    graphdef, x: jax.Array, y: jax.Array, compiler_options: dict | None = None
) -> Callable[..., dict[str, float]]:
    """A compiled (params, batch_stats) -> {layer: gradient L2 norm} on one batch, train mode.

    Built once per run so the initial and the final parameters share one compilation;
    `compiler_options` go to XLA (jax.jit's).
    """

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def grads(params, batch_stats):
        def loss(p):
            model = nnx.merge(graphdef, p, batch_stats, copy=True)
            return cross_entropy(model(x, train=True), y)

        return jax.grad(loss)(params)

    def norms(params, batch_stats) -> dict[str, float]:
        g = grads(params, batch_stats)
        return {name: float(jnp.linalg.norm(k)) for name, k in kernel_layers(g)}

    return norms


def response_std(
    graphdef, params, batch_stats, x_all: np.ndarray, mean, std, batch: int = 500
) -> dict[str, float]:
    """Std of each branch conv's response (after BN, before addition/ReLU) over a dataset.

    The std is taken per channel over examples and positions, then averaged over channels.
    """

    @jax.jit
    def moments(x):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        _, responses = model(aug.normalize(x, mean, std), train=False, capture=True)
        return {
            name: (
                jnp.sum(r.astype(jnp.float32), axis=(0, 1, 2)),
                jnp.sum(jnp.square(r.astype(jnp.float32)), axis=(0, 1, 2)),
                r.shape[0] * r.shape[1] * r.shape[2],
            )
            for name, r in flatten_responses(responses)
        }

    totals = None
    for start in range(0, len(x_all), batch):
        m = jax.device_get(moments(jnp.asarray(x_all[start : start + batch])))
        totals = (
            m
            if totals is None
            else {k: tuple(a + b for a, b in zip(totals[k], m[k], strict=True)) for k in m}
        )
    out = {}
    for name, (s1, s2, n) in totals.items():
        var = np.maximum(s2 / n - np.square(s1 / n), 0.0)
        out[name] = float(np.mean(np.sqrt(var)))
    return out


def restore_final(
    run_dir: Path,
    template: dict,
    summary: dict,
    allow_older: bool = False,
    allow_unfinished: bool = False,
) -> tuple[int, dict]:
    """(step, state) of the newest checkpoint that restores; an AnalysisError when there is
    none, when the run did not complete and not `allow_unfinished`, or when the checkpoint is
    older than the run's `summary` iteration and not `allow_older`. Reads only."""
    check_finished(run_dir, summary, allow_unfinished)
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise AnalysisError(f"{run_dir} has no {CHECKPOINT_DIR}/; train it first")
    checkpointer = Checkpointer(run_dir / CHECKPOINT_DIR)
    try:
        restored = checkpointer.restore_latest(abstract_like(template))
    except CheckpointMismatch as err:
        raise AnalysisError(str(err)) from None
    finally:
        checkpointer.close()
    if restored is None:
        raise AnalysisError(f"{run_dir} has no checkpoint that restores; train it first")
    step, state = restored
    final = summary.get("iterations")
    if final is not None and step < final and not allow_older:
        raise AnalysisError(
            f"{run_dir}: the newest checkpoint that restores is at iteration {step}, older than "
            f"iteration {final} in summary.json (status {summary.get('status')}); rerun the "
            "training to save it again, or pass --allow-older-checkpoint to analyse "
            f"iteration {step}"
        )
    log.info("%s: analysing the checkpoint at iteration %d (run at %s)", run_dir, step, final)
    return int(step), state


def check_finished(run_dir: Path, summary: dict, allow_unfinished: bool) -> None:
    """An AnalysisError for a run that did not complete: its newest checkpoint is no final net."""
    status = run_status(run_dir, summary)
    if status == RunStatus.COMPLETED or allow_unfinished:
        return
    reached = metrics_iterations(run_dir)
    where = f" at iteration {reached}" if reached is not None else ""
    raise AnalysisError(
        f"{run_dir} is {status}{where}, not completed: its newest checkpoint is not the trained "
        "network; finish the run (rerun its training command), or pass --allow-unfinished to "
        "analyse it as it is"
    )


def analyze_run(
    run_dir: str | Path,
    grad_batch: int = 256,
    allow_older_checkpoint: bool = False,
    allow_unfinished: bool = False,
) -> dict:
    """Test-set response std and gradient norms at init and at the end, into analysis.json."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    spec, seed = cfg.model, cfg.info.seed
    data = load_dataset(cfg.dataset)
    mean, std = aug.normalization_stats(data.x_train, cfg.dataset.normalization)

    # The initial parameters are a function of the seed; the same state is the restore template.
    graphdef, template = initial_state(spec, seed, make_optimizer(cfg.optim), len(data.x_train))
    init_params, init_stats = template["params"], template["batch_stats"]
    summary = read_summary(run_dir)
    step, state = restore_final(
        run_dir, template, summary, allow_older_checkpoint, allow_unfinished
    )

    x = aug.normalize(jnp.asarray(data.x_train[:grad_batch]), mean, std)
    y = jnp.asarray(data.y_train[:grad_batch])
    gradient_norms = gradient_norm_fn(graphdef, x, y)
    g_init = gradient_norms(init_params, init_stats)
    g_final = gradient_norms(state["params"], state["batch_stats"])
    stds = response_std(graphdef, state["params"], state["batch_stats"], data.x_test, mean, std)
    kernels = dict(kernel_layers(state["params"]))
    layers = [
        {
            "name": name,
            "index": i,
            "kernel": int(kernels[name].shape[0]),
            "response_std": stds[name],
            "grad_norm_init": g_init[name],
            "grad_norm_final": g_final[name],
        }
        for i, name in enumerate(n for n in stds if kernels[n].shape[0] == 3)
    ]
    result = {
        "model": spec.model,
        "depth": spec.depth,
        "shortcut": spec.shortcut,
        "seed": seed,
        "checkpoint_step": step,
        "run_iterations": summary.get("iterations"),
        "grad_batch": grad_batch,
        "layers": layers,
    }
    write_json(run_dir / ANALYSIS_FILE, result)
    return result
