"""Training engine: complete run directories, determinism, resume, divergence, sharding."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.data.config import StreamConfig
from resnet_flax.data.memory import DataConfig, load_dataset
from resnet_flax.models.spec import ModelSpec
from resnet_flax.rundir import read_metrics
from resnet_flax.training.checkpoints import Checkpointer, abstract_like
from resnet_flax.training.config import (
    ConfigError,
    RunInfo,
    TrainerConfig,
    check_devices,
    compiler_options,
)
from resnet_flax.training.loop import train
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig
from resnet_flax.training.runtime import make_mesh
from resnet_flax.training.setup import set_up
from resnet_flax.training.steps import Program

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelSpec(model="residual", depth=8)
DIGITS = DataConfig(name="digits", crop_padding=0, flip=False)
QUICK = TrainerConfig(
    iterations=20, batch_size=32, log_every=5, eval_every=10, checkpoint_every=10, progress=False
)
QUICK_10 = TrainerConfig(**{**QUICK.__dict__, "iterations": 10})
RECIPE = OptimConfig(lr=0.05, boundaries=(15,))


def _curve(run_dir: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run_dir / "metrics.jsonl") if key in m]


def _assert_complete(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    for key in ("final_test_error", "best_test_error", "final_train_error", "param_count"):
        assert summary[key] is not None
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert all("iteration" in m and "epoch" in m for m in lines)
    train_lines = [m for m in lines if "train_error" in m]
    assert train_lines and all(
        {"lr", "train_loss", "train_error", "images_per_sec"} <= m.keys() for m in train_lines
    )
    assert any("test_error" in m for m in lines)
    assert list((run_dir).glob("events.*"))
    assert (run_dir / "checkpoints").is_dir()
    return summary


def test_digits_run_directory_is_complete(tmp_path):
    summary = train(tmp_path, RunConfig(TINY, DIGITS, RECIPE, QUICK, RunInfo("t", 0)))
    _assert_complete(tmp_path)
    assert summary["iterations"] == 20 and summary["dataset"] == "digits"
    assert 0.0 <= summary["final_train_error"] <= 1.0
    # the lr schedule is in iterations: 0.05 until 15, then divided by 10
    lrs = _curve(tmp_path, "lr")
    assert lrs[0] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.005)
    assert_recorded_config_is_resolved(tmp_path, RunConfig(TINY, DIGITS, RECIPE, QUICK))


def assert_recorded_config_is_resolved(run_dir: Path, requested: RunConfig) -> RunConfig:
    """run_config.json holds no "auto", reads back equal, and is the requested run resolved."""
    # Fails when an "auto" is recorded instead of what ran, or a field does not round-trip.
    text = (run_dir / "run_config.json").read_text()
    assert '"auto"' not in text
    recorded = RunConfig.from_dict(json.loads(text))
    assert json.loads(json.dumps(recorded.to_dict())) == json.loads(text)
    assert recorded == RunConfig.from_dict(recorded.to_dict())
    cpu = jax.default_backend() == "cpu"
    assert recorded.model.stage_loop == ("unroll" if cpu else "scan")
    assert recorded.model.conv_impl == ("fast" if cpu else "xla")
    assert recorded.trainer.step_loop == ("python" if cpu else "scan")
    assert recorded.model.block == "basic" and recorded.info.cpu_devices == jax.local_device_count()
    # everything the command asked for that is not an "auto" is recorded as asked
    assert recorded.optim == requested.optim and recorded.dataset == requested.dataset
    assert recorded.model.depth == requested.model.depth
    return recorded


def test_mocked_cifar10_run_directory_is_complete(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = DataConfig(name="cifar10", data_dir=str(tmp_path / "tfds"), validation_size=8)
    with tfds.testing.mock_data(num_examples=48):
        trainer = TrainerConfig(
            iterations=4,
            batch_size=8,
            log_every=2,
            eval_every=2,
            checkpoint_every=4,
            eval_batch_size=16,
            progress=False,
        )
        summary = train(tmp_path / "run", RunConfig(TINY, cfg, RECIPE, trainer, RunInfo("t", 0)))
    _assert_complete(tmp_path / "run")
    assert summary["dataset"] == "cifar10" and summary["final_val_error"] is not None


def test_same_seed_gives_identical_metrics(tmp_path):
    a = train(tmp_path / "a", RunConfig(TINY, DIGITS, RECIPE, QUICK, RunInfo("t", 3)))
    b = train(tmp_path / "b", RunConfig(TINY, DIGITS, RECIPE, QUICK, RunInfo("t", 3)))
    assert _curve(tmp_path / "a", "train_loss") == _curve(tmp_path / "b", "train_loss")
    assert a["final_train_error"] == b["final_train_error"]


def test_non_finite_loss_ends_run_as_diverged(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from resnet_flax.training import steps as train_module

    real = train_module.cross_entropy
    monkeypatch.setattr(train_module, "cross_entropy", lambda logits, y: real(logits, y) * jnp.nan)
    summary = train(tmp_path, RunConfig(TINY, DIGITS, RECIPE, QUICK, RunInfo("t", 0)))
    assert summary["status"] == "diverged"
    assert "non-finite" in summary["message"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["status"] == "diverged"
    assert read_metrics(tmp_path / "metrics.jsonl")  # the metrics so far are kept


def test_bad_intervals_fail_before_compiling():
    with pytest.raises(ConfigError, match="multiple of trainer.log_every"):
        TrainerConfig(log_every=7, eval_every=10)
    with pytest.raises(ConfigError, match="divisible by the 8 devices"):
        check_devices(TrainerConfig(batch_size=12), 8)
    with pytest.raises(ConfigError, match="one of default, fast_compile, fast_runtime; got 'fast'"):
        TrainerConfig(xla_cpu_preset="fast")
    with pytest.raises(ConfigError, match="step_loop must be one of auto, scan, python"):
        TrainerConfig(step_loop="while")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_cpu_preset_reaches_every_compiled_program():
    """The preset is an option of the step and evaluation programs (XLA rejects a bad value)."""
    assert compiler_options(TrainerConfig(xla_cpu_preset="fast_compile"), "cpu") == {
        "xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"
    }
    assert compiler_options(TrainerConfig(xla_cpu_preset="fast_compile"), "gpu") == {}
    assert compiler_options(TrainerConfig(), "cpu") == {}
    one, bad = jnp.float32(1), {"xla_cpu_opt_preset": "X"}
    for loop in ("python", "scan"):  # the single step, and the scanned chunk
        program = Program(lambda s, d, h: (s + d * h, s), lambda s, d: s * d, one, loop, bad)
        with pytest.raises(Exception, match="xla_cpu_opt_preset"):
            program.repeat(one, one, 2)
        with pytest.raises(Exception, match="xla_cpu_opt_preset"):
            program.evaluate(one, one)


WORKER = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("resnet_flax").setLevel(logging.INFO)  # "resuming ... from iteration N"
    from resnet_flax.models.spec import ModelSpec
    from resnet_flax.data.memory import DataConfig
    from resnet_flax.training.optim import OptimConfig
    from resnet_flax.training.config import RunInfo, TrainerConfig
    from resnet_flax.training.loop import train
    from resnet_flax.training.run_config import RunConfig
    run_dir, iterations, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    trainer = TrainerConfig(iterations=iterations, batch_size=batch, log_every=5,
                            eval_every=10, checkpoint_every=10, progress=False)
    recipe = OptimConfig(lr=0.05, boundaries=(30,))
    cfg = RunConfig(ModelSpec(depth=8), DataConfig(name="digits"), recipe, trainer, RunInfo("t", 1))
    summary = train(run_dir, cfg)
    print("SUMMARY" + json.dumps(summary))
    """
)


