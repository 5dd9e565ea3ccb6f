"""Stop signals: the run ends its chunk, checkpoints, says it was interrupted; a rerun
finishes with the uninterrupted run's numbers."""

from __future__ import annotations

import json
import os
import shlex
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


def resume_command(stderr: str) -> list[str]:
    """The command the one `interrupted:` line of a stopped run prints to resume it."""
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and "; to resume: " in lines[0], stderr[-3000:]
    return shlex.split(lines[0].split("; to resume: ", 1)[1])


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
    resume = resume_command(err)
    assert resume[-1] == f"hydra.run.dir={victim}", resume
    for run_dir in run_dirs(victim, args):
        summary = read_summary(run_dir)
        assert summary["status"] == "interrupted", summary
        assert signal.Signals(signum).name in summary["message"]
        saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
        # one checkpoint, where the run stopped: past the start, before the periodic one at 40
        assert saved == [summary["iterations"]] and 0 < saved[0] < 40
    assert finish(whole)[0] == 0
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    code, err = finish(subprocess.Popen(resume, cwd=ROOT, text=True, **pipes))
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


@pytest.mark.slow
def test_a_second_ctrl_c_stops_in_one_line_and_the_printed_command_resumes(tmp_path):
    # Fails when the second Ctrl-C ends in a KeyboardInterrupt traceback, or when the printed
    # command starts a new run: the default run directory is named by the time, so the same
    # command would train from iteration 0 into a new one.
    long_chunks = [
        "trainer.iterations=2000",
        "trainer.log_every=1000",  # the step loop returns to Python every step: Ctrl-C lands
        "trainer.eval_every=1000",
        "trainer.checkpoint_every=1000",
        "trainer.step_loop=python",
    ]
    args = [*RUN, *long_chunks, "dataset=digits", ONE_DEVICE, f"results_dir={tmp_path}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (_metrics(tmp_path).parent / "checkpoints" / "1000").is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run did not reach iteration 1000"
        time.sleep(0.05)
    time.sleep(1.0)  # in the second chunk (1000 steps: many seconds)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)  # the first is handled (stop after this chunk) before the second arrives
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: ")
    run_dir = _metrics(tmp_path).parent
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and "second Ctrl-C" in summary["message"]
    assert (run_dir / "checkpoints" / "1000").is_dir()  # the newest checkpoint is kept
    resume = resume_command(err)
    assert resume[-1] == f"hydra.run.dir={run_dir}"
    again = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {run_dir} from iteration 1000" in again.stdout + again.stderr
    assert read_summary(run_dir)["status"] == "completed"
    assert [p.parent for p in (tmp_path / "runs").rglob("summary.json")] == [run_dir]


def _metrics(results_dir: Path) -> Path:
    """The metrics file of the one run under results_dir (a path that does not exist yet)."""
    found = sorted((results_dir / "runs").glob("*/*/metrics.jsonl"))
    return found[0] if found else results_dir / "runs" / "none" / "metrics.jsonl"
