"""The streamed source and the vmapped seed group on eight CPU devices: same curves as one
device, and a run interrupted there resumes to the same end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelSpec(model="residual", depth=8)
RECIPE = OptimConfig(lr=0.05, boundaries=(15,))
TRAINER = TrainerConfig(
    iterations=4,
    batch_size=16,
    log_every=2,
    eval_every=2,
    checkpoint_every=2,
    eval_batch_size=16,
    progress=False,
)

# In a process with eight CPU devices: a run stopped after 2 iterations, then resumed to 4.
WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    sys.path.insert(0, sys.argv[1])
    from tests.test_eight_devices import run
    assert jax.device_count() == 8
    summaries = [run(sys.argv[2], sys.argv[3], sys.argv[4], n) for n in (2, 4)]
    print("SUMMARY" + json.dumps(summaries))
    """
)


def data_config(mode: str, data_dir: str) -> DataConfig:
    """The streamed imagenette for 'stream', the in-memory digits for 'group'."""
    if mode == "stream":
        stream = StreamConfig(image_size=16, shuffle_buffer=64)
        return DataConfig(name="imagenette", data_dir=data_dir, stream=stream)
    return DataConfig(name="digits", crop_padding=2, flip=True)


def run(run_dir: str, mode: str, data_dir: str, iterations: int) -> dict:
    """Train one run of the mode ('stream': one seed; 'group': two vmapped seeds)."""
    seeds = 2 if mode == "group" else 1
    trainer = dataclasses.replace(TRAINER, iterations=iterations, vmap_seeds=seeds)
    return train(
        run_dir, RunConfig(TINY, data_config(mode, data_dir), RECIPE, trainer, RunInfo("t", 3))
    )


def on_eight_devices(run_dir: Path, mode: str, data_dir: str) -> list[dict]:
    """run() to 2 and then to 4 iterations in a subprocess with eight CPU devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    args = [str(ROOT), str(run_dir), mode, data_dir]
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("SUMMARY", 1)[1])


def curves(run_dir: Path) -> dict[str, list[float]]:
    """Every metric of the training and evaluation lines, by name."""
    lines = read_metrics(run_dir / "metrics.jsonl")
    keys = ("train_loss", "train_error", "test_loss", "test_error")
    return {k: [m[k] for m in lines if k in m] for k in keys}


@pytest.mark.parametrize("mode", ["stream", "group"])
def test_eight_devices_match_one_and_resume(tmp_path, imagenette_dir, mode):
    data_dir = str(imagenette_dir)
    run(str(tmp_path / "one"), mode, data_dir, 4)
    first, resumed = on_eight_devices(tmp_path / "eight", mode, data_dir)
    runs = ["."] if mode == "stream" else ["seed_3", "seed_4"]
    for summary in (first, resumed):
        for s in summary.get("runs", [summary]):
            assert s["device_count"] == 8 and s["status"] == "completed"
    assert [s["iterations"] for s in resumed.get("runs", [resumed])] == [4] * len(runs)
    for name in runs:
        eight, alone = curves(tmp_path / "eight" / name), curves(tmp_path / "one" / name)
        assert len(eight["train_loss"]) == 2 and len(eight["test_error"]) == 3
        for key, values in alone.items():
            np.testing.assert_allclose(eight[key], values, rtol=2e-4, atol=1e-6, err_msg=key)
