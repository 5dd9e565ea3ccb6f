"""The one training loop: model + dataset + recipe -> a finished, resumable run directory."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from resnet_flax.data.memory import DataConfig, Dataset
from resnet_flax.data.stream import Stream
from resnet_flax.models.spec import ModelSpec, complete_spec
from resnet_flax.rundir import RunStatus, git_commit, library_versions
from resnet_flax.rundir.identity import claim_run_dir
from resnet_flax.rundir.owner import owning
from resnet_flax.training.config import (
    RunInfo,
    TrainerConfig,
    check_trainer,
    compiler_options,
    resolve_loop,
)
from resnet_flax.training.construction import SourceRun, check_source, start_state
from resnet_flax.training.optim import OptimConfig, make_optimizer, make_schedule
from resnet_flax.training.preemption import RunInterrupted, StopRequests
from resnet_flax.training.runtime import make_mesh
from resnet_flax.training.seeds import SeedGroup
from resnet_flax.training.sources import MemorySource, StreamSource, make_source, open_data
from resnet_flax.training.steps import Program, Recipe, eval_sums

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """A run ready to train: its network, seeds, data source, compiled program and state."""

    spec: ModelSpec
    trainer: TrainerConfig
    mesh: Mesh
    source: MemorySource | StreamSource
    group: SeedGroup
    graphdef: nnx.GraphDef
    program: Program
    state: dict
    param_count: int
    origin: SourceRun | None = None  # the trained run a constructed net starts from


def set_up(
    spec: ModelSpec,
    data: Dataset | Stream,
    data_cfg: DataConfig,
    optim: OptimConfig,
    trainer: TrainerConfig,
    seed: int = 0,
    init_from: str | None = None,
) -> Setup:
    """Check everything, build the initial state(s) and the program, put the data on device.

    trainer.vmap_seeds = k > 1 stacks seeds seed .. seed+k-1 into one state and program.
    init_from: a trained run directory the net is constructed from (training.construction).
    Every check runs here, before anything compiles.
    """
    mesh = make_mesh()
    check_trainer(trainer, mesh.size)
    source = make_source(data, data_cfg, trainer, mesh)
    spec = complete_spec(spec, source.num_classes, source.image_shape[-1], trainer.batch_size)
    origin = check_source(init_from, spec, data_cfg, trainer) if init_from else None
    trainer = dataclasses.replace(trainer, eval_batch_size=source.eval_batch_size)
    group = SeedGroup(seed, trainer.vmap_seeds)
    tx = make_optimizer(optim)
    graphdef, state, param_count = group.initial_state(spec, tx, source.order_len, mesh)
    recipe = Recipe(graphdef, optim, tx, make_schedule(optim, trainer.iterations))
    step = group.vmap_step(source.train_step(recipe))
    evaluate = group.vmap_eval(functools.partial(eval_sums, graphdef))
    program = Program(step, evaluate, resolve_loop(trainer.step_loop), compiler_options(trainer))
    return Setup(spec, trainer, mesh, source, group, graphdef, program, state, param_count, origin)


@owning  # the run directories this call claims are released when it returns
def train(
    run_dir: str | Path,
    spec: ModelSpec,
    data_cfg: DataConfig,
    optim: OptimConfig,
    trainer: TrainerConfig,
    info: RunInfo,
    dataset: Dataset | Stream | None = None,
) -> dict:
    """Train (or resume) one run into run_dir and return its summary.

    With trainer.vmap_seeds = k > 1, seeds info.seed .. info.seed+k-1 train as one compiled
    program, each into run_dir/seed_<s>; the return value then holds every seed's summary
    under "runs". Bad configurations raise before anything compiles. A non-finite loss ends
    a run with status RunStatus.DIVERGED (returned, not raised) so a sweep can go on. A stop
    signal (preemption.STOP_SIGNALS) ends the chunk, checkpoints, records the run as
    interrupted and raises RunInterrupted; the same call again resumes it.
    """
    run_dir = Path(run_dir)
    data = dataset if dataset is not None else open_data(data_cfg, trainer, info.seed)
    run = set_up(spec, data, data_cfg, optim, trainer, info.seed, info.init_from)
    trainer, source, group, program = run.trainer, run.source, run.group, run.program
    warn_if_vmapped_on_cpu(group)
    parts = {"model": run.spec, "data": data_cfg, "optim": optim, "trainer": trainer, "info": info}
    config = {name: dataclasses.asdict(part) for name, part in parts.items()}
    writer = jax.process_index() == 0  # one process of a multi-host job writes the records
    # One owner, one run: refuse before restoring when the directory holds another run.
    claim = claim_run_dir(run_dir, config, trainer.allow_recipe_change, lock=writer)
    start, state = group.restore(run_dir, run.state, trainer.keep_checkpoints, run.mesh)
    state, origin_fields = start_state(run, run_dir, start, state)  # init_from: constructed
    fields = {**run_fields(run, info), **origin_fields}
    group.open_records(run_dir, start, info, fields, claim.record(start, writer), writer)
    source.start(start)
    bar = progress_bar(run, start)
    t_start, train_s, iteration, stopped = time.perf_counter(), 0.0, start, None
    with StopRequests() as stop:
        try:
            if start == 0:  # the curves start at the untrained network, as the paper's do
                group.log_eval(epoch_line(0, source), evaluate_all(run, state, source.eval_splits))
            while iteration < trainer.iterations and group.running and stopped is None:
                length = min(trainer.log_every, trainer.iterations - iteration)
                state, metrics, elapsed, waited = timed_chunk(run, state, length)
                train_s, iteration = train_s + elapsed, iteration + length
                line = {
                    **epoch_line(iteration, source),
                    # Per run, as in summary.json: k seeds in one program process k times this.
                    "images_per_sec": length * trainer.batch_size / elapsed,
                    # Share of the interval spent waiting for input: 0: the host keeps up.
                    "input_wait_fraction": waited / elapsed,
                }
                shown = group.log_train(line, metrics, iteration)
                bar.update(length)
                bar.set_postfix(
                    loss=f"{shown['train_loss']:.3f}",
                    err=f"{shown['train_error']:.3f}",
                    img_s=f"{line['images_per_sec']:.0f}",
                )
                done = iteration >= trainer.iterations
                if iteration % trainer.eval_every == 0 or done:
                    group.log_eval(line, evaluate_all(run, state, source.eval_splits))
                if iteration % trainer.checkpoint_every == 0 or done:
                    group.save(iteration, state)
                stopped = None if done else stop.agreed()
            if stopped is not None and group.running:
                group.interrupt(iteration, state, stopped, source.steps_per_epoch)
        except BaseException as err:
            group.fail(err, iteration)
            raise
        finally:
            bar.close()
            source.close()
            group.close_checkpoints()
    if stopped is not None and any(r.status == RunStatus.INTERRUPTED for r in group.runs):
        raise RunInterrupted(stopped, iteration, str(run_dir))
    completed = iteration >= trainer.iterations
    final = evaluate_all(run, state, source.final_splits) if completed else {}
    images = (iteration - start) * trainer.batch_size
    timing = {
        "compile_time_s": program.compile_s,
        "wall_s": time.perf_counter() - t_start,
        "images_per_sec": images / train_s if train_s else None,
        "input_wait_fraction": source.wait_s / train_s if train_s else None,
    }
    return group.finish(iteration, source.steps_per_epoch, final, timing)


def timed_chunk(run: Setup, state: dict, length: int) -> tuple[dict, dict, float, float]:
    """Train `length` steps: (state, host metrics, training seconds, seconds waiting for input)."""
    program, source = run.program, run.source
    compile_before, wait_before, t0 = program.compile_s, source.wait_s, time.perf_counter()
    state, metrics = source.run_chunk(program, state, length)
    metrics = jax.device_get(metrics)
    # Compilation happens inside the first chunk of each length: not training time.
    elapsed = time.perf_counter() - t0 - (program.compile_s - compile_before)
    return state, metrics, elapsed, source.wait_s - wait_before


def evaluate_all(run: Setup, state: dict, splits: tuple[str, ...]) -> dict[str, tuple]:
    """{split: (loss, error)} of the state (per seed when vmapped) on each split."""
    return {split: run.source.evaluate(run.program, state, split) for split in splits}


def epoch_line(iteration: int, source: MemorySource | StreamSource) -> dict:
    """The position fields every metrics line starts with."""
    return {"iteration": iteration, "epoch": iteration / source.steps_per_epoch}


def run_fields(run: Setup, info: RunInfo) -> dict:
    """The summary.json fields that identify a run and where it ran."""
    spec, source = run.spec, run.source
    return {
        "experiment": info.experiment,
        "model": spec.model,
        "depth": spec.depth,
        "shortcut": spec.shortcut,
        "family": spec.family,
        "dataset": source.name,
        "param_count": run.param_count,
        "batch_size": run.trainer.batch_size,
        "device_kind": jax.devices()[0].device_kind,
        "device_count": run.mesh.size,
        "process_count": jax.process_count(),
        "vmap_seeds": len(run.group.seeds),
        "versions": library_versions(),
        "git_commit": git_commit(),
        **source.summary_fields,
    }


def progress_bar(run: Setup, start: int) -> tqdm:
    """A tqdm bar over the run's iterations (off with trainer.progress=false)."""
    seeds = ",".join(map(str, run.group.seeds))
    return tqdm(
        total=run.trainer.iterations,
        initial=start,
        disable=not run.trainer.progress,
        desc=f"{run.spec.model}-{run.spec.depth} seed {seeds}",
        unit="it",
        dynamic_ncols=True,
    )


def warn_if_vmapped_on_cpu(group: SeedGroup) -> None:
    """Say once that a seed group on CPU is slower than separate runs."""
    if group.stacked and jax.default_backend() == "cpu":
        log.warning(
            "vmap_seeds=%d on CPU: vmapped convolutions become grouped convolutions, which "
            "XLA:CPU runs several times slower per image than separate runs; seed groups "
            "pay on GPUs, where one small net leaves the device idle",
            len(group.seeds),
        )
