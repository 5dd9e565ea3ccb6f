"""A run that starts from a trained shallower run (init_from): checks, restore, construction.

The mapping itself is resnet_flax.models.construct; this module reads the source run
directory, measures the BN inputs the plain construction needs on the training set, and
checks that the constructed net's training error is the source's before any step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_flax.data import augment as aug
from resnet_flax.data.config import DataConfig
from resnet_flax.models.construct import check_construction, construct, extra_layers
from resnet_flax.models.resnet import flatten_responses
from resnet_flax.models.spec import ModelSpec
from resnet_flax.rundir import (
    CHECKPOINT_DIR,
    CONSTRUCTION_FILE,
    RUN_CONFIG_FILE,
    read_json,
    read_summary,
    write_json,
)
from resnet_flax.training.checkpoints import Checkpointer, abstract_like
from resnet_flax.training.config import ConfigError
from resnet_flax.training.evaluate import array_eval_batches
from resnet_flax.training.optim import OptimConfig, make_optimizer
from resnet_flax.training.run_config import RunConfig
from resnet_flax.training.state import initial_state

log = logging.getLogger(__name__)

# Data fields that decide the training set and its normalisation: the constructed net
# reproduces its source's training error only on the same images, normalised the same way.
SAME_DATA = ("name", "path", "validation_size", "normalization")


class ConstructionError(RuntimeError):
    """The constructed net does not reproduce its source's training error."""


@dataclass(frozen=True)
class SourceRun:
    """The trained run a construction starts from: its directory and configuration."""

    run_dir: Path
    spec: ModelSpec
    optim: OptimConfig
    seed: int


def has_checkpoint(run_dir: Path) -> bool:
    """Whether run_dir holds an Orbax step directory (without creating anything there)."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    return ckpt.is_dir() and any(p.is_dir() and p.name.isdigit() for p in ckpt.iterdir())


def check_source(init_from: str, spec: ModelSpec, data_cfg: DataConfig) -> SourceRun:
    """The source run of `init_from`, checked against this run (its completed `spec`) before
    anything compiles; ConfigError or SpecError in one line otherwise."""
    run_dir = Path(init_from)
    raw = read_json(run_dir / RUN_CONFIG_FILE)
    if not raw:
        raise ConfigError(
            f"init_from={init_from} is not a training run directory (no {RUN_CONFIG_FILE}); "
            "give the directory of a trained run"
        )
    cfg = RunConfig.from_dict(raw)
    source = SourceRun(run_dir, cfg.model, cfg.optim, cfg.info.seed)
    check_construction(source.spec, spec)
    for name in SAME_DATA:
        theirs, ours = getattr(cfg.dataset, name), getattr(data_cfg, name)
        if theirs != ours:
            raise ConfigError(
                f"init_from={init_from} trained with dataset.{name}={theirs!r}, this run has "
                f"{ours!r}: a constructed net keeps its source's error only on the same data"
            )
    if not has_checkpoint(run_dir):
        raise ConfigError(
            f"init_from={init_from} has no checkpoint; train it to the end first "
            "(its last iteration is always saved)"
        )
    return source


def restore_source(source: SourceRun, order_len: int) -> tuple[int, nnx.State, nnx.State]:
    """(iteration, params, batch_stats) of the source run's newest checkpoint that restores."""
    _, template = initial_state(source.spec, source.seed, make_optimizer(source.optim), order_len)
    checkpointer = Checkpointer(source.run_dir / CHECKPOINT_DIR)
    restored = checkpointer.restore_latest(abstract_like(template))
    checkpointer.close()
    if restored is None:
        raise ConfigError(f"init_from={source.run_dir}: no checkpoint restores; train it again")
    step, state = restored
    return int(step), state["params"], state["batch_stats"]


