"""The recipe: schedules in iterations, the ResNet-110 warm-up, weight decay on weights only."""

import dataclasses
import json

import jax.numpy as jnp
import pytest
from flax import nnx

from resnet_flax.models.resnet import build_model
from resnet_flax.models.spec import ModelSpec
from resnet_flax.training.config import ConfigError
from resnet_flax.training.optim import OptimConfig, learning_rate, make_schedule, weight_decay_mask


def test_boundaries_from_yaml_or_json_are_the_same_recipe():
    # Fails when a list from run_config.json builds a config unequal to the tuple one.
    cfg = OptimConfig(lr=0.05, boundaries=(100, 200), warmup_lr=0.01)
    assert OptimConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    assert OptimConfig(boundaries=[1.0, "2"]).boundaries == (1, 2)
    assert OptimConfig(schedule="cosine", boundaries=None).boundaries == ()
    with pytest.raises(ConfigError, match="optim.schedule must be one of multistep"):
        OptimConfig(schedule="linear")


def test_paper_schedule_divides_by_ten_at_32k_and_48k():
    s = make_schedule(OptimConfig(), 64_000)
    assert [float(s(i)) for i in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_linear_warmup_keeps_the_drops_where_configured():
    s = make_schedule(OptimConfig(linear_warmup_iterations=20, boundaries=(80, 90)), 100)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(0.05)
    assert float(s(79)) == pytest.approx(0.1) and float(s(80)) == pytest.approx(0.01)
    assert float(s(90)) == pytest.approx(0.001)


def test_resnet110_warmup_until_training_error_below_80_percent():
    cfg = OptimConfig(warmup_lr=0.01, warmup_until_error=0.8)
    s = make_schedule(cfg, 64_000)
    assert float(learning_rate(cfg, s, jnp.int32(5), jnp.bool_(False))) == pytest.approx(0.01)
    assert float(learning_rate(cfg, s, jnp.int32(5), jnp.bool_(True))) == pytest.approx(0.1)
    fixed = OptimConfig(warmup_lr=0.01, warmup_iterations=400)
    assert float(learning_rate(fixed, s, jnp.int32(399), jnp.bool_(False))) == pytest.approx(0.01)
    assert float(learning_rate(fixed, s, jnp.int32(400), jnp.bool_(False))) == pytest.approx(0.1)


def test_cosine_ends_at_zero():
    s = make_schedule(OptimConfig(schedule="cosine", linear_warmup_iterations=10), 100)
    assert float(s(10)) == pytest.approx(0.1) and float(s(100)) == pytest.approx(0.0)


def test_weight_decay_applies_to_kernels_only():
    params = nnx.state(build_model(ModelSpec(depth=8)), nnx.Param)
    mask = nnx.to_pure_dict(weight_decay_mask(params))
    assert mask["stem"]["conv"]["kernel"] and not mask["stem"]["bn"]["scale"]
    assert mask["head"]["kernel"] and not mask["head"]["bias"]
