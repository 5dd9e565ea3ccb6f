"""Multi-device CPU runs never deadlock in an all-reduce, and an abort is recorded, not silent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from resnet_flax.rundir import mark_unfinished_failed, read_failed_jobs
from resnet_flax.training.guard import JobDied, run_guarded

ROOT = Path(__file__).resolve().parent.parent
# XLA's stuck-collective timeouts cut from 20 s / 40 s to 1 s / 3 s, so a deadlock aborts fast.
SHORT_TIMEOUTS = (
    "--xla_cpu_multi_thread_eigen=false --xla_cpu_collective_call_warn_stuck_timeout_seconds=1 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=3"
)
# Two single-threaded CPU devices (the 2-core default) and a step with an all-reduce, dispatched
# 300 times in a row through the library's Python step loop: a deadlock aborts the process.
STRESS = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_num_cpu_devices", 2)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from resnet_flax.training import steps as train
    train.MAX_STEPS_IN_FLIGHT = int(sys.argv[1])
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.device_put(jnp.ones((64, 64, 64)), NamedSharding(mesh, P("data")))
    w0 = jax.device_put(jnp.eye(64) * 0.5, NamedSharding(mesh, P()))

    @jax.jit
    def step(w, x, hparams):
        y = jnp.tanh(x @ w) @ w.T
        mean = jnp.mean(y, axis=(0, 1))  # the all-reduce over the sharded batch
        return w + 1e-6 * mean[:, None], {"loss": jnp.mean(y)}

    for attempt in range(int(sys.argv[2])):
        w, metrics = train.run_steps(step, w0, [x] * 300, {})
        assert metrics["loss"].shape == (300,)
    print("completed", sys.argv[2])
    """
)


def run_stress(in_flight: int, attempts: int) -> subprocess.CompletedProcess:
    """The stress script in a fresh process with 2 CPU devices and short collective timeouts."""
    return subprocess.run(
        [sys.executable, "-c", STRESS, str(in_flight), str(attempts)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "XLA_FLAGS": SHORT_TIMEOUTS},
    )


def test_python_step_loop_on_two_cpu_devices_never_deadlocks():
    proc = run_stress(in_flight=2, attempts=20)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "completed 20" in proc.stdout


@pytest.mark.slow
def test_unbounded_dispatch_deadlocks_so_the_stress_test_reaches_the_race():
    # Without the bound the same script aborts (measured: 7 aborts in 7 attempts): if this
    # starts passing, XLA has changed how it launches multi-device programs.
    runs = [run_stress(in_flight=10_000, attempts=1) for _ in range(3)]
    aborts = sum(proc.returncode == -signal.SIGABRT for proc in runs)
    assert aborts >= 2


def _running_summary(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "running", "iterations": 4}))


def test_guard_returns_the_childs_result_and_reraises_its_error(tmp_path):
    assert run_guarded(lambda: {"status": "completed", "pid": os.getpid()}, tmp_path)["pid"] != (
        os.getpid()
    )

    def bad():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run_guarded(bad, tmp_path)


def test_aborted_child_leaves_every_running_seed_failed_with_the_reason(tmp_path):
    seeds = [tmp_path / "seed_0", tmp_path / "seed_1"]

    def abort():
        for d in seeds:
            _running_summary(d)
        (tmp_path / "done").mkdir()
        (tmp_path / "done" / "summary.json").write_text(json.dumps({"status": "completed"}))
        os.abort()

    with pytest.raises(JobDied, match="SIGABRT"):
        run_guarded(abort, tmp_path)
    for d in seeds:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["status"] == "failed" and "SIGABRT" in summary["message"]
        assert summary["iterations"] == 4  # the rest of the summary is kept
    assert json.loads((tmp_path / "done" / "summary.json").read_text())["status"] == "completed"
    assert mark_unfinished_failed(tmp_path, "again") == []  # nothing left running


# A two-job sweep whose first job's training process aborts as XLA's timeout does.
ABORTING_SWEEP = textwrap.dedent(
    """
    import os, sys
    import experiments.train as entry
    from resnet_flax.training import job
    real_train = job.train

    def train(run_dir, cfg, *args, **kwargs):
        if cfg.model.depth == 8:
            (run_dir / "summary.json").write_text('{"status": "running"}')
            os.abort()
        return real_train(run_dir, cfg, *args, **kwargs)

    job.train = train
    sys.argv = ["train", *sys.argv[1:]]
    entry.main()
    """
)


def test_sweep_goes_on_after_a_job_aborts(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "model=plain",
        "depth=8,14",
        "dataset=digits",
        "cpu_devices=2",
        "trainer.batch_size=32",
        "trainer.iterations=4",
        "trainer.log_every=2",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=4",
        "trainer.progress=false",
        f"hydra.sweep.dir={sweep}",
        "compilation_cache_dir=null",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", ABORTING_SWEEP, f"--config-path={ROOT / 'conf'}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # the sweep went on, and its exit status and failed_jobs.jsonl say that a job failed
    assert proc.returncode == 1, proc.stderr[-3000:]
    (failed,) = read_failed_jobs(sweep)
    assert "depth=8" in failed["job"] and "SIGABRT" in failed["message"]
    summaries = {
        json.loads(p.read_text()).get("depth", 8): json.loads(p.read_text())
        for p in sweep.glob("*/summary.json")
    }
    assert summaries[8]["status"] == "failed" and "SIGABRT" in summaries[8]["message"]
    assert summaries[14]["status"] == "completed" and summaries[14]["device_count"] == 2
    assert np.isfinite(summaries[14]["final_train_error"])
    assert "SIGABRT" in proc.stderr


@pytest.mark.slow
def test_plain32_on_14x14_images_completes_20_times_with_the_default_devices(tmp_path):
    # The configuration that aborted 5 times in 12 with the default cpu_devices=auto.
    rng = np.random.default_rng(0)
    npz = tmp_path / "mnist14.npz"
    np.savez(
        npz,
        x_train=rng.integers(0, 256, (4000, 14, 14), dtype=np.uint8),
        y_train=rng.integers(0, 10, 4000),
        x_test=rng.integers(0, 256, (1000, 14, 14), dtype=np.uint8),
        y_test=rng.integers(0, 10, 1000),
    )
    for attempt in range(20):
        run_dir = tmp_path / f"run{attempt}"
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.train", "model=plain", "depth=32", "dataset=npz"]
            + [f"dataset.path={npz}", "trainer.iterations=320", "trainer.batch_size=100"]
            + ["trainer.progress=false", f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"attempt {attempt}: {proc.stderr[-2000:]}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["device_count"] == 2
