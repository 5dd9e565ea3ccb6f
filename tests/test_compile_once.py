"""Runs that differ only in numbers (learning rate, decay, momentum, seed) share programs."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from resnet_flax.data.memory import DataConfig, Dataset, load_dataset
from resnet_flax.models.spec import ModelSpec
from resnet_flax.rundir import read_metrics
from resnet_flax.training.config import RunInfo, TrainerConfig
from resnet_flax.training.evaluate import array_eval_batches
from resnet_flax.training.loop import train
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig
from resnet_flax.training.runtime import make_mesh
from resnet_flax.training.setup import set_up

DIGITS = DataConfig(name="digits", crop_padding=0, flip=False)
QUICK = TrainerConfig(
    iterations=4, batch_size=32, log_every=2, eval_every=4, checkpoint_every=4, progress=False
)
FIRST = RunConfig(
    ModelSpec(model="residual", depth=8),
    DIGITS,
    OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4, boundaries=(3,), warmup_lr=0.01),
    QUICK,
    RunInfo(seed=0),
)
# Every number of the recipe changed (the schedule's too), its structure kept.
OTHER_NUMBERS = FIRST.replace(
    optim=OptimConfig(
        lr=0.37,
        momentum=0.5,
        weight_decay=3e-3,
        boundaries=(2,),
        decay_factor=0.2,
        warmup_lr=0.002,
        warmup_iterations=1,
    ),
    info=RunInfo(seed=5),
)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    """The bundled digits, loaded once."""
    return load_dataset(DIGITS)


def lowered_programs(cfg: RunConfig, data: Dataset) -> dict[str, str]:
    """The StableHLO text of a run's training step and evaluation program (nothing compiled)."""
    run = set_up(cfg, data, make_mesh())
    program, state, source = run.program, run.state, run.source
    x, y, valid = next(array_eval_batches(data.x_test, data.y_test, source.eval_batch_size))
    params, stats = state["params"], state["batch_stats"]
    return {
        "step": program.train_step.lower(state, source.train_data, program.hparams).as_text(),
        "evaluate": program.evaluate.lower(params, stats, x, y, valid, *source.stats).as_text(),
    }


def test_runs_differing_in_numbers_lower_to_the_same_programs(digits):
    # Fails when a hyperparameter or the seed is baked into a program as a constant: the
    # text then holds it, and a sweep over it compiles every program again.
    first = lowered_programs(FIRST, digits)
    assert lowered_programs(OTHER_NUMBERS, digits) == first
    # ... and the comparison sees a change of structure: another depth is another program.
    deeper = lowered_programs(FIRST.replace(model=ModelSpec(model="residual", depth=14)), digits)
    assert deeper["step"] != first["step"] and deeper["evaluate"] != first["evaluate"]


@pytest.fixture
def empty_cache(tmp_path: Path):
    """A fresh persistent compilation cache keeping every program, for one test."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def test_second_run_of_a_learning_rate_sweep_finds_every_program_cached(
    tmp_path, digits, empty_cache
):
    # Fails when a program of the second run (step, evaluation, initialisation) differs from
    # the first run's, or when summary.json stops recording the cache's events. The step and
    # evaluation are looked up by every run; the parameter-drawing programs only by the
    # first run of a process that needs them.
    first = train(tmp_path / "first", FIRST, digits)["compile_cache"]
    # An earlier test of this process may have compiled the same programs in memory already.
    assert first["lookups"] == first["hits"] + first["misses"]
    second = train(tmp_path / "second", OTHER_NUMBERS, digits)["compile_cache"]
    assert second["lookups"] >= 2, second
    assert second == {**second, "hits": second["lookups"], "misses": 0, "not_written": 0}
    # The cached program ran each run's numbers: lr after steps 2 and 4 (drop at 3, or 2).
    assert lr_curve(tmp_path / "first") == pytest.approx([0.1, 0.1 * 0.1])
    assert lr_curve(tmp_path / "second") == pytest.approx([0.37, 0.37 * 0.2])


def lr_curve(run_dir: Path) -> list[float]:
    """The learning rate of each logged training interval's last step."""
    return [m["lr"] for m in read_metrics(run_dir / "metrics.jsonl") if "lr" in m]
