"""Speed and memory of the real training step on synthetic data already on the device."""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np

from resnet_flax.data.config import DataConfig, StreamConfig
from resnet_flax.data.memory import Dataset
from resnet_flax.models.spec import ModelSpec
from resnet_flax.training.config import TrainerConfig
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig
from resnet_flax.training.runtime import make_mesh
from resnet_flax.training.setup import set_up

PAPER_ITERATIONS = 64_000
CIFAR10_TRAIN_IMAGES = 50_000


@dataclass(frozen=True)
class BenchCase:
    """One measured configuration."""

    model: str = "residual"
    depth: int = 20
    family: str = "cifar"
    batch_size: int = 128
    image_size: int = 32
    precision: str = "float32"
    conv_impl: str = "auto"
    remat: bool = False
    stage_loop: str = "auto"
    step_loop: str = "auto"
    vmap_seeds: int = 1  # seeds trained together as one program (TrainerConfig.vmap_seeds)
    bn_batch: int | None = None  # images per BatchNorm statistics group (ModelSpec.bn_batch)


def synthetic_dataset(image_size: int, batch_size: int, batches: int = 4) -> Dataset:
    """Random uint8 images and labels shaped like CIFAR (no download needed)."""
    rng = np.random.default_rng(0)
    n = batch_size * batches
    x = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int32)
    return Dataset("synthetic", x, y, x.copy(), y.copy(), 10)


def peak_memory_bytes() -> dict:
    """Peak device memory where the backend reports it; the host's peak RSS always."""
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _timed(fn, repeats: int) -> list[float]:
    """Wall times of repeated calls, each synchronised with the device."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def run_case(
    case: BenchCase,
    steps: int = 10,
    repeats: int = 3,
    compile_only: bool = False,
    rounds: int = 1,
    after_round: Callable[[], object] | None = None,
) -> dict:
    """Compile time, steady-state training and evaluation images/s, memory, for one case.

    The training step is timed in `rounds` rounds of `repeats` timings; `after_round` runs
    after each (another framework's timing, alternating with this one). The step time is the
    median of all timings.
    """
    spec = ModelSpec(
        model=case.model,
        depth=case.depth,
        family=case.family,
        precision=case.precision,
        conv_impl=case.conv_impl,
        remat=case.remat,
        stage_loop=case.stage_loop,
        shortcut="A" if case.family == "cifar" else "B",
        bn_batch=case.bn_batch,
    )
    data = synthetic_dataset(case.image_size, case.batch_size)
    # An in-memory set of our own arrays (the npz mode), augmented as CIFAR is.
    data_cfg = DataConfig(name="npz", crop_padding=4, flip=True)
    trainer = TrainerConfig(
        iterations=PAPER_ITERATIONS,
        batch_size=case.batch_size,
        log_every=steps,
        eval_every=steps,
        checkpoint_every=steps,
        eval_batch_size=case.batch_size,
        step_loop=case.step_loop,
    )
    trainer = dataclasses.replace(trainer, vmap_seeds=case.vmap_seeds)
    run = set_up(RunConfig(spec, data_cfg, OptimConfig(), trainer), data, make_mesh())
    source, state = run.source, run.state
    chunk = run.program.compiled_repeat(state, source.train_data, steps)
    base = {
        **dataclasses.asdict(case),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": len(jax.devices()),
        "params": run.param_count,
        "compile_s": run.program.compile_s,
    }
    if compile_only:
        return {**base, **peak_memory_bytes()}

    def train_once():
        nonlocal state
        state, metrics = chunk(state, source.train_data)
        return metrics

    train_once()  # first call pays allocation and autotuning
    train_times = []
    for _ in range(rounds):
        train_times += _timed(train_once, repeats)
        if after_round is not None:
            after_round()

    def evaluate():
        return source.evaluate(run.program, state, "test")

    evaluate()
    eval_times = _timed(evaluate, repeats)
    step_s = float(np.median(train_times)) / steps
    seeds = case.vmap_seeds
    return {
        **base,
        "step_s": step_s,
        # Images of all seeds together: k seeds in one program do k times the work per step.
        "train_images_per_sec": case.batch_size * seeds / step_s,
        "eval_images_per_sec": len(data.x_test) * seeds / float(np.median(eval_times)),
        "paper_run_estimate_min": PAPER_ITERATIONS * step_s / 60,
        # One CIFAR-10 epoch per seed.
        "cifar10_epoch_s": CIFAR10_TRAIN_IMAGES / case.batch_size * step_s,
        **peak_memory_bytes(),
    }


def input_row(
    dataset: str,
    data_dir: str | None,
    batch_size: int,
    image_size: int,
    augmentation: str,
    batches: int,
) -> dict:
    """Images/s the streaming input pipeline delivers on this host (decode + augment)."""
    from resnet_flax.data.stream import measure_input_throughput, open_stream

    stream = StreamConfig(image_size=image_size, augmentation=augmentation)
    cfg = DataConfig(name=dataset, data_dir=data_dir, stream=stream)
    stream = open_stream(cfg, batch_size, batch_size, seed=0)
    return {
        "framework": f"input pipeline ({augmentation})",
        "model": dataset,
        "batch_size": batch_size,
        "image_size": image_size,
        "host_cpus": os.cpu_count(),
        "input_images_per_sec": measure_input_throughput(stream, batches),
        **peak_memory_bytes(),
    }


def preset_estimate_h(rows: list[dict], jobs: list[tuple[str, int]], iterations: int) -> float:
    """Hours to train every (model, depth) job for `iterations` steps, one after another.

    Each job takes its measured step time and compile time from the row of the same model
    and depth (the first one, if several batch sizes or settings were measured).
    """
    total = 0.0
    for model, depth in jobs:
        row = next(r for r in rows if r["model"] == model and r["depth"] == depth)
        total += iterations * row["step_s"] + row["compile_s"]
    return total / 3600


def markdown_table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    cols = [
        ("framework", "framework"),
        ("model", "model"),
        ("depth", "depth"),
        ("batch_size", "batch"),
        ("precision", "precision"),
        ("conv_impl", "conv"),
        ("stage_loop", "stages"),
        ("step_loop", "steps"),
        ("vmap_seeds", "seeds"),
        ("bn_batch", "BN batch"),
        ("device_count", "devices"),
        ("compile_s", "compile s"),
        ("step_s", "step s"),
        ("train_images_per_sec", "train img/s"),
        ("input_images_per_sec", "input img/s"),
        ("eval_images_per_sec", "eval img/s"),
        ("cifar10_epoch_s", "CIFAR-10 epoch s"),
        ("paper_run_estimate_min", "64k-iter run, min"),
        ("device_peak_bytes", "device peak MiB"),
        ("host_peak_rss_bytes", "host peak RSS MiB"),
    ]

    def fmt(key, value):
        if value is None:
            return "-"
        if key.endswith("_bytes"):
            return f"{value / 2**20:,.0f}"
        if isinstance(value, float):
            return f"{value:,.3f}" if value < 10 else f"{value:,.0f}"
        return str(value)

    lines = [
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt(k, row.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)
