"""The seed group: the seeds one program trains, with their run directories, records and status.

One seed trains into the run directory itself; k > 1 seeds (TrainerConfig.vmap_seeds) train
as one vmapped program, each into run_dir/seed_<s>, and each stops on its own when it
diverges. The loop talks to the group the same way in both cases.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax.models.counts import count_params
from resnet_flax.models.spec import ModelSpec
from resnet_flax.rundir import (
    CHECKPOINT_DIR,
    RUN_CONFIG_FILE,
    RunRecorder,
    RunStatus,
    read_summary,
    write_failure,
    write_json,
)
from resnet_flax.rundir.identity import Claim
from resnet_flax.training.checkpoints import Checkpointer, abstract_like, restore_common
from resnet_flax.training.config import RunInfo
from resnet_flax.training.construction import construction_fields
from resnet_flax.training.preemption import RunInterrupted, requested_stop
from resnet_flax.training.run_config import RunConfig
from resnet_flax.training.seed_axis import seed_axis
from resnet_flax.training.state import initial_state

log = logging.getLogger(__name__)


@dataclass
class SeedRun:
    """The records of one seed's run directory while it trains."""

    info: RunInfo
    run_dir: Path
    recorder: RunRecorder
    checkpointer: Checkpointer
    base_summary: dict
    wall_before: float
    status: RunStatus = RunStatus.RUNNING
    message: str | None = None
    stopped_at: int | None = None  # the last iteration of a seed that diverged

    def last_iteration(self, iteration: int) -> int:
        """The iteration this seed reached when the group is at `iteration`."""
        return iteration if self.stopped_at is None else self.stopped_at

    @property
    def running(self) -> bool:
        """Whether this seed still trains."""
        return self.status == RunStatus.RUNNING

    def write_status(self, iteration: int, **fields) -> None:
        """Rewrite summary.json with the current status and the given fields."""
        status = {"status": self.status, "iterations": iteration, "message": self.message}
        self.recorder.write_summary({**self.base_summary, **status, **fields})


