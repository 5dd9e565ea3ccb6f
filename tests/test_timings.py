"""The phase timings a run records in summary.json (resnet_flax.training.timings)."""

import json
import time

import jax
import jax.numpy as jnp
import pytest
from jax import monitoring

from resnet_flax.data.memory import DataConfig
from resnet_flax.models.spec import ModelSpec
from resnet_flax.training import timings
from resnet_flax.training.config import RunInfo, TrainerConfig
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig
from resnet_flax.training.timings import PHASES, Timings, outermost

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def test_nested_and_overlapping_compile_spans_count_once():
    spans = [
        (0.0, 10.0, "outer"),
        (2.0, 5.0, "inner"),  # a jit traced inside the outer one's trace
        (12.0, 14.0, "b"),
        (13.0, 16.0, "c"),  # overlaps b (another thread): only 14..16 is new
    ]
    kept = outermost(spans)
    assert [name for _, _, name in kept] == ["outer", "b", "c"]
    assert sum(end - start for start, end, _ in kept) == pytest.approx(14.0)


def test_a_phase_takes_its_compilation_apart():
    clock = Timings()
    t0 = time.perf_counter()
    with clock.phase("train"):
        time.sleep(0.1)  # the phase's own work
        a = time.time()
        time.sleep(0.1)  # a compilation, as JAX reports one
        monitoring.record_event_time_span(BACKEND_COMPILE, a, time.time(), fun_name="jit(step)")
    elapsed = time.perf_counter() - t0
    # after the phase, JAX's events are no longer this clock's
    monitoring.record_event_time_span(BACKEND_COMPILE, 0.0, 50.0, fun_name="jit(step)")
    record = clock.record()
    compiled = record["compile_s"]["train"]
    assert compiled == pytest.approx(0.1, abs=0.05) and record["programs"] == {
        "step": round(compiled, 3)
    }
    assert record["train_s"] == pytest.approx(elapsed - compiled, abs=1e-3)
    assert set(record["compile_s"]) == set(PHASES) and record["eval_s"] == 0.0


def test_jax_reports_a_real_compilation_to_the_phase():
    def doubled_plus_one(x):
        return 2 * x + 1

    clock = Timings()
    with clock.phase("eval"):
        jax.block_until_ready(jax.jit(doubled_plus_one)(jnp.arange(3.0)))
    record = clock.record()
    assert record["compile_s"]["eval"] > 0 and record["programs"]["doubled_plus_one"] > 0


def test_a_misspelt_phase_fails():
    with pytest.raises(ValueError, match="phase must be one of"), Timings().phase("evaluation"):
        pass


def test_start_up_of_a_reused_process_begins_at_its_previous_run(monkeypatch):
    monkeypatch.setattr(timings, "_last_run_end", None)
    first = Timings()
    assert not first.reused_process and first.startup_s > 0  # since this process started
    first.record()
    time.sleep(0.05)
    second = Timings()
    assert second.reused_process and 0.05 <= second.startup_s < first.startup_s


def train_digits(run_dir):
    """A tiny digits run through train(); its summary."""
    from resnet_flax.training.loop import train

    trainer = TrainerConfig(
        iterations=10, batch_size=32, log_every=5, eval_every=5, checkpoint_every=10, progress=False
    )
    data = DataConfig(name="digits", crop_padding=0, flip=False)
    spec = ModelSpec(model="residual", depth=8)
    return train(run_dir, RunConfig(spec, data, OptimConfig(lr=0.05), trainer, RunInfo("t", 0)))


def test_a_run_records_its_phases_in_its_summary(tmp_path):
    summary = train_digits(tmp_path)
    record = json.loads((tmp_path / "summary.json").read_text())["timings"]
    assert record == summary["timings"]
    assert all(record[f"{p}_s"] >= 0 for p in PHASES) and record["train_s"] > 0
    assert record["eval_s"] > 0 and record["checkpoint_s"] > 0 and record["set_up_s"] > 0
    # The training step's compilation, seen through JAX's events, is what the Program class
    # timed around its own lower().compile() calls.
    train_compile = record["compile_s"]["train"]
    assert train_compile == pytest.approx(summary["compile_time_s"], rel=0.1, abs=0.2)
    assert record["compile_s"]["eval"] > 0 and record["compile_s"]["set_up"] > 0
    cache = summary["compile_cache"]  # the persistent compilation cache, counted once
    assert cache["hits"] + cache["misses"] > 0 and "cache_hits" not in record
    parts = sum(record[f"{p}_s"] for p in PHASES) + sum(record["compile_s"].values())
    # total_s spans the whole call; wall_time_s starts after the set-up
    assert parts <= record["total_s"] and summary["wall_time_s"] < record["total_s"]
    assert record["ended_at"] - record["started_at"] == pytest.approx(record["total_s"], abs=0.1)
