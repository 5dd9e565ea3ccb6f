"""A run directory holds one run: who may write it, which commands continue it, its records."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from resnet_flax.data.config import DataConfig, StreamConfig
from resnet_flax.models.spec import ModelSpec
from resnet_flax.rundir import (
    RECIPE_CHANGES_FILE,
    RUN_CONFIG_FILE,
    keep_metrics,
    read_failed_jobs,
    read_json,
    read_metrics,
    read_summary,
    write_json,
)
from resnet_flax.rundir.identity import (
    ROLES,
    SECTION_NAMES,
    Role,
    RunDirMismatch,
    check_run_dir,
    claim_run_dir,
    config_dict,
    differences,
    effective_config,
)
from resnet_flax.rundir.owner import lock_path, own, owner, ownership_scope
from resnet_flax.training.config import RunInfo, TrainerConfig
from resnet_flax.training.optim import OptimConfig

ROOT = Path(__file__).resolve().parent.parent
# A tiny run: digits, depth 8, batch 16 (89 steps an epoch), a line every 5 iterations.
BASE = [
    "dataset=digits",
    "depth=8",
    "trainer.batch_size=16",
    "trainer.log_every=5",
    "trainer.eval_every=10",
    "trainer.checkpoint_every=10",
    "trainer.eval_batch_size=64",
    "trainer.progress=false",
]


def command(run_dir: Path, *overrides: str) -> list[str]:
    """``python -m experiments.train`` of the tiny run into run_dir."""
    return [
        sys.executable,
        "-m",
        "experiments.train",
        *BASE,
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def train_cli(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the command to its end."""
    return subprocess.run(
        command(run_dir, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def start_cli(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """Start the command in the background."""
    return subprocess.Popen(
        command(run_dir, *overrides),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def error_lines(stderr: str) -> list[str]:
    """The lines a command printed on standard error (Hydra logs to standard output)."""
    return [line for line in stderr.splitlines() if line.strip()]


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pid and stat[0] != "Z":
                found.append(int(entry.name))
    return found


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def wait_until(condition, proc: subprocess.Popen, what: str, limit: float = 300) -> None:
    """Poll until condition() holds, failing if proc ends first or time runs out."""
    deadline = time.time() + limit
    while not condition():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no {what} within {limit} s"
        time.sleep(0.01)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """The bytes of a run's records and the checkpoint steps it holds."""
    files = {
        p.relative_to(run_dir).as_posix(): p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and "checkpoints" not in p.parts and p.name != "train.log"
    }
    files["steps"] = " ".join(sorted(p.name for p in (run_dir / "checkpoints").iterdir())).encode()
    return files


# --- identity: the table, and what a command may change -----------------------------------


def requested(**changes) -> dict:
    """The run_config a command asks for: a digits residual-8 run, with `changes` applied."""
    parts = {
        "model": ModelSpec(depth=8, num_classes=10, in_channels=1),
        "data": DataConfig(name="digits"),
        "optim": OptimConfig(),
        "trainer": TrainerConfig(iterations=20, batch_size=16, log_every=10),
        "info": RunInfo(),
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        parts[section] = dataclasses.replace(parts[section], **{key: value})
    config = config_dict(**parts)
    return {("dataset" if k == "data" else k): v for k, v in config.items()}


def old_style(config: dict) -> dict:
    """A run_config.json as written before its data section was named "dataset"."""
    return {("data" if k == "dataset" else k): v for k, v in config.items()}


def test_every_configuration_key_has_a_role():
    # A field added to a config class without a role would identify runs silently.
    sections = {
        "model": ModelSpec,
        "dataset": DataConfig,
        "optim": OptimConfig,
        "trainer": TrainerConfig,
        "info": RunInfo,
    }
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            if f.name == "stream":
                for g in dataclasses.fields(StreamConfig):
                    assert f"stream.{g.name}" in ROLES[section], f"dataset.stream.{g.name}"
            else:
                assert f.name in ROLES[section], f"{section}.{f.name}"
    assert SECTION_NAMES == {"data": "dataset"}


@pytest.mark.parametrize(
    ("change", "key", "role"),
    [
        ({"model__model": "plain"}, "model.model", Role.IDENTITY),
        ({"model__depth": 14}, "model.depth", Role.IDENTITY),
        ({"model__bn_batch": 8}, "model.bn_batch", Role.IDENTITY),
        ({"data__path": "/elsewhere/other.npz"}, "dataset.path", Role.IDENTITY),
        ({"trainer__batch_size": 32}, "trainer.batch_size", Role.IDENTITY),
        ({"trainer__vmap_seeds": 2}, "trainer.vmap_seeds", Role.IDENTITY),
        ({"info__seed": 1}, "info.seed", Role.IDENTITY),
        ({"optim__lr": 0.05}, "optim.lr", Role.RECIPE),
        ({"optim__boundaries": (10,)}, "optim.boundaries", Role.RECIPE),
        ({"data__flip": False}, "dataset.flip", Role.RECIPE),
        ({"trainer__iterations": 40}, "trainer.iterations", Role.CONTINUE),
        ({"trainer__eval_every": 40}, "trainer.eval_every", Role.CONTINUE),
        ({"model__remat": True}, "model.remat", Role.CONTINUE),
    ],
)
def test_differences_name_the_key_and_its_role(change, key, role):
    (found,) = differences(requested(), requested(**change))
    assert (found.key, found.role) == (key, role)
    (value,) = change.values()
    assert found.new == json.loads(json.dumps(value)) and f"-> {found.new}" in str(found)


def test_an_old_data_section_compares_with_the_new_dataset_section():
    old = old_style(requested())
    new = {("dataset" if k == "data" else k): v for k, v in requested(data__flip=False).items()}
    (found,) = differences(old, new)
    assert found.key == "dataset.flip"


def test_extending_a_cosine_run_is_a_recipe_change_that_says_what_it_does():
    cosine = requested(optim__schedule="cosine")
    longer = requested(optim__schedule="cosine", trainer__iterations=40)
    changes = {c.key: c for c in differences(cosine, longer)}
    assert changes["trainer.iterations"].role == Role.CONTINUE
    stretched = changes["optim.schedule_length"]
    assert stretched.role == Role.RECIPE and (stretched.old, stretched.new) == (20, 40)
    assert "40-iteration cosine" in str(stretched) and "20-iteration one" in str(stretched)
    # a step schedule does not depend on the run's length
    assert {c.key for c in differences(requested(), requested(trainer__iterations=40))} == {
        "trainer.iterations"
    }


def test_claim_refuses_another_run_and_records_an_allowed_recipe_change(tmp_path):
    write_json(tmp_path / RUN_CONFIG_FILE, requested())
    with ownership_scope():
        with pytest.raises(RunDirMismatch, match=r"depth=8 -> 14.*another hydra.run.dir"):
            claim_run_dir(tmp_path, requested(model__depth=14))
        with pytest.raises(RunDirMismatch, match=r"optim.lr=0.1 -> 0.05.*allow_recipe_change"):
            claim_run_dir(tmp_path, requested(optim__lr=0.05))
        claim = claim_run_dir(tmp_path, requested(optim__lr=0.05, trainer__iterations=30), True)
        written = claim.record(20)
    # the run's config keeps its recipe and takes the new length; the change is dated apart
    assert written["optim"]["lr"] == 0.1 and written["trainer"]["iterations"] == 30
    (line,) = read_metrics(tmp_path / RECIPE_CHANGES_FILE)
    assert line["from_iteration"] == 20 and line["changes"] == {"optim.lr": [0.1, 0.05]}
    write_json(tmp_path / RUN_CONFIG_FILE, written)
    assert effective_config(tmp_path)["optim"]["lr"] == 0.05
    # the changed recipe is now the run's: asking for it again is no change
    check_run_dir(tmp_path, requested(optim__lr=0.05, trainer__iterations=30))
    with pytest.raises(RunDirMismatch, match=r"optim.lr=0.05 -> 0.1"):
        check_run_dir(tmp_path, requested(trainer__iterations=30))
    # a run restarted from 0 is a new run: the requested config, no recipe history
    with ownership_scope():
        again = claim_run_dir(tmp_path, requested(optim__lr=0.05, trainer__iterations=30))
        assert again.record(0) == requested(optim__lr=0.05, trainer__iterations=30)
    assert not (tmp_path / RECIPE_CHANGES_FILE).exists()


def test_a_seed_group_and_a_single_run_do_not_share_a_directory(tmp_path):
    write_json(tmp_path / RUN_CONFIG_FILE, requested())
    with pytest.raises(RunDirMismatch, match="vmap_seeds=1.*vmap_seeds=2"):
        check_run_dir(tmp_path, requested(trainer__vmap_seeds=2))


def test_restoring_another_state_is_a_mismatch_not_corruption(tmp_path):
    import jax.numpy as jnp

    from resnet_flax.training.checkpoints import (
        Checkpointer,
        CheckpointMismatch,
        abstract_like,
        restore_common,
    )

    saver = Checkpointer(tmp_path)
    saver.save(10, {"w": jnp.zeros(3), "b": jnp.zeros(2)})
    saver.close()
    checkpointer = Checkpointer(tmp_path)
    with pytest.raises(CheckpointMismatch, match="w has shape"):
        restore_common([checkpointer], abstract_like({"w": jnp.zeros(4), "b": jnp.zeros(2)}))
    with pytest.raises(CheckpointMismatch, match="lacks v"):
        checkpointer.restore(10, abstract_like({"w": jnp.zeros(3), "v": jnp.zeros(2)}))
    # nothing was set aside: the checkpoint is intact, and restores into its own state
    assert checkpointer.steps() == [10] and not (tmp_path / "corrupt").exists()
    state = checkpointer.restore(10, abstract_like({"w": jnp.ones(3), "b": jnp.ones(2)}))
    assert float(state["w"].sum()) == 0.0
    checkpointer.close()


@pytest.mark.slow
def test_a_changed_configuration_never_resumes_into_the_old_run(tmp_path):
    run = tmp_path / "run"
    assert train_cli(run, "trainer.iterations=20", "cpu_devices=1").returncode == 0
    before = snapshot(run)
    refused = {
        # completed and asked for no more iterations: refused, not skipped
        ("model=plain",): "model=residual -> plain",
        ("model=plain", "trainer.iterations=30"): "model=residual -> plain",
        ("depth=14", "trainer.iterations=30"): "depth=8 -> 14",
        ("trainer.batch_size=32", "trainer.iterations=30"): "trainer.batch_size=16 -> 32",
        ("optim.lr=0.05", "trainer.iterations=30"): "optim.lr=0.1 -> 0.05",
    }
    for overrides, change in refused.items():
        proc = train_cli(run, *overrides, "cpu_devices=1")
        (line,) = error_lines(proc.stderr)
        assert proc.returncode == 2 and line.startswith("error: ") and change in line, line
        assert snapshot(run) == before, overrides  # nothing written, nothing set aside
    # an explicit recipe change continues the run and is recorded, dated
    more = ["optim.lr=0.05", "trainer.iterations=30", "trainer.allow_recipe_change=true"]
    proc = train_cli(run, *more, "cpu_devices=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (change,) = read_metrics(run / RECIPE_CHANGES_FILE)
    assert change["changes"] == {"optim.lr": [0.1, 0.05]} and change["from_iteration"] == 20
    assert read_json(run / RUN_CONFIG_FILE)["optim"]["lr"] == 0.1
    lines = read_metrics(run / "metrics.jsonl")
    lrs = {m["iteration"]: round(m["lr"], 6) for m in lines if "lr" in m}  # float32
    assert lrs == {5: 0.1, 10: 0.1, 15: 0.1, 20: 0.1, 25: 0.05, 30: 0.05}


# --- one owner --------------------------------------------------------------------------------


def test_a_lock_is_exclusive_counted_and_released_with_its_scope(tmp_path):
    claim = "import sys; from resnet_flax.rundir.owner import own; own(sys.argv[1])"
    probe = [sys.executable, "-c", claim]
    with ownership_scope():
        own(tmp_path)
        own(tmp_path)  # the same process may claim twice
        assert owner(tmp_path) == os.getpid()
        other = subprocess.run([*probe, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
        assert other.returncode == 1 and "RunDirBusy" in other.stderr
        assert f"in use by process {os.getpid()}" in other.stderr
    assert owner(tmp_path) is None and not lock_path(tmp_path).exists()
    assert subprocess.run([*probe, str(tmp_path)], cwd=ROOT).returncode == 0


def test_a_seed_groups_claim_covers_every_seeds_directory(tmp_path):
    group = requested(trainer__vmap_seeds=2, info__seed=3)
    with ownership_scope():
        claim_run_dir(tmp_path, group)
        held = [owner(d) for d in (tmp_path, tmp_path / "seed_3", tmp_path / "seed_4")]
        assert held == [os.getpid()] * 3
    assert [owner(d) for d in (tmp_path, tmp_path / "seed_3")] == [None, None]


def test_two_commands_on_one_run_directory_one_trains_one_refuses(tmp_path):
    run = tmp_path / "run"
    first = start_cli(run, "trainer.iterations=40")
    wait_until(lambda: lock_path(run).exists(), first, "the first command's lock")
    t0 = time.time()
    second = train_cli(run, "trainer.iterations=40")
    (line,) = error_lines(second.stderr)
    assert second.returncode == 2 and "is in use by process" in line, second.stderr[-3000:]
    assert time.time() - t0 < 30  # at once: before loading data or compiling
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    its = [m["iteration"] for m in read_metrics(run / "metrics.jsonl") if "lr" in m]
    assert its == list(range(5, 41, 5))
    assert read_summary(run)["iterations"] == 40
    assert not list(run.rglob("*.tmp")) and not lock_path(run).exists()


# --- no orphans, no lost signals ----------------------------------------------------------


def test_killing_the_command_stops_its_trainer_through_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    # default cpu_devices on a machine with several cores: the run trains in a child
    proc = start_cli(run, "trainer.iterations=40", "trainer.checkpoint_every=40")
    wait_until(lambda: read_metrics(run / "metrics.jsonl"), proc, "the first evaluation")
    (trainer,) = children(proc.pid)
    proc.kill()
    proc.communicate()
    deadline = time.time() + 120
    while alive(trainer):
        assert time.time() < deadline, "the trainer outlived its command"
        time.sleep(0.05)
    summary = read_summary(run)
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["message"]
    steps = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    # it stopped at its next chunk, not at the end of the run, and saved where it stopped
    assert steps == [summary["iterations"]] and 0 < steps[0] < 40
    assert owner(run) is None


def test_ctrl_c_before_the_loop_stops_with_one_line_and_nothing_written(tmp_path):
    run = tmp_path / "run"
    proc = start_cli(run, "trainer.iterations=40")  # several cores: a guarded child
    wait_until(lambda: children(proc.pid), proc, "the trainer process")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    (line,) = error_lines(err)
    assert proc.returncode == 130, err[-3000:]
    assert line.startswith("interrupted: ") and "SIGINT before training" in line
    assert not (run / "summary.json").exists() and not (run / "metrics.jsonl").exists()
    assert not list((run / "checkpoints").iterdir())


# --- records ----------------------------------------------------------------------------------


def test_restart_from_zero_drops_every_old_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 0, "test_error": 0.9}\n{"iteration": 5, "lr": 0.1}\n')
    assert keep_metrics(path, 0) == [] and path.read_text() == ""


def test_resuming_cuts_the_file_in_place_and_drops_lines_without_an_iteration(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"iteration": 0}, {"iteration": 5}, {"iteration": 10}, {"iteration": 15}]
    path.write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"iteration": 20, "lo')
    inode = path.stat().st_ino
    with path.open("a") as appender:  # another handle on the file
        assert keep_metrics(path, 10) == lines[:3]
        assert path.stat().st_ino == inode  # cut, not replaced: the handle writes into it
        appender.write(json.dumps({"iteration": 15}) + "\n")
    assert read_metrics(path) == lines
    # a line with no iteration (written by hand, or by another tool) is dropped, not a crash
    path.write_text('{"iteration": 0}\n{"note": "x"}\n{"iteration": 5}\n')
    assert keep_metrics(path, 5) == [{"iteration": 0}, {"iteration": 5}]
    assert read_metrics(path) == [{"iteration": 0}, {"iteration": 5}]


def test_write_json_leaves_no_temporary_file_behind(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_json(target, {"status": "running"})
    monkeypatch.setattr(json, "dumps", lambda *a, **k: "x" * 10)
    real_replace = os.replace

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        write_json(target, {"status": "completed"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert read_json(target) == {"status": "running"}


# --- sweeps go on -------------------------------------------------------------------------


def train_sweep(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m experiments.train`` with args from the repository root, finished."""
    command = [sys.executable, "-m", "experiments.train", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_an_invalid_job_is_named_before_any_starts(tmp_path):
    # Fails when a sweep launches its valid jobs before saying that another cannot run.
    sweep = tmp_path / "sweep"
    args = ["-m", *BASE, "depth=9,8,57", f"hydra.sweep.dir={sweep}"]
    proc = train_sweep(args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 2 and "depth=9" in lines[0] and "depth=57" in lines[1]
    assert all("CIFAR depth must be 6n+2" in line for line in lines)
    assert not sweep.exists()


def test_a_job_that_fails_alone_is_recorded_and_the_sweep_says_so(tmp_path):
    # Fails when one job's failure ends the sweep, or the sweep exits 0 without naming it.
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez(good, x_train=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
             y_train=np.arange(64) % 4, x_test=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8),
             y_test=np.arange(16) % 4)  # fmt: skip
    sweep = tmp_path / "sweep"
    args = ["-m", "dataset=npz", f"dataset.path={tmp_path / 'missing.npz'},{good}", *BASE[1:]]
    args += ["trainer.iterations=4", "trainer.log_every=2", "trainer.eval_every=4"]
    args += ["trainer.checkpoint_every=4", f"hydra.sweep.dir={sweep}"]
    proc = train_sweep(args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = error_lines(proc.stderr)[-1]
    assert last.startswith("error: 1 job(s) of the sweep failed: ") and "missing.npz" in last
    (failed,) = read_failed_jobs(sweep)
    assert "missing.npz" in failed["job"] and "not found" in failed["message"]
    (summary,) = sweep.rglob("summary.json")  # the failed job left no run
    assert "good.npz" in str(summary) and read_summary(summary.parent)["status"] == "completed"
    shown = subprocess.run(
        [sys.executable, "-m", "experiments.plot", str(sweep), "--out", str(tmp_path / "fig")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert f"failed job {failed['job']}: {failed['message']}" in shown.stdout


@pytest.mark.slow
def test_a_rejected_or_skipped_command_leaves_the_runs_hydra_record(tmp_path):
    run = tmp_path / "run"
    assert train_cli(run, "trainer.iterations=10", "cpu_devices=1").returncode == 0
    recorded = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    assert "iterations: 10" in recorded["config.yaml"].decode()
    skipped = train_cli(run, "trainer.iterations=5", "trainer.progress=true", "cpu_devices=1")
    assert skipped.returncode == 0 and "already completed 10 iterations" in skipped.stdout
    rejected = train_cli(run, "model=plain", "cpu_devices=1")
    assert rejected.returncode == 2
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == recorded
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".hydra"]


# --- truthful records ---------------------------------------------------------------------


def kill_when_trained(proc: subprocess.Popen, run: Path, victim: int, iteration: int) -> None:
    """SIGKILL `victim` once the run's metrics pass `iteration`, then let proc end."""

    def reached() -> bool:
        return any(m.get("iteration", 0) >= iteration for m in read_metrics(run / "metrics.jsonl"))

    wait_until(reached, proc, f"iteration {iteration}")
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=300)


def test_a_killed_run_reads_incomplete_as_far_as_it_got_and_is_not_analysed(tmp_path, capsys):
    from experiments.analyze import main as analyze
    from experiments.plot import main as plot
    from resnet_flax.analysis.runs import load_run

    run = tmp_path / "run"
    proc = start_cli(run, "trainer.iterations=4000", "cpu_devices=1")
    kill_when_trained(proc, run, proc.pid, 15)
    assert read_summary(run)["status"] == "running"  # what the killed process left
    reached = max(m["iteration"] for m in read_metrics(run / "metrics.jsonl"))
    row = load_run(run)
    assert row["status"] == "incomplete" and row["iterations"] == reached >= 15
    assert plot([str(run), "--out", str(tmp_path / "fig")]) == 0
    assert "{'incomplete': 1}" in capsys.readouterr().out
    assert analyze([str(run)]) == 1
    err = capsys.readouterr().err
    assert (
        f"is incomplete at iteration {reached}, not completed" in err
        and "--allow-unfinished" in err
    )
    assert not (run / "analysis.json").exists()


@pytest.mark.slow
def test_a_dead_trainer_leaves_a_failed_run_as_far_as_it_got(tmp_path):
    run = tmp_path / "run"
    proc = start_cli(run, "trainer.iterations=4000")  # several cores: a guarded child
    wait_until(lambda: children(proc.pid), proc, "the trainer process")
    (trainer,) = children(proc.pid)
    kill_when_trained(proc, run, trainer, 15)
    assert proc.returncode == 1
    summary = read_summary(run)
    reached = max(m["iteration"] for m in read_metrics(run / "metrics.jsonl"))
    assert summary["status"] == "failed" and "SIGKILL" in summary["message"]
    assert summary["iterations"] == reached >= 15


def test_analysis_of_a_run_without_checkpoints_creates_none(tmp_path):
    from resnet_flax.analysis.layer_stats import AnalysisError, analyze_run

    write_json(tmp_path / RUN_CONFIG_FILE, requested())
    write_json(tmp_path / "summary.json", {"status": "completed", "iterations": 20})
    with pytest.raises(AnalysisError, match="has no checkpoints/"):
        analyze_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_CONFIG_FILE, "summary.json"]


@pytest.mark.slow
def test_a_restart_from_zero_keeps_no_old_line(tmp_path):
    run = tmp_path / "run"
    # killed before its first checkpoint: the rerun starts from iteration 0 again
    proc = start_cli(
        run, "trainer.iterations=4000", "trainer.checkpoint_every=4000", "cpu_devices=1"
    )
    kill_when_trained(proc, run, proc.pid, 10)
    with (run / "metrics.jsonl").open("a") as f:  # a line without an iteration, added by hand
        f.write('{"note": "restarted"}\n')
    assert train_cli(run, "trainer.iterations=10", "cpu_devices=1").returncode == 0
    assert [m["iteration"] for m in read_metrics(run / "metrics.jsonl")] == [0, 5, 10, 10]


# --- shardings that hold ------------------------------------------------------------------

# Full-batch gradient descent: the batch is the whole training set (64 digits kept).
FULL_BATCH = ["dataset.validation_size=1373", "trainer.batch_size=64", "trainer.iterations=3"]
FULL_BATCH += ["trainer.log_every=1", "trainer.eval_every=3", "trainer.checkpoint_every=3"]


@pytest.mark.parametrize(
    ("devices", "loop"),
    [
        (2, "python"),
        pytest.param(2, "scan", marks=pytest.mark.slow),
        pytest.param(8, "python", marks=pytest.mark.slow),
        pytest.param(8, "scan", marks=pytest.mark.slow),
    ],
)
def test_full_batch_training_on_several_devices(tmp_path, devices, loop):
    run = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run(
        command(run, *FULL_BATCH, f"trainer.step_loop={loop}", f"cpu_devices={devices}"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["device_count"] == devices
    # one step per epoch: the epoch column counts the steps
    epochs = [m["epoch"] for m in read_metrics(run / "metrics.jsonl") if "lr" in m]
    assert epochs == [1.0, 2.0, 3.0]


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a tmpfs of a few hundred KB (root only; skipped elsewhere)."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        options = ["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
        done = subprocess.run(["mount", *options], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_in_one_error_line_with_the_status_written(small_disk):
    run = small_disk("100k") / "run"  # room for the records, not for a checkpoint
    proc = train_cli(run, "trainer.iterations=20")
    (line,) = error_lines(proc.stderr)
    assert proc.returncode == 2 and line.startswith(f"error: {run}: cannot write")
    assert "No space left on device" in line and "Traceback" not in proc.stdout
    summary = read_summary(run)
    assert summary["status"] == "failed" and "No space left" in summary["message"]
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".summary.json.*"))


def test_a_read_only_run_directory_ends_in_one_error_line(small_disk):
    disk = small_disk("1m")
    (disk / "run").mkdir()
    write_json(disk / "run" / "summary.json", {"status": "completed", "iterations": 10})
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    proc = train_cli(disk / "run", "trainer.iterations=20")
    (line,) = error_lines(proc.stderr)
    assert proc.returncode == 2 and line == (
        f"error: {disk / 'run'} is not writable (read-only file system or permissions): "
        "choose another hydra.run.dir (or hydra.sweep.dir)"
    )
    assert not proc.stdout


@pytest.mark.slow
def test_a_corrupt_checkpoint_falls_back_without_orbax_noise(tmp_path):
    run = tmp_path / "run"
    assert train_cli(run, "trainer.iterations=20", "cpu_devices=1").returncode == 0
    for chunk in (run / "checkpoints" / "20" / "default" / "ocdbt.process_0" / "d").iterdir():
        chunk.unlink()  # the newest checkpoint's arrays are gone
    proc = train_cli(run, "trainer.iterations=30", "cpu_devices=1")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout and "resuming" in proc.stdout
    assert "checkpoints/20 cannot be restored" in proc.stdout


def test_npz_channels_first_binary_images_and_unseen_classes_are_said(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 2, (32, 3, 8, 8), dtype=np.uint8),  # NCHW, 0/1 values
        y_train=np.arange(32) % 2,
        x_test=rng.integers(0, 2, (6, 3, 8, 8), dtype=np.uint8),
        y_test=np.array([0, 1, 2, 0, 1, 2]),  # class 2 never in training
    )
    run = tmp_path / "run"
    proc = train_cli(
        run,
        "dataset=npz",
        f"dataset.path={path}",
        "dataset.num_classes=3",
        "trainer.iterations=2",
        "trainer.log_every=1",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=2",
        "cpu_devices=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout
    assert "has shape (32, 3, 8, 8), channels first" in log and "(32, 8, 8, 3)" in log
    assert "'x_train' holds values up to 1 only" in log
    assert "classes 2 occur in y_test but never in y_train" in log and "2 test images" in log
    model = read_json(run / RUN_CONFIG_FILE)["model"]
    assert model["in_channels"] == 3  # trained as 8x8 images of 3 channels


def test_a_resumed_run_records_the_continuing_keys_asked_under_the_current_names(tmp_path):
    write_json(tmp_path / RUN_CONFIG_FILE, old_style(requested()))  # its section is "data"
    asked = requested(data__data_dir="/new/place", trainer__iterations=40)
    asked = {("dataset" if k == "data" else k): v for k, v in asked.items()}
    with ownership_scope():
        written = claim_run_dir(tmp_path, asked).record(20)
    assert "data" not in written and written["dataset"]["data_dir"] == "/new/place"
    assert written["trainer"]["iterations"] == 40 and written["dataset"]["name"] == "digits"