class SeedGroup:
    """Seeds first_seed .. first_seed+count-1 trained as one program (one seed: no stacking).

    `records(...)` opens the group's checkpoints and records for a run directory; inside it
    the loop logs, saves and finishes through the group.
    """

    def __init__(self, first_seed: int, count: int):
        self.axis = seed_axis(first_seed, count)
        self.seeds = self.axis.seeds
        self.stacked = count > 1
        self.runs: list[SeedRun] = []
        self.saved_at: int | None = None  # the iteration of the last checkpoint

    # --- the state and the compiled functions ------------------------------------------------
    def initial_state(self, spec: ModelSpec, tx, order_len: int, mesh: Mesh) -> tuple:
        """(graphdef, replicated state of every seed, parameters of one network)."""
        states = []
        for seed in self.seeds:
            graphdef, state = initial_state(spec, seed, tx, order_len)
            states.append(state)
        first = states[0]
        params = count_params(nnx.merge(graphdef, first["params"], first["batch_stats"]))
        return graphdef, self.replicate(self.axis.stack(states), mesh), params

    @staticmethod
    def replicate(state: dict, mesh: Mesh) -> dict:
        """The state copied to every device of the mesh."""
        return jax.device_put(state, NamedSharding(mesh, P()))

    def vmap_step(self, step: Callable) -> Callable:
        """The step over every seed of the group."""
        return self.axis.vmap_step(step)

    def vmap_eval(self, evaluate: Callable) -> Callable:
        """eval_sums over every seed of the group."""
        return self.axis.vmap_eval(evaluate)

    def per_seed(self, value) -> list[np.ndarray]:
        """A metric or evaluation result split into one value per seed."""
        return self.axis.per_seed(value)

    # --- the records ----------------------------------------------------------------------
    @contextlib.contextmanager
    def records(self, run_dir: Path, state: dict, claim: Claim, fields: dict, mesh: Mesh,
                writer: bool) -> Iterator[tuple[int, dict]]:  # fmt: skip
        """Open every seed's checkpoints and records; yield (start iteration, state).

        Resumes from the newest checkpoint every seed has ((0, state) when none); records start
        there, with the run configuration the claim says the run keeps. One process (`writer`)
        writes the files. A stop signal received before (while the data loaded or the state
        restored) stops the run before anything is written. Checkpoint writes finish on exit.
        """
        dirs = self.axis.run_dirs(run_dir)
        keep = claim.requested["trainer"]["keep_checkpoints"]
        checkpointers = [Checkpointer(d / CHECKPOINT_DIR, keep=keep) for d in dirs]
        try:
            start, state = self._restore(run_dir, checkpointers, state, mesh)
            stopped = requested_stop()
            if stopped is not None:
                raise RunInterrupted(stopped, start, str(run_dir), before_start=True)
            config = claim.record(start, writer)
            if writer:
                self.axis.mark(run_dir)
            for seed, d, ckpt in zip(self.seeds, dirs, checkpointers, strict=True):
                self.runs.append(open_seed_run(d, ckpt, config, seed, start, fields, writer))
            yield start, state
        finally:
            close_all(checkpointers)

    def _restore(self, run_dir: Path, checkpointers: list, state: dict, mesh: Mesh) -> tuple:
        """(iteration, state) of the newest checkpoint every seed has; (0, state) if none."""
        restored = restore_common(checkpointers, abstract_like(self.axis.unstack(state)[0]))
        if restored is None:
            return 0, state
        start, states = restored
        self.saved_at = start
        log.info("resuming %s from iteration %d", run_dir, start)
        return start, self.replicate(self.axis.stack(states), mesh)

    @property
    def running(self) -> bool:
        """Whether any seed still trains."""
        return any(run.running for run in self.runs)

    def log_train(self, line: dict, metrics: dict, iteration: int) -> dict | None:
        """Log each running seed's chunk; stop a seed whose loss is not finite.

        Returns the line of the first seed still running (for the progress bar).
        """
        shown = None
        per_seed = {name: self.per_seed(metrics[name]) for name in ("loss", "error", "lr")}
        for k, run in enumerate(self.runs):
            if not run.running:
                continue
            losses = np.asarray(per_seed["loss"][k], dtype=np.float64)
            seed_line = {
                **line,
                "lr": float(per_seed["lr"][k][-1]),
                "train_loss": float(losses.mean()),
                "train_error": float(np.mean(per_seed["error"][k])),
            }
            run.recorder.log(seed_line)
            shown = shown or seed_line
            if not np.all(np.isfinite(losses)):
                first_bad = iteration - len(losses) + int(np.argmax(~np.isfinite(losses))) + 1
                run.status, run.stopped_at = RunStatus.DIVERGED, iteration
                run.message = (
                    f"non-finite training loss at iteration {first_bad}; "
                    "lower optim.lr or use a warm-up (optim.warmup_lr)"
                )
                log.error("%s: %s", run.run_dir, run.message)
                # Recorded now: the other seeds train on, and may end interrupted or failed.
                run.write_status(iteration)
        return shown

    def log_eval(self, line: dict, results: dict[str, tuple]) -> None:
        """Log each running seed's {split: (loss, error)} evaluation results."""
        split_seeds = {
            split: (self.per_seed(loss), self.per_seed(error))
            for split, (loss, error) in results.items()
        }
        for k, run in enumerate(self.runs):
            if not run.running:
                continue
            out = dict(line)
            for split, (loss, error) in split_seeds.items():
                out[f"{split}_loss"], out[f"{split}_error"] = float(loss[k]), float(error[k])
            run.recorder.log(out)

    def save(self, iteration: int, state: dict) -> None:
        """Checkpoint every seed still running (once per iteration)."""
        if iteration == self.saved_at:
            return
        for run, seed_state_ in zip(self.runs, self.axis.unstack(state), strict=True):
            if run.running:
                run.checkpointer.save(iteration, seed_state_)
                run.write_status(iteration)  # how far it got, should the process be killed
        self.saved_at = iteration

    def interrupt(self, iteration: int, state: dict, signum: int, steps_per_epoch: int) -> None:
        """Checkpoint the running seeds at `iteration` and record them as interrupted."""
        self.save(iteration, state)
        name = signal.Signals(signum).name
        for run in self.runs:
            if run.running:
                run.status = RunStatus.INTERRUPTED
                run.message = (
                    f"stopped by {name} at iteration {iteration}; its command, rerun into the "
                    "same run directory, resumes it"
                )
                partial = final_numbers(run.recorder.history, steps_per_epoch, iteration)
                run.write_status(iteration, **partial)

    def fail(self, err: BaseException, iteration: int) -> None:
        """Record every seed still running as failed with the exception that stopped the program.

        A KeyboardInterrupt (a second Ctrl-C) leaves the seeds interrupted: their newest
        checkpoint is intact and a rerun resumes from it. A diverged seed stays diverged. On
        a full disk the status is written where it still fits.
        """
        why = write_failure(err)
        if isinstance(err, KeyboardInterrupt):
            status, message = RunStatus.INTERRUPTED, "stopped at once by a second Ctrl-C"
        elif why is not None:
            status, message = RunStatus.FAILED, f"cannot write the run's files ({why})"
        else:
            status, message = RunStatus.FAILED, f"{type(err).__name__}: {err}"
        for run in self.runs:
            if run.running:
                run.status, run.message = status, message
                if why is not None:
                    run.checkpointer.discard_unfinished()
                with contextlib.suppress(OSError):  # the disk that failed may take no status
                    run.write_status(run.last_iteration(iteration))

    def wait_for_saves(self) -> None:
        """Block until pending checkpoint writes are on disk; a failed write fails the seeds."""
        error = None
        for run in self.runs:
            try:
                run.checkpointer.wait()
            except Exception as err:  # every checkpointer finishes; the first error is raised
                error = error or err
        if error is not None:
            reached = [m["iteration"] for r in self.runs for m in r.recorder.history]
            self.fail(error, max(reached, default=0))
            raise error

    def finish(self, iteration: int, steps_per_epoch: int, final: dict, timing: dict) -> dict:
        """Write every seed's final summary.json; one seed's summary, or the group's.

        `final` holds {split: (loss, error)} of the whole-split evaluations of a completed
        run; `timing` the program's compile and throughput figures, `wall_s` and `timings`.
        """
        final_seeds = {
            s: (self.per_seed(loss), self.per_seed(err)) for s, (loss, err) in final.items()
        }
        summaries = []
        for k, run in enumerate(self.runs):
            if run.running:
                run.status = RunStatus.COMPLETED
            summary = {**run.base_summary, "status": run.status, "message": run.message}
            at = run.last_iteration(iteration)
            summary.update(final_numbers(run.recorder.history, steps_per_epoch, at))
            if run.status == RunStatus.COMPLETED:
                for split, (loss, err) in final_seeds.items():
                    summary[f"final_{split}_loss"] = float(loss[k])
                    summary[f"final_{split}_error"] = float(err[k])
            summary["compile_time_s"] = timing["compile_time_s"]
            summary["wall_time_s"] = run.wall_before + timing["wall_s"]
            # Per run: a program training k seeds delivers k times these images per second.
            summary["images_per_sec"] = timing["images_per_sec"]
            summary["input_wait_fraction"] = timing["input_wait_fraction"]
            summary["timings"] = timing["timings"]  # where the time went (training.timings)
            # The persistent compilation cache's lookups, hits and misses of the whole job.
            summary["compile_cache"] = timing["compile_cache"]
            run.recorder.write_summary(summary)
            run.recorder.close()
            summaries.append(summary)
        return self.axis.result(summaries)


