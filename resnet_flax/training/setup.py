"""A run made ready to train: its resolved config, data source, seeds, program and state."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from resnet_flax.backend import current_backend
from resnet_flax.data.memory import Dataset
from resnet_flax.data.stream import Stream
from resnet_flax.rundir import CHECKPOINT_DIR
from resnet_flax.training.cache_events import CacheEvents
from resnet_flax.training.checkpoints import Checkpointer
from resnet_flax.training.config import check_devices, compiler_options
from resnet_flax.training.construction import (
    SourceRun,
    check_reproduced,
    check_source,
    construct_state,
    restore_source,
    write_construction,
)
from resnet_flax.training.optim import OptimStructure, hyperparameters, make_optimizer
from resnet_flax.training.run_config import RunConfig, resolve_run
from resnet_flax.training.runtime import put_replicated
from resnet_flax.training.seeds import SeedGroup
from resnet_flax.training.sources import DataSource, make_source
from resnet_flax.training.steps import Program, Recipe, eval_sums

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """A run ready to train: its resolved config, data source, seeds, program and state."""

    cfg: RunConfig  # every "auto" resolved: what the run records
    backend: str  # JAX's backend, asked once
    mesh: Mesh
    source: DataSource
    group: SeedGroup
    graphdef: nnx.GraphDef
    program: Program
    state: dict
    param_count: int
    constructed_from: SourceRun | None  # init_from's trained run, checked
    cache_events: CacheEvents  # the compilation cache's hits and misses from set-up on


def set_up(cfg: RunConfig, data: Dataset | Stream, mesh: Mesh) -> Setup:
    """Resolve the config, build the initial state(s) and the program, put the data on device.

    trainer.vmap_seeds = k > 1 stacks seeds seed .. seed+k-1 into one state and program.
    Every check runs here, before anything compiles.
    """
    cache_events = CacheEvents()
    backend = current_backend()
    check_devices(cfg.trainer, mesh.size)
    source = make_source(data, cfg.dataset, cfg.trainer, mesh)
    shape = (source.num_classes, source.image_shape[-1])
    cfg = resolve_run(cfg, backend, jax.local_device_count(), shape, source.eval_batch_size)
    init_from = cfg.info.init_from
    origin = check_source(init_from, cfg.model, cfg.dataset) if init_from else None
    group = SeedGroup(cfg.info.seed, cfg.trainer.vmap_seeds)
    tx = make_optimizer(cfg.optim)
    graphdef, state, param_count = group.initial_state(cfg.model, tx, source.order_len, mesh)
    step = group.vmap_step(source.train_step(Recipe(graphdef, OptimStructure.of(cfg.optim))))
    evaluate = group.vmap_eval(functools.partial(eval_sums, graphdef))
    numbers = hyperparameters(cfg.optim, cfg.trainer.iterations)
    hparams = {k: put_replicated(v, mesh) for k, v in numbers.items()}
    options = compiler_options(cfg.trainer, backend)
    program = Program(step, evaluate, hparams, cfg.trainer.step_loop, options)
    parts = (mesh, source, group, graphdef, program, state, param_count, origin, cache_events)
    return Setup(cfg, backend, *parts)


def construct_start(run: Setup, run_dir: Path) -> None:
    """Write the net constructed from run.constructed_from as run_dir's step-0 checkpoint.

    Checks that it reproduces its source's training error and records the construction
    (construction.json); training then resumes from that checkpoint like any other.
    """
    source, data = run.constructed_from, run.source.data
    step, src_params, src_stats = restore_source(source, run.source.order_len)
    params, stats = construct_state(
        run.graphdef,
        (run.state["params"], run.state["batch_stats"]),
        (src_params, src_stats),
        (source.spec, run.cfg.model),
        data.x_train,
        *run.source.stats,
        batch=run.source.eval_batch_size,
    )
    state = run.group.replicate({**run.state, "params": params, "batch_stats": stats}, run.mesh)
    loss, error = run.source.evaluate(run.program, state, "train")
    check_reproduced(source, step, float(error), len(data.x_train))
    depth = run.cfg.model.depth
    log.info("constructed %s from %s: training error %.4f", depth, source.run_dir, error)
    if jax.process_index() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_construction(run_dir, source, step, float(loss), float(error))
    keep = run.cfg.trainer.keep_checkpoints
    checkpointer = Checkpointer(Path(run_dir) / CHECKPOINT_DIR, keep=keep)
    checkpointer.save(0, state)
    checkpointer.close()
