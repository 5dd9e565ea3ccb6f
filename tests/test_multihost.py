"""Two jax.distributed processes of four CPU devices train, resume and record as one of eight."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from resnet_flax.data.memory import DataConfig
from resnet_flax.models.spec import ModelSpec
from resnet_flax.rundir import read_metrics
from resnet_flax.training.config import RunInfo, TrainerConfig
from resnet_flax.training.loop import train
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelSpec(model="residual", depth=8)
# Random crops and flips: the augmentation keys must agree across the processes too.
DIGITS = DataConfig(name="digits", crop_padding=2, flip=True)
RECIPE = OptimConfig(lr=0.05, boundaries=(3,))
TRAINER = TrainerConfig(
    iterations=4, batch_size=32, log_every=2, eval_every=2, checkpoint_every=2, progress=False
)
TIMEOUT_S = 400  # the whole test; a hung collective ends it instead of the suite
# Variables that would put the single-process reference run into a job.
JOB_KEYS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS")

# Joins the job through the library's own start-up, trains to each of the given iterations
# (a stop and a resume), prints what the parent compares.
WORKER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from resnet_flax.training.runtime import enable_compilation_cache
    from resnet_flax.training.runtime import maybe_initialize_distributed
    enable_compilation_cache(sys.argv[4])
    maybe_initialize_distributed()
    import jax
    from tests.test_multihost import run
    summaries = [run(sys.argv[2], int(n)) for n in sys.argv[3].split(",")]
    result = {"pid": os.getpid(), "process": jax.process_index(), "summaries": summaries}
    print("RESULT" + json.dumps(result))
    """
)


def run(run_dir: str, iterations: int) -> dict:
    """train() the tiny digits run to `iterations` (resuming from run_dir's checkpoint)."""
    trainer = TrainerConfig(**{**TRAINER.__dict__, "iterations": iterations})
    return train(run_dir, RunConfig(TINY, DIGITS, RECIPE, trainer, RunInfo("multihost", 5)))


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(log: Path, devices: int, run_dir: Path, stops: str, cache: str, job: dict):
    """WORKER on `devices` CPU devices, in the multi-process job `job` ({}: none)."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_KEYS}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    args = [sys.executable, "-c", WORKER, str(ROOT), str(run_dir), stops, cache]
    with log.open("w") as out:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            env={**env, **job},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed whole if it hangs
        )


def wait_all(procs: dict[Path, subprocess.Popen], timeout_s: float) -> list[dict]:
    """Each worker's RESULT line, in order; fails with the logs when one fails or hangs."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        if any(p.poll() for p in procs.values()):  # one failed: its peer would wait minutes
            break
        time.sleep(0.2)
    killed = set()
    for log, proc in procs.items():
        if proc.poll() is None:  # hung, or the peer of a failed process
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed.add(log)
    logs = {log: log.read_text() for log in procs}
    failed = [
        f"{log.name}: {'killed' if log in killed else 'exit'} {proc.returncode}\n"
        f"{logs[log][-2000:]}"
        for log, proc in procs.items()
        if proc.returncode
    ]
    assert not failed, "\n".join(failed)
    return [json.loads(text.split("RESULT", 1)[1]) for text in logs.values()]


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(iteration, value) of every training and evaluation metric of the run, by name."""
    lines = read_metrics(run_dir / "metrics.jsonl")
    keys = ("train_loss", "train_error", "test_loss", "test_error")
    return {k: [(m["iteration"], m[k]) for m in lines if k in m] for k in keys}


def test_two_processes_train_resume_and_write_as_one_process_with_eight_devices(tmp_path):
    # Fails when the processes disagree on a batch or an augmentation, an evaluation batch
    # is not split between them, process 1 writes records, or the collective checkpoint
    # does not restore in both processes.
    one, two = tmp_path / "one", tmp_path / "two"
    port = free_port()
    procs = {tmp_path / "one.log": start(tmp_path / "one.log", 8, one, "4", "", {})}
    for index in (0, 1):
        job = {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(index),
        }
        log = tmp_path / f"p{index}.log"
        procs[log] = start(log, 4, two, "2,4", str(tmp_path / "cache"), job)
    single, first, second = wait_all(procs, TIMEOUT_S)
    assert [first["process"], second["process"]] == [0, 1]
    alone = single["summaries"][-1]
    assert (alone["device_count"], alone["process_count"]) == (8, 1)
    for result in (first, second):
        stopped, resumed = result["summaries"]
        assert stopped["iterations"] == 2 and resumed["iterations"] == 4
        assert (resumed["device_count"], resumed["process_count"]) == (8, 2)
        assert resumed["final_train_error"] == pytest.approx(alone["final_train_error"], abs=1e-6)
        assert resumed["final_test_error"] == pytest.approx(alone["final_test_error"], abs=1e-6)
    # Stopped at 2 and resumed from the checkpoint both processes wrote: the curves of the
    # uninterrupted run on one process, each line once.
    for key, expected in curves(one).items():
        got = curves(two)[key]
        assert [i for i, _ in got] == [i for i, _ in expected], key
        values = [v for _, v in got], [v for _, v in expected]
        np.testing.assert_allclose(*values, rtol=1e-5, atol=1e-6, err_msg=key)
    assert_written_by(two, first["pid"])
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]


def assert_written_by(run_dir: Path, pid: int) -> None:
    """run_dir holds the run's records and nothing else; its event files are process pid's."""
    names = sorted(os.listdir(run_dir))
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    records = ["checkpoints", "metrics.jsonl", "run_config.json", "summary.json"]
    assert names == sorted([*records, *events])
    # TensorBoard names its files ...tfevents.<time>.<host>.<pid>.<n>: one writer, process 0
    assert events and all(f".{pid}." in n for n in events), events


def test_explicit_coordinator_passes_the_process_count_and_index(monkeypatch):
    # Fails when the count and index are left to JAX, which outside a cluster it detects
    # stops with "Number of processes must be defined".
    import jax

    from resnet_flax.training.runtime import maybe_initialize_distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    for key in JOB_KEYS:
        monkeypatch.delenv(key, raising=False)
    maybe_initialize_distributed()
    assert calls == []  # a single process joins nothing
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    maybe_initialize_distributed()
    assert calls == [("10.0.0.1:1234", 4, 3)]