def close_all(checkpointers: list[Checkpointer]) -> None:
    """Close every checkpointer (finishing its writes); the first error is raised after."""
    error = None
    for checkpointer in checkpointers:
        try:
            checkpointer.close()
        except Exception as err:  # every checkpointer closes
            error = error or err
    if error is not None:
        raise error


def open_seed_run(run_dir: Path, checkpointer: Checkpointer, config: dict, seed: int,
                  start: int, fields: dict, writer: bool) -> SeedRun:  # fmt: skip
    """One seed's records from `start` on: run_config.json, metrics kept up to start, status.

    `config` is the run's configuration as its run_config.json keeps it (the first seed's).
    """
    seed_cfg = RunConfig.from_dict({**config, "info": {**config["info"], "seed": seed}})
    recorder = RunRecorder(run_dir, resume_from=start, write=writer)
    if writer:
        write_json(run_dir / RUN_CONFIG_FILE, seed_cfg.to_dict())
    previous = read_summary(run_dir)
    wall_before = previous.get("wall_time_s", 0.0) if start > 0 else 0.0
    base = {**fields, **construction_fields(run_dir), "seed": seed}
    run = SeedRun(seed_cfg.info, run_dir, recorder, checkpointer, base, wall_before)
    run.write_status(start)
    return run


def final_numbers(history: list[dict], steps_per_epoch: int, iteration: int) -> dict:
    """Final and best test (and validation) numbers from the metric lines."""
    evals = [m for m in history if m.get("test_error") is not None]
    out = {"iterations": iteration, "epochs": iteration / steps_per_epoch}
    if evals:
        out["final_test_error"] = evals[-1]["test_error"]
        out["final_test_loss"] = evals[-1]["test_loss"]
        out["best_test_error"] = min(m["test_error"] for m in evals)
        out["final_val_error"] = evals[-1].get("val_error")
    trains = [m for m in history if m.get("train_error") is not None]
    if trains:
        out["final_running_train_error"] = trains[-1]["train_error"]
    return out