def _worker(run_dir: Path, iterations: int, batch: int = 32, env: dict | None = None):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(run_dir), str(iterations), str(batch)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish_with_log(proc) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.split("SUMMARY", 1)[1]), err


def _finish(proc) -> dict:
    return _finish_with_log(proc)[0]


def test_sigkill_and_rerun_equals_uninterrupted(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _worker(whole, 40)
    victim = _worker(killed, 40)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "20").exists():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    at_kill = json.loads((killed / "summary.json").read_text())
    assert at_kill["status"] == "running" and at_kill["iterations"] < 40  # killed, not finished
    saved = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    expected = _finish(reference)
    resumed, log = _finish_with_log(_worker(killed, 40))
    assert f"resuming {killed} from iteration {saved}" in log
    assert resumed["iterations"] == 40
    for key in ("train_loss", "train_error", "test_error", "test_loss"):
        assert _curve(killed, key) == _curve(whole, key), key
    assert resumed["final_train_error"] == expected["final_train_error"]


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    run = tmp_path / "run"
    train(run, RunConfig(TINY, DIGITS, RECIPE, QUICK, RunInfo("t", 0)))
    newest = run / "checkpoints" / "20"
    for f in newest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f.parent.name) + f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for f in (newest / "default").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"")
    # The same length again: the final save lands on the corrupt checkpoint's step.
    with caplog.at_level("INFO", logger="resnet_flax"):
        summary = train(run, RunConfig(TINY, DIGITS, RECIPE, QUICK, RunInfo("t", 0)))
    assert "checkpoints/20 cannot be restored" in caplog.text
    assert f"resuming {run} from iteration 10" in caplog.text
    (aside,) = (run / "checkpoints" / "corrupt").iterdir()
    assert aside.name.startswith("20-") and f"moved to {aside}" in caplog.text
    assert summary["status"] == "completed" and summary["iterations"] == 20
    # resumed from 10, so the metrics from 10 on were produced again, each once
    iterations = [m["iteration"] for m in read_metrics(run / "metrics.jsonl") if "lr" in m]
    assert iterations == sorted(set(iterations)) == list(range(5, 21, 5))
    # every checkpoint left restores and holds its own step, the final one included
    checkpointer = Checkpointer(run / "checkpoints")
    cfg = RunConfig(TINY, DIGITS, RECIPE, QUICK)
    template = abstract_like(set_up(cfg, load_dataset(DIGITS), make_mesh()).state)
    assert checkpointer.steps() == [20, 10]
    for step in checkpointer.steps():
        assert int(checkpointer.restore(step, template)["step"]) == step
    checkpointer.close()


