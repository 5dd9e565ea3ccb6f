"""Train one run, or a sweep with -m: ``python -m experiments.train [-m] key=value ...``."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# Importing the library imports JAX but does not start its backend; the job starts it, after
# pin_gpu has set CUDA_VISIBLE_DEVICES for this worker and the CPU is split into devices.
from experiments.cli.preflight import run_checked
from experiments.cli.resume import resume_command
from experiments.cli.train_config import run_config
from resnet_flax.data.config import DataError
from resnet_flax.models.spec import SpecError
from resnet_flax.rundir import RunDirError, record_failed_job
from resnet_flax.training.config import ConfigError
from resnet_flax.training.cpu_devices import CpuDevicesError
from resnet_flax.training.devices import pin_gpu
from resnet_flax.training.guard import JobDied
from resnet_flax.training.job import outcome_line, remove_if_empty, run_job
from resnet_flax.training.preemption import RunInterrupted

log = logging.getLogger(__name__)
REJECTED = (SpecError, DataError, ConfigError, CpuDevicesError, RunDirError)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    """Check the config, then train (or resume) into Hydra's output dir."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun and hc.runtime.choices.get("hydra/launcher") == "multi_gpu":
        pin_gpu(hc.job.num, Path(hc.sweep.dir) / ".gpu_locks")
    n_jobs = OmegaConf.select(hc, "launcher.n_jobs", default=None) if multirun else None
    try:
        summary = run_job(run_dir, run_config(cfg), max(1, int(n_jobs or 1)))
    except REJECTED as err:
        print(f"error: {err}", file=sys.stderr)  # one line; nothing has compiled yet
        remove_if_empty(run_dir)
        if multirun:  # the sweep goes on; its exit status will say so
            return record_failed_job(Path(hc.sweep.dir), run_dir, str(err))
        sys.exit(2)
    except JobDied as err:
        print(f"error: {run_dir}: {err}", file=sys.stderr)
        if not multirun:
            sys.exit(1)
        return record_failed_job(Path(hc.sweep.dir), run_dir, str(err))
    except RunInterrupted as err:
        print(f"interrupted: {err}; to resume: {resume_command(hc)}", file=sys.stderr)
        hand_on(err.signum)
    except KeyboardInterrupt:  # a second Ctrl-C (or one before training started)
        print(f"interrupted: {run_dir}: stopped at once by Ctrl-C, its newest checkpoint kept; "
              f"to resume: {resume_command(hc)}", file=sys.stderr)  # fmt: skip
        hand_on(signal.SIGINT)
    log.info(outcome_line(run_dir, summary))
    return summary


def hand_on(signum: int) -> None:
    """End the process the way the stop signal asks, now that the run is saved.

    The signal goes to the handler that was there before training (submitit's requeues the
    job; the default one ends the process by the signal); a Ctrl-C exits with status 130.
    """
    if signum != signal.SIGINT:
        signal.raise_signal(signum)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # one more Ctrl-C while Python exits: no traceback
    sys.exit(128 + signum)


if __name__ == "__main__":
    run_checked(main, "config", run_config)
