"""The recipe: schedules in iterations, the ResNet-110 warm-up, weight decay on weights only."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from resnet_flax.models.resnet import build_model
from resnet_flax.models.spec import ModelSpec
from resnet_flax.training.config import ConfigError
from resnet_flax.training.optim import (
    OptimConfig,
    OptimStructure,
    base_lr,
    hyperparameters,
    learning_rate,
    make_optimizer,
    make_schedule,
    weight_decay_mask,
    zero_state,
)


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
    def lr(cfg: OptimConfig, step: int, warm_done: bool) -> float:
        hp = hyperparameters(cfg, 64_000)
        return float(learning_rate(OptimStructure.of(cfg), hp, jnp.int32(step), warm_done))

    cfg = OptimConfig(warmup_lr=0.01, warmup_until_error=0.8)
    assert lr(cfg, 5, jnp.bool_(False)) == pytest.approx(0.01)
    assert lr(cfg, 5, jnp.bool_(True)) == pytest.approx(0.1)
    fixed = OptimConfig(warmup_lr=0.01, warmup_iterations=400)
    assert lr(fixed, 399, jnp.bool_(False)) == pytest.approx(0.01)
    assert lr(fixed, 400, jnp.bool_(False)) == pytest.approx(0.1)


def test_cosine_ends_at_zero():
    s = make_schedule(OptimConfig(schedule="cosine", linear_warmup_iterations=10), 100)
    assert float(s(10)) == pytest.approx(0.1) and float(s(100)) == pytest.approx(0.0)


def test_weight_decay_applies_to_kernels_only():
    params = nnx.state(build_model(ModelSpec(depth=8)), nnx.Param)
    mask = nnx.to_pure_dict(weight_decay_mask(params))
    assert mask["stem"]["conv"]["kernel"] and not mask["stem"]["bn"]["scale"]
    assert mask["head"]["kernel"] and not mask["head"]["bias"]


def optax_schedule(cfg: OptimConfig, total: int) -> optax.Schedule:
    """The schedule as optax's own factories build it from Python numbers (the reference)."""
    warm = cfg.linear_warmup_iterations
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, max(total, warm + 1), 0.0)
    if cfg.schedule == "constant":
        base = optax.constant_schedule(cfg.lr)
    else:  # join_schedules restarts the count after the warm-up: shift the drops back
        drops = {b - max(warm, 0): cfg.decay_factor for b in cfg.boundaries}
        base = optax.piecewise_constant_schedule(cfg.lr, drops)
    if warm <= 0:
        return base
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), base], [warm])


@pytest.mark.parametrize(
    ("cfg", "total"),
    [
        (OptimConfig(), 64_000),
        (OptimConfig(lr=0.3, decay_factor=0.2, boundaries=(7, 3, 7, 12)), 20),
        (OptimConfig(linear_warmup_iterations=20, boundaries=(80, 90)), 100),
        (OptimConfig(schedule="constant", boundaries=(), linear_warmup_iterations=22), 110),
        (OptimConfig(schedule="cosine", lr=0.05, linear_warmup_iterations=7), 333),
        (OptimConfig(schedule="cosine", lr=0.37), 90),
    ],
)
def test_schedule_over_arrays_is_optax_schedule_bit_for_bit(cfg, total):
    # Fails when a drop, the warm-up's end or the cosine's length is off by one iteration,
    # a number is read from the wrong key, or a formula changes rounding (the demo's
    # results would no longer reproduce). Both compiled, as the step is.
    steps = np.unique(np.r_[np.arange(min(total, 130)), np.linspace(0, total + 9, 100)])
    steps = jnp.asarray(steps, jnp.int32)
    reference = jax.jit(jax.vmap(lambda i: jnp.float32(optax_schedule(cfg, total)(i))))
    structure = OptimStructure.of(cfg)
    ours = jax.jit(jax.vmap(lambda i, hp: base_lr(structure, hp, i), in_axes=(0, None)))
    np.testing.assert_array_equal(ours(steps, hyperparameters(cfg, total)), reference(steps))
    # The scalar program the training step compiles rounds differently from the vector one.
    one_ours = jax.jit(lambda i, hp: learning_rate(structure, hp, i, jnp.bool_(True)))
    one_reference = jax.jit(lambda i: jnp.float32(optax_schedule(cfg, total)(i)))
    hp = hyperparameters(cfg, total)
    got = [one_ours(i, hp) for i in steps]
    np.testing.assert_array_equal(np.array(got), np.array([one_reference(i) for i in steps]))


def test_optimizer_state_made_on_the_host_is_optax_init():
    # Fails when the state made on the host differs from optax's own init (its structure, a
    # dtype, or a start that is not zero), which checkpoints and the step rely on.
    params = nnx.state(build_model(ModelSpec(depth=8)), nnx.Param)
    for cfg in (OptimConfig(), OptimConfig(decay_all=True, nesterov=True)):
        tx = make_optimizer(cfg)
        want, got = tx.init(params), zero_state(tx, params)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.dtype == b.dtype and isinstance(a, jax.Array)
            np.testing.assert_array_equal(a, b)