def test_group_resume_sets_aside_newer_steps_and_every_save_lands(tmp_path):
    import jax.numpy as jnp

    from resnet_flax.training.checkpoints import restore_common

    a, b = Checkpointer(tmp_path / "a"), Checkpointer(tmp_path / "b")
    for step in (10, 20):  # seed b was killed before its save at 20
        a.save(step, {"w": jnp.full(3, step)})
        a.wait()
    b.save(10, {"w": jnp.full(3, 10)})
    b.wait()
    step, states = restore_common([a, b], abstract_like({"w": jnp.zeros(3, jnp.int32)}))
    assert step == 10 and [int(s["w"][0]) for s in states] == [10, 10]
    # a's 20 would block the resumed run's save at 20 (Orbax skips steps it already lists)
    (unused,) = (tmp_path / "a" / "unused").iterdir()
    assert unused.name.startswith("20-") and a.steps() == [10]
    a.save(20, {"w": jnp.full(3, 20)})
    a.wait()
    with pytest.raises(RuntimeError, match="already holds step 20"):
        a.save(20, {"w": jnp.full(3, 20)})  # a skipped save is an error, never silent
    a.close()
    b.close()


def test_one_diverging_seed_of_a_vmapped_group_stops_alone(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp

    from resnet_flax.training.seeds import SeedGroup

    real = SeedGroup.initial_state

    def nan_first_seed(self, spec, tx, order_len, mesh):
        graphdef, state, params = real(self, spec, tx, order_len, mesh)
        nan = jax.tree.map(lambda p: p.at[0].set(jnp.nan), state["params"])
        return graphdef, self.replicate({**state, "params": nan}, mesh), params

    monkeypatch.setattr(SeedGroup, "initial_state", nan_first_seed)
    group = TrainerConfig(**{**QUICK_10.__dict__, "vmap_seeds": 2})
    result = train(tmp_path, RunConfig(TINY, DIGITS, RECIPE, group, RunInfo("t", 4)))
    assert result["status"] == "diverged"
    bad, good = result["runs"]
    # seed 4 stops at its first chunk (its records end there); seed 5 trains on to the end
    assert bad["status"] == "diverged" and "at iteration 1;" in bad["message"]
    assert bad["iterations"] == 5 == max(_curve(tmp_path / "seed_4", "iteration"))
    assert not list((tmp_path / "seed_4" / "checkpoints").glob("[0-9]*"))
    assert good["status"] == "completed" and good["iterations"] == 10
    _assert_complete(tmp_path / "seed_5")
    assert np.all(np.isfinite(_curve(tmp_path / "seed_5", "train_loss")))
    assert [p.name for p in (tmp_path / "seed_5" / "checkpoints").glob("[0-9]*")] == ["10"]


# Slow: 8 vs 1 device, in memory; tests/test_multihost.py compares 2x4 with 1x8 fast.
@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
    one = _finish(_worker(tmp_path / "one", 10, batch=64))
    eight = _finish(
        _worker(
            tmp_path / "eight",
            10,
            batch=64,
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        )
    )
    assert one["device_count"] == 1 and eight["device_count"] == 8
    np.testing.assert_allclose(
        _curve(tmp_path / "eight", "train_loss"), _curve(tmp_path / "one", "train_loss"), rtol=1e-4
    )
    np.testing.assert_allclose(eight["final_train_error"], one["final_train_error"], atol=2e-3)
    # A run checkpointed on 8 devices resumes on 1 (cpu_devices differs between machines).
    one = _finish(_worker(tmp_path / "one", 20, batch=64))
    resumed = _finish(_worker(tmp_path / "eight", 20, batch=64))
    assert resumed["iterations"] == 20 and resumed["device_count"] == 1
    np.testing.assert_allclose(
        _curve(tmp_path / "eight", "train_loss"), _curve(tmp_path / "one", "train_loss"), rtol=1e-4
    )


def test_vmapped_seeds_match_separate_runs_and_resume(tmp_path):
    from resnet_flax.analysis.runs import find_run_dirs, load_runs

    group = TrainerConfig(**{**QUICK.__dict__, "vmap_seeds": 2, "iterations": 10})
    result = train(tmp_path / "group", RunConfig(TINY, DIGITS, RECIPE, group, RunInfo("t", 4)))
    assert result["status"] == "completed" and result["seeds"] == [4, 5]
    for seed in (4, 5):
        separate = train(
            tmp_path / f"alone{seed}", RunConfig(TINY, DIGITS, RECIPE, QUICK_10, RunInfo("t", seed))
        )
        run_dir = tmp_path / "group" / f"seed_{seed}"
        summary = _assert_complete(run_dir)
        assert summary["seed"] == seed and summary["vmap_seeds"] == 2
        for key in ("train_loss", "test_error"):
            np.testing.assert_allclose(
                _curve(run_dir, key), _curve(tmp_path / f"alone{seed}", key), rtol=1e-4, atol=1e-6
            )
        assert summary["final_train_error"] == pytest.approx(
            separate["final_train_error"], abs=2e-3
        )
    # the job directory is not a run; its seeds are
    assert [p.name for p in find_run_dirs([tmp_path / "group"])] == ["seed_4", "seed_5"]
    assert sorted(load_runs([tmp_path / "group"])["seed"]) == [4, 5]
    # a longer rerun resumes both seeds from their common checkpoint
    longer = TrainerConfig(**{**group.__dict__, "iterations": 20})
    again = train(tmp_path / "group", RunConfig(TINY, DIGITS, RECIPE, longer, RunInfo("t", 4)))
    assert [r["iterations"] for r in again["runs"]] == [20, 20]
    iterations = [
        m["iteration"]
        for m in read_metrics(tmp_path / "group" / "seed_5" / "metrics.jsonl")
        if "lr" in m
    ]
    assert iterations == list(range(5, 21, 5))


def test_streamed_imagenette_trains_records_and_resumes_exactly(tmp_path, imagenette_dir):
    stream = StreamConfig(image_size=16, shuffle_buffer=64)
    cfg = DataConfig(name="imagenette", data_dir=str(imagenette_dir), stream=stream)
    trainer = TrainerConfig(
        iterations=6,
        batch_size=8,
        log_every=2,
        eval_every=2,
        checkpoint_every=2,
        eval_batch_size=16,
        progress=False,
    )
    first_half = TrainerConfig(**{**trainer.__dict__, "iterations": 4})
    whole = train(tmp_path / "whole", RunConfig(TINY, cfg, RECIPE, trainer, RunInfo("t", 0)))
    train(tmp_path / "split", RunConfig(TINY, cfg, RECIPE, first_half, RunInfo("t", 0)))
    resumed = train(tmp_path / "split", RunConfig(TINY, cfg, RECIPE, trainer, RunInfo("t", 0)))
    assert whole["status"] == resumed["status"] == "completed"
    assert whole["dataset"] == "imagenette" and whole["eval_split"] == "validation"
    assert 0.0 <= whole["input_wait_fraction"] <= 1.0
    assert whole.get("final_train_error") is None  # streamed sets are not re-scored whole
    assert_recorded_config_is_resolved(tmp_path / "whole", RunConfig(TINY, cfg, RECIPE, trainer))
    lines = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [m["iteration"] for m in lines if "test_error" in m] == [0, 2, 4, 6]
    assert all("input_wait_fraction" in m for m in lines if "train_loss" in m)
    # 24 images, batch 8: three steps per epoch, so the resumed run crosses an epoch boundary
    for key in ("train_loss", "test_error"):
        assert _curve(tmp_path / "split", key) == _curve(tmp_path / "whole", key), key


@pytest.mark.slow
def test_residual_20_learns_digits_within_two_minutes(tmp_path):
    start = time.perf_counter()
    trainer = TrainerConfig(
        iterations=150,
        batch_size=128,
        log_every=10,
        eval_every=50,
        checkpoint_every=150,
        progress=False,
    )
    summary = train(
        tmp_path,
        RunConfig(
            ModelSpec(depth=20),
            DIGITS,
            OptimConfig(boundaries=(100, 130)),
            trainer,
            RunInfo("t", 0),
        ),
    )
    assert time.perf_counter() - start < 120
    assert summary["final_train_error"] < 0.05


def test_array_eval_batches_cover_every_row_once_in_one_shape(monkeypatch):
    import jax

    from resnet_flax.training.evaluate import array_eval_batches

    x, y = np.arange(10)[:, None] * np.ones((1, 3)), np.arange(10)
    batches = list(array_eval_batches(x, y, 4))
    assert [b[0].shape for b in batches] == [(4, 3)] * 3
    rows = np.concatenate([b[1][b[2]] for b in batches])
    assert sorted(rows) == list(range(10)) and sum(b[2].sum() for b in batches) == 10
    # two processes: each gets its half of every global batch; together every row once
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    seen = []
    for p in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        local = list(array_eval_batches(x, y, 4))
        assert [b[0].shape for b in local] == [(2, 3)] * 3
        seen += [r for b in local for r in b[1][b[2]]]
    assert sorted(seen) == list(range(10))


def test_evaluation_compiles_once_for_every_split_and_matches_a_full_forward():
    import jax
    from flax import nnx

    from resnet_flax.data import augment as aug
    from resnet_flax.data.memory import load_dataset

    data = load_dataset(DIGITS)
    run = set_up(RunConfig(TINY, DIGITS, RECIPE, QUICK), data, make_mesh())
    # the 360-image test set sets the batch (and the record): no batch of 1,000 mostly padding
    assert run.cfg.trainer.eval_batch_size == len(data.x_test) == 360
    stats = run.source.stats
    model = nnx.merge(run.graphdef, run.state["params"], run.state["batch_stats"])
    model.eval()
    for split in ("test", "train"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        loss, error = run.source.evaluate(run.program, run.state, split)
        logits = model(aug.normalize(jax.numpy.asarray(x), *stats))
        assert float(error) == pytest.approx(float(np.mean(np.argmax(logits, -1) != y)), abs=1e-6)
        want = float(np.mean(jax.nn.logsumexp(logits, -1) - logits[np.arange(len(y)), y]))
        assert float(loss) == pytest.approx(want, rel=1e-4)
    assert run.program.evaluate._cache_size() == 1