def input_moments(
    graphdef, params, batch_stats, x: np.ndarray, mean, std, names: list[str], batch: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, var) over a dataset of the named branch convs' responses, eval mode.

    Where the named layers' BNs are identities, as in a partly constructed net, a response
    is its BN's input.
    """

    @jax.jit
    def sums(params, batch_stats, x, valid):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        _, responses = model(aug.normalize(x, mean, std), train=False, capture=True)
        w = valid.astype(jnp.float32)[:, None, None, None]
        out = {}
        for name, r in flatten_responses(responses):
            if name in names:
                r = r.astype(jnp.float32)
                count = jnp.sum(w) * r.shape[1] * r.shape[2]  # positions of the valid rows
                out[name] = (count, jnp.sum(w * r, (0, 1, 2)), jnp.sum(w * r * r, (0, 1, 2)))
        return out

    # Host sums in float64: tens of millions of positions on CIFAR.
    totals = {name: (0.0, 0.0, 0.0) for name in names}
    labels = np.zeros(len(x), np.int32)
    for xb, _, valid in array_eval_batches(x, labels, batch):
        out = jax.device_get(sums(params, batch_stats, jnp.asarray(xb), jnp.asarray(valid)))
        for name, part in out.items():
            totals[name] = tuple(
                t + np.asarray(p, np.float64) for t, p in zip(totals[name], part, strict=True)
            )
    moments = {}
    for name, (count, s1, s2) in totals.items():
        m = s1 / count
        moments[name] = (m, np.maximum(s2 / count - m * m, 0.0))
    return moments


def construct_state(
    graphdef, fresh: tuple[nnx.State, nnx.State], src: tuple[nnx.State, nnx.State],
    specs: tuple[ModelSpec, ModelSpec], x_train: np.ndarray, mean, std, batch: int = 500,
) -> tuple[nnx.State, nnx.State]:  # fmt: skip
    """The target's (params, batch_stats) built from the source's, as nnx States.

    `specs` is (source, target). A plain target is constructed twice: first with its extra
    BNs as identities at their fresh statistics, to measure each extra BN's input over
    `x_train` in eval mode, then with those statistics.
    """
    source, target = specs
    pure = [tuple(s.to_pure_dict() for s in pair) for pair in (src, fresh)]
    params, stats = construct(source, target, pure[0], pure[1])
    names = extra_layers(source, target)
    if target.model == "plain" and names:
        partial = _as_states(fresh, params, stats)
        inputs = input_moments(graphdef, *partial, x_train, mean, std, names, batch)
        params, stats = construct(source, target, pure[0], pure[1], inputs)
    return _as_states(fresh, params, stats)


def _as_states(like: tuple[nnx.State, nnx.State], params: dict, stats: dict) -> tuple:
    """(params, batch_stats) States of `like`'s structure holding the given pure dicts."""
    out = []
    for state, pure in zip(like, (params, stats), strict=True):
        state = jax.tree.map(lambda a: a, state)  # a copy: replace_by_pure_dict works in place
        state.replace_by_pure_dict(pure)
        out.append(state)
    return tuple(out)


def write_construction(run_dir: Path, source: SourceRun, step: int, loss: float, error: float):
    """Record where a constructed run started: its source and the constructed training error."""
    record = {
        "init_from": str(source.run_dir),
        "init_from_depth": source.spec.depth,
        "init_from_iteration": step,
        "initial_train_error": error,
        "initial_train_loss": loss,
    }
    write_json(Path(run_dir) / CONSTRUCTION_FILE, record)


def construction_fields(run_dir: Path) -> dict:
    """The summary fields of a constructed run ({} for a run trained from scratch)."""
    return read_json(Path(run_dir) / CONSTRUCTION_FILE)


def check_reproduced(source: SourceRun, step: int, error: float, n_train: int) -> None:
    """Raise ConstructionError when the source's final training error at this checkpoint
    and the constructed net's differ by more than the one image float rounding may flip."""
    summary = read_summary(source.run_dir)
    expected = summary.get("final_train_error")
    if expected is None or summary.get("iterations") != step:
        log.warning("%s records no final training error at iteration %d", source.run_dir, step)
        return
    if abs(expected - error) * n_train > 1.5:
        raise ConstructionError(
            f"the net constructed from {source.run_dir} has training error {error:.6f}, its "
            f"source {expected:.6f}: the construction is not exact"
        )
