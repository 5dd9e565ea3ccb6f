"""The one training loop: model + dataset + recipe -> a finished, resumable run directory."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from resnet_flax.data.memory import Dataset
from resnet_flax.data.stream import Stream
from resnet_flax.rundir import RunStatus, git_commit, library_versions
from resnet_flax.rundir.identity import claim_run_dir
from resnet_flax.rundir.owner import owning
from resnet_flax.training.construction import has_checkpoint
from resnet_flax.training.preemption import RunInterrupted, StopRequests
from resnet_flax.training.run_config import RunConfig
from resnet_flax.training.runtime import make_mesh
from resnet_flax.training.setup import Setup, construct_start, set_up
from resnet_flax.training.sources import DataSource, open_data
from resnet_flax.training.timings import Timings

log = logging.getLogger(__name__)


@owning  # the run directories this call claims are released when it returns
def train(run_dir: str | Path, cfg: RunConfig, dataset: Dataset | Stream | None = None) -> dict:
    """Train (or resume) one run into run_dir and return its summary.

    With trainer.vmap_seeds = k > 1, seeds info.seed .. info.seed+k-1 train as one compiled
    program, each into run_dir/seed_<s>; the return value then holds every seed's summary
    under "runs". A non-finite loss ends a run with status RunStatus.DIVERGED (returned, not
    raised) so a sweep can go on. A stop signal (preemption.STOP_SIGNALS) ends the chunk,
    checkpoints, records the run as interrupted and raises RunInterrupted; the same call
    again resumes it. An init_from run first writes its constructed net as checkpoint 0.
    """
    clock = Timings()  # the phases' seconds, for summary.json
    run_dir = Path(run_dir)
    with clock.phase("data"):
        data = (
            dataset if dataset is not None else open_data(cfg.dataset, cfg.trainer, cfg.info.seed)
        )
    with clock.phase("set_up"):
        run = set_up(cfg, data, make_mesh())
    writer = jax.process_index() == 0  # one process of a multi-host job writes the records
    # One owner, one run: refuse before restoring when the directory holds another run.
    allow = run.cfg.trainer.allow_recipe_change
    claim = claim_run_dir(run_dir, run.cfg.to_dict(), allow, lock=writer)
    if run.constructed_from is not None and not has_checkpoint(run_dir):
        with clock.phase("set_up"):
            construct_start(run, run_dir)
    warn_if_vmapped_on_cpu(run)
    records = run.group.records(run_dir, run.state, claim, run_fields(run), run.mesh, writer)
    with contextlib.ExitStack() as stack:
        with clock.phase("checkpoint"):  # the records restore the newest checkpoint
            start, state = stack.enter_context(records)
        return train_from(run, run_dir, start, state, clock)


def train_from(run: Setup, run_dir: Path, start: int, state: dict, clock: Timings) -> dict:
    """The loop from iteration `start`: chunks, logs, evaluations, checkpoints, the summary."""
    trainer, source, group, program = run.cfg.trainer, run.source, run.group, run.program
    source.start(start)
    bar = progress_bar(run, start)
    t_start, train_s, iteration, stopped = time.perf_counter(), 0.0, start, None
    with StopRequests() as stop:
        try:
            if start == 0:  # the curves start at the untrained network, as the paper's do
                with clock.phase("eval"):
                    results = evaluate_all(run, state, source.eval_splits)
                group.log_eval(epoch_line(0, source), results)
            while iteration < trainer.iterations and group.running and stopped is None:
                length = min(trainer.log_every, trainer.iterations - iteration)
                with clock.phase("train"):
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
                    with clock.phase("eval"):
                        results = evaluate_all(run, state, source.eval_splits)
                    group.log_eval(line, results)
                if iteration % trainer.checkpoint_every == 0 or done:
                    with clock.phase("checkpoint"):
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
            with clock.phase("checkpoint"):
                group.wait_for_saves()
    if stopped is not None and any(r.status == RunStatus.INTERRUPTED for r in group.runs):
        raise RunInterrupted(stopped, iteration, str(run_dir))
    completed = iteration >= trainer.iterations
    with clock.phase("eval"):
        final = evaluate_all(run, state, source.final_splits) if completed else {}
    images = (iteration - start) * trainer.batch_size
    timing = {
        "compile_time_s": program.compile_s,
        "wall_s": time.perf_counter() - t_start,
        "images_per_sec": images / train_s if train_s else None,
        "input_wait_fraction": source.wait_s / train_s if train_s else None,
        "timings": clock.record(),
        "compile_cache": run.cache_events.counts(),
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


def epoch_line(iteration: int, source: DataSource) -> dict:
    """The position fields every metrics line starts with."""
    return {"iteration": iteration, "epoch": iteration / source.steps_per_epoch}


def run_fields(run: Setup) -> dict:
    """The summary.json fields that identify a run and where it ran."""
    spec, source = run.cfg.model, run.source
    return {
        "experiment": run.cfg.info.experiment_name,
        "model": spec.model,
        "depth": spec.depth,
        "shortcut": spec.shortcut,
        "family": spec.family,
        "dataset": source.name,
        "param_count": run.param_count,
        "batch_size": run.cfg.trainer.batch_size,
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
        total=run.cfg.trainer.iterations,
        initial=start,
        disable=not run.cfg.trainer.progress,
        desc=f"{run.cfg.model.model}-{run.cfg.model.depth} seed {seeds}",
        unit="it",
        dynamic_ncols=True,
    )


def warn_if_vmapped_on_cpu(run: Setup) -> None:
    """Say once that a seed group on CPU is slower than separate runs."""
    group = run.group
    if group.stacked and run.backend == "cpu":
        log.warning(
            "vmap_seeds=%d on CPU: vmapped convolutions become grouped convolutions, which "
            "XLA:CPU runs several times slower per image than separate runs; seed groups "
            "pay on GPUs, where one small net leaves the device idle",
            len(group.seeds),
        )
