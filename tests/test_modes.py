"""Every mode of the loop through train(): scanned programs, bfloat16, a learning update,
a streamed seed group with resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from resnet_flax.data.config import StreamConfig
from resnet_flax.data.memory import DataConfig
from resnet_flax.models.spec import ModelSpec
from resnet_flax.rundir import read_metrics
from resnet_flax.training.config import RunInfo, TrainerConfig
from resnet_flax.training.loop import train
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig

DIGITS = DataConfig(name="digits", crop_padding=0, flip=False)
RECIPE = OptimConfig(lr=0.05, boundaries=(15,))
# depth 14: two blocks per stage, so a scanned stage loops over a real stack of blocks
NET = ModelSpec(model="residual", depth=14)
CHUNKS = TrainerConfig(
    iterations=12, batch_size=32, log_every=4, eval_every=12, checkpoint_every=12, progress=False
)


def curve(run_dir, key: str) -> list[float]:
    """One metric over the run, in iteration order."""
    return [m[key] for m in read_metrics(run_dir / "metrics.jsonl") if key in m]


def test_scanned_stages_and_steps_follow_the_unrolled_python_loop(tmp_path):
    unrolled = dataclasses.replace(NET, stage_loop="unroll")
    scanned = dataclasses.replace(NET, stage_loop="scan")
    python = dataclasses.replace(CHUNKS, step_loop="python")
    scan = dataclasses.replace(CHUNKS, step_loop="scan")
    a = train(tmp_path / "a", RunConfig(unrolled, DIGITS, RECIPE, python, RunInfo("t", 1)))
    b = train(tmp_path / "b", RunConfig(scanned, DIGITS, RECIPE, scan, RunInfo("t", 1)))
    assert a["status"] == b["status"] == "completed"
    assert len(curve(tmp_path / "a", "train_loss")) == 3
    np.testing.assert_allclose(
        curve(tmp_path / "b", "train_loss"), curve(tmp_path / "a", "train_loss"), rtol=1e-5
    )
    assert b["final_train_error"] == pytest.approx(a["final_train_error"], abs=1e-3)


def test_bfloat16_trains_close_to_float32(tmp_path):
    f32 = train(tmp_path / "f32", RunConfig(NET, DIGITS, RECIPE, CHUNKS, RunInfo("t", 2)))
    bf16_net = dataclasses.replace(NET, precision="bfloat16")
    bf16 = train(tmp_path / "bf16", RunConfig(bf16_net, DIGITS, RECIPE, CHUNKS, RunInfo("t", 2)))
    assert bf16["status"] == "completed"
    low, full = curve(tmp_path / "bf16", "train_loss"), curve(tmp_path / "f32", "train_loss")
    # bfloat16 keeps 8 bits of mantissa: close to float32, but not the same numbers
    np.testing.assert_allclose(low, full, rtol=0.05)
    assert low != full
    assert bf16["final_test_error"] == pytest.approx(f32["final_test_error"], abs=0.05)


def test_sgd_updates_lower_the_training_loss(tmp_path):
    # A no-op update leaves the loss where it starts (about ln 10); a sign-flipped one raises it.
    trainer = dataclasses.replace(
        CHUNKS, iterations=40, log_every=10, eval_every=40, checkpoint_every=40
    )
    summary = train(
        tmp_path, RunConfig(NET, DIGITS, OptimConfig(lr=0.05), trainer, RunInfo("t", 0))
    )
    losses = curve(tmp_path, "train_loss")
    assert losses[0] > 1.5  # near chance (ln 10 = 2.3) over the first chunk
    assert losses[-1] < 0.6 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert summary["final_train_error"] < 0.5


# Slow: tests/test_eight_devices.py runs the streamed source and the seed group with resume fast.
@pytest.mark.slow
def test_streamed_seed_group_matches_separate_runs_and_resumes(tmp_path, imagenette_dir):
    stream = StreamConfig(image_size=16, shuffle_buffer=64)
    cfg = DataConfig(name="imagenette", data_dir=str(imagenette_dir), stream=stream)
    tiny = ModelSpec(model="residual", depth=8)
    trainer = TrainerConfig(
        iterations=4,
        batch_size=8,
        log_every=2,
        eval_every=2,
        checkpoint_every=2,
        eval_batch_size=16,
        progress=False,
    )
    group = dataclasses.replace(trainer, vmap_seeds=2, iterations=2)
    train(tmp_path / "group", RunConfig(tiny, cfg, RECIPE, group, RunInfo("t", 0)))
    resumed = train(
        tmp_path / "group",
        RunConfig(tiny, cfg, RECIPE, dataclasses.replace(group, iterations=4), RunInfo("t", 0)),
    )
    assert [r["iterations"] for r in resumed["runs"]] == [4, 4]
    # The stream is shared by the group and ordered by the job's seed: seed 0's run equals
    # its separate run; seed 1 starts from other parameters, so its losses differ.
    alone = train(tmp_path / "alone", RunConfig(tiny, cfg, RECIPE, trainer, RunInfo("t", 0)))
    assert alone["status"] == "completed"
    seed0, seed1 = tmp_path / "group" / "seed_0", tmp_path / "group" / "seed_1"
    for key in ("train_loss", "test_error"):
        np.testing.assert_allclose(curve(seed0, key), curve(tmp_path / "alone", key), rtol=1e-4)
    assert curve(seed1, "train_loss") != curve(seed0, "train_loss")
