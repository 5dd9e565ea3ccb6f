"""Train one run, or a sweep with -m: ``python -m experiments.train [-m] key=value ...``."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

# Importing the library imports JAX but does not start its backend; train() starts it, after
# pin_gpu has set CUDA_VISIBLE_DEVICES for this worker and use_cpu_devices has split the CPU.
from experiments.config import (
    compilation_cache_dir,
    completed_summary,
    parallel_jobs,
    pin_gpu,
    remove_if_empty,
    to_library,
)
from resnet_flax.data.memory import DataError
from resnet_flax.models.spec import SpecError
from resnet_flax.rundir import RunDirError, record_failed_job
from resnet_flax.rundir.identity import (
    DATA_DERIVED,
    check_run_dir,
    completed_iterations,
    config_dict,
)
from resnet_flax.training.config import ConfigError
from resnet_flax.training.cpu_devices import (
    CpuDevicesError,
    cpu_device_count,
    jax_backend_started,
    usable_cores,
    use_cpu_devices,
)
from resnet_flax.training.guard import JobDied, run_guarded, run_here
from resnet_flax.training.loop import train
from resnet_flax.training.preemption import RunInterrupted
from resnet_flax.training.runtime import enable_compilation_cache, maybe_initialize_distributed

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    """Validate the config, load the data, train (or resume) into Hydra's output dir."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN and hc.runtime.choices.get("hydra/launcher") == "multi_gpu":
        pin_gpu(hc.job.num, Path(hc.sweep.dir) / ".gpu_locks")
    try:
        spec, data_cfg, optim, trainer, info = to_library(cfg)
        finished = completed_summary(run_dir, trainer, info.seed)
        if finished is not None:
            # A finished run is skipped only for a command that asks for this run.
            parts = {"model": spec, "data": data_cfg, "optim": optim, "trainer": trainer}
            requested = config_dict(**parts, info=info)
            check_run_dir(run_dir, requested, trainer.allow_recipe_change, DATA_DERIVED)
            done = completed_iterations(finished)
            log.info("%s already completed %d iterations; skipping", run_dir, done)
            return finished
        # Jobs of a parallel sweep share the cores: each splits only its share into devices
        # and keeps every device single-threaded.
        jobs = parallel_jobs(hc)
        cores = max(1, usable_cores() // jobs)
        count = cpu_device_count(cfg.cpu_devices, [trainer.batch_size], cores)
        job = functools.partial(
            train_job, cfg, run_dir, count, jobs > 1, (spec, data_cfg, optim, trainer, info)
        )
        # Collectives between CPU devices of one process can abort it (XLA's timeout): such
        # runs train in a child process, so the abort is recorded and a sweep goes on.
        guarded = count > 1 and not jax_backend_started()
        summary = run_guarded(job, run_dir) if guarded else run_here(job, run_dir)
    except (SpecError, DataError, ConfigError, CpuDevicesError, RunDirError) as err:
        # One clear line instead of a traceback.
        print(f"error: {err}", file=sys.stderr)
        remove_if_empty(run_dir)
        if hc.mode == RunMode.MULTIRUN:  # the sweep goes on; its exit status will say so
            return record_failed_job(Path(hc.sweep.dir), run_dir, str(err))
        sys.exit(2)
    except JobDied as err:
        print(f"error: {run_dir}: {err}", file=sys.stderr)
        if hc.mode != RunMode.MULTIRUN:
            sys.exit(1)
        return record_failed_job(Path(hc.sweep.dir), run_dir, str(err))
    except RunInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        hand_on(err.signum)
    except KeyboardInterrupt:  # a second Ctrl-C: the run stopped where it was
        print(f"interrupted: {run_dir}: stopped at once; rerun to resume", file=sys.stderr)
        sys.exit(130)
    log.info(
        "%s: %s, final training error %s, test error %s",
        run_dir,
        summary["status"],
        summary.get("final_train_error"),
        summary.get("final_test_error"),
    )
    return summary


def hand_on(signum: int) -> None:
    """End the process the way the stop signal asks, now that the run is saved.

    The signal goes to the handler that was there before training (submitit's requeues the
    job; the default one ends the process by the signal); a Ctrl-C exits with status 130.
    """
    if signum != signal.SIGINT:
        signal.raise_signal(signum)
    sys.exit(128 + signum)


def train_job(cfg: DictConfig, run_dir: Path, count: int, single_threaded: bool, parts) -> dict:
    """Set up this process's devices, then load the data and train (or resume) the run."""
    spec, data_cfg, optim, trainer, info = parts
    use_cpu_devices(count, single_threaded=single_threaded)
    enable_compilation_cache(compilation_cache_dir(cfg))
    maybe_initialize_distributed()
    return train(run_dir, spec, data_cfg, optim, trainer, info)


if __name__ == "__main__":
    main()
