"""Stop signals: the run ends its chunk, checkpoints, says it was interrupted; a rerun
finishes with the uninterrupted run's numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_flax.rundir import read_metrics, read_summary
from resnet_flax.training.preemption import RunInterrupted, StopRequests

ROOT = Path(__file__).resolve().parent.parent
# Periodic checkpoints only at the end: the one a signal leaves is the only one in between.
RUN = [
    "model=residual",
    "depth=8",
    "trainer.iterations=40",
    "trainer.batch_size=16",
    "trainer.log_every=5",
    "trainer.eval_every=10",
    "trainer.checkpoint_every=40",
    "trainer.eval_batch_size=64",
    "trainer.progress=false",
    "compilation_cache_dir=null",  # the first chunk compiles while the signal arrives
]
ONE_DEVICE = "cpu_devices=1"
STREAM = ["dataset=imagenette", "dataset.stream.image_size=16", "dataset.stream.shuffle_buffer=64"]
CASES = {
    # default cpu_devices: on several cores the run trains in a guarded child process
    "digits-sigterm": (signal.SIGTERM, ["dataset=digits"]),
    "digits-sigint": (signal.SIGINT, ["dataset=digits", ONE_DEVICE]),
    "seed-group-sigint": (signal.SIGINT, ["dataset=digits", "trainer.vmap_seeds=2", ONE_DEVICE]),
    "stream-sigusr2": (signal.SIGUSR2, [*STREAM, ONE_DEVICE]),
    "stream-seed-group-sigusr2": (signal.SIGUSR2, [*STREAM, "trainer.vmap_seeds=2", ONE_DEVICE]),
}


def start(run_dir: Path, args: list[str]) -> subprocess.Popen:
    """``python -m experiments.train`` into run_dir, in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *RUN, *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Exit status and standard error of a finished run."""
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def run_dirs(job_dir: Path, args: list[str]) -> list[Path]:
    """The run directories of a job: itself, or its seeds' for a seed group."""
    grouped = "trainer.vmap_seeds=2" in args
    return [job_dir / "seed_0", job_dir / "seed_1"] if grouped else [job_dir]


def wait_for_training(job_dir: Path, proc: subprocess.Popen, args: list[str]) -> None:
    """Until the first evaluation line is written: the loop (and its handlers) are running."""
    first = run_dirs(job_dir, args)[-1] / "metrics.jsonl"
    deadline = time.time() + 300
    while not read_metrics(first):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run did not start training"
        time.sleep(0.02)


# Fast: the guarded child (SIGTERM) and a streamed seed group, which covers the stream's and
# the group's stop alone (slow) in one run; SIGINT takes the same path as the other signals.
FAST_CASES = ("digits-sigterm", "stream-seed-group-sigusr2")
CASE_PARAMS = [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_signal_saves_interrupts_and_resumes_exactly(tmp_path, case, request):
    signum, args = CASES[case]
    if "dataset=imagenette" in args:
        args = [*args, f"dataset.data_dir={request.getfixturevalue('imagenette_dir')}"]
    reference, victim = tmp_path / "whole", tmp_path / "stopped"
    whole = start(reference, args)
    stopped = start(victim, args)
    wait_for_training(victim, stopped, args)
    stopped.send_signal(signum)
    sent = time.time()
    code, err = finish(stopped)
    # within seconds of the chunk the signal arrived in (which still compiles)
    assert time.time() - sent < 120
    assert code == (130 if signum == signal.SIGINT else -signum), err[-3000:]
    assert "rerun the same command to resume" in err
    for run_dir in run_dirs(victim, args):
        summary = read_summary(run_dir)
        assert summary["status"] == "interrupted", summary
        assert signal.Signals(signum).name in summary["message"]
        saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
        # one checkpoint, where the run stopped: past the start, before the periodic one at 40
        assert saved == [summary["iterations"]] and 0 < saved[0] < 40
    assert finish(whole)[0] == 0
    code, err = finish(start(victim, args))
    assert code == 0, err[-3000:]
    for stopped_dir, whole_dir in zip(
        run_dirs(victim, args), run_dirs(reference, args), strict=True
    ):
        again, expected = read_summary(stopped_dir), read_summary(whole_dir)
        assert again["status"] == "completed" and again["iterations"] == 40
        for key in ("final_train_error", "final_train_loss", "final_test_error", "final_test_loss"):
            assert again.get(key) == expected.get(key), key
        lines = [json.dumps(m, sort_keys=True) for m in read_metrics(stopped_dir / "metrics.jsonl")]
        want = [json.dumps(m, sort_keys=True) for m in read_metrics(whole_dir / "metrics.jsonl")]
        strip = ("images_per_sec", "input_wait_fraction")
        assert [_without(m, strip) for m in lines] == [_without(m, strip) for m in want]


def _without(line: str, keys: tuple[str, ...]) -> dict:
    """A metrics line without its timing fields."""
    return {k: v for k, v in json.loads(line).items() if k not in keys}


def test_stop_requests_restore_handlers_and_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a later, different signal changes nothing
        assert stop.agreed() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(KeyboardInterrupt), StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.agreed() == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler raises in this thread before the sleep ends
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_run_interrupted_survives_pickling_between_processes():
    import pickle

    err = pickle.loads(pickle.dumps(RunInterrupted(signal.SIGUSR2, 35, "/runs/a")))
    assert (err.signum, err.iteration, err.run_dir) == (signal.SIGUSR2, 35, "/runs/a")
    assert "SIGUSR2 at iteration 35" in str(err)
