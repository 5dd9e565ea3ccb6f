"""The compiled step equals SGD with momentum, kernel-only L2 decay and the lr schedule by hand."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from resnet_flax.data import augment as aug
from resnet_flax.data.memory import DataConfig, Dataset, load_dataset
from resnet_flax.models.spec import ModelSpec
from resnet_flax.training.config import RunInfo, TrainerConfig
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig
from resnet_flax.training.runtime import make_mesh
from resnet_flax.training.setup import Setup, set_up

TINY = ModelSpec(model="residual", depth=8)
DIGITS = DataConfig(name="digits", crop_padding=0, flip=False)
BATCH = 32
STEPS = 3
# lr 0, 0.1/3, 0.2/3 at steps 0, 1, 2: a step that reads the schedule one step early or
# late moves by a different amount; the drop at 100 is never reached.
WARM = OptimConfig(
    lr=0.1, momentum=0.9, weight_decay=0.01, linear_warmup_iterations=3, boundaries=(100,)
)
LR_AT = [0.0, 0.1 / 3, 0.2 / 3]
SHORT = TrainerConfig(
    iterations=STEPS, batch_size=BATCH, log_every=1, eval_every=1, checkpoint_every=1
)


@pytest.fixture(scope="module")
def one_batch_digits() -> Dataset:
    """Digits cut to one batch of training images: every step's batch is the whole set.

    The loss and gradient of a full batch do not depend on its order, so the hand-computed
    step needs no knowledge of how the program shuffles.
    """
    data = load_dataset(DIGITS)
    return dataclasses.replace(data, x_train=data.x_train[:BATCH], y_train=data.y_train[:BATCH])


def host(tree) -> dict:
    """A pytree (nnx.State or dict) as a nested dict of numpy arrays, safe from donation."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return jax.tree.map(np.array, jax.device_get(tree))


def as_params(template: nnx.State, pure: dict) -> nnx.State:
    """The parameter State of `template`'s structure holding the arrays of `pure`."""
    state = jax.tree.map(np.array, template)
    nnx.replace_by_pure_dict(state, pure)
    return state


def hand_gradient(run: Setup, data: Dataset) -> Callable:
    """(params, batch_stats) -> (loss, gradient dict) of the whole training set, BN training."""
    mean, std = (np.asarray(s) for s in run.source.stats[:2])
    x = aug.normalize(data.x_train, mean, std)

    @jax.jit
    def loss_and_grad(params: nnx.State, batch_stats) -> tuple:
        def loss_fn(p: nnx.State) -> jax.Array:
            logits = nnx.merge(run.graphdef, p, batch_stats, copy=True)(x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, data.y_train).mean()

        return jax.value_and_grad(loss_fn)(params)

    def gradient(params: nnx.State, batch_stats) -> tuple[float, dict]:
        loss, grads = loss_and_grad(params, batch_stats)
        return float(loss), host(grads)

    return gradient


def decayed(path: tuple, decay_all: bool) -> bool:
    """The recipe's rule: L2 decay on conv and dense kernels (on everything with decay_all)."""
    return decay_all or "kernel" in jax.tree_util.keystr(path)


def sgd_momentum(params: dict, trace: dict, grads: dict, lr: float, optim: OptimConfig) -> tuple:
    """PyTorch's SGD: v = momentum * v + (g + wd * w on decayed leaves); w' = w - lr * v."""

    def velocity(path, w, v, g):
        decay = optim.weight_decay * w if decayed(path, optim.decay_all) else 0.0
        return optim.momentum * v + g + decay

    new_trace = jax.tree_util.tree_map_with_path(velocity, params, trace, grads)
    new_params = jax.tree.map(lambda w, v: w - lr * v, params, new_trace)
    return new_params, new_trace


def program_step(run: Setup, state: dict) -> tuple[dict, dict]:
    """One step of the run's compiled training program on its device-resident data."""
    return run.program.train_step(state, run.source.train_data, run.program.hparams)


def shifted_params(run: Setup) -> dict:
    """The run's initial parameters with every non-kernel one moved by 0.5.

    BN shifts and the dense bias start at 0, where weight decay is invisible; at 0.5 (and
    BN scales at 1.5) decay on them changes the update by wd * w.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, w: w if decayed(path, False) else w + 0.5, host(run.state["params"])
    )


def max_difference(actual: dict, expected: dict) -> tuple[float, str]:
    """The largest absolute leaf difference and the leaf where it is."""
    worst = (0.0, "")
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
    ):
        worst = max(worst, (float(np.max(np.abs(a - b))), jax.tree_util.keystr(path)))
    return worst


def test_three_steps_equal_hand_computed_sgd_with_momentum_decay_and_warmup(one_batch_digits):
    # Fails when the update's sign flips, momentum is dropped, decay reaches a BN scale or
    # shift or the dense bias, or the lr is read one step early or late (0 at step 0).
    run = set_up(RunConfig(TINY, DIGITS, WARM, SHORT), one_batch_digits, make_mesh())
    params = shifted_params(run)
    template = jax.tree.map(np.array, run.state["params"])  # the program donates its state
    state = {**run.state, "params": as_params(template, params)}
    gradient = hand_gradient(run, one_batch_digits)
    trace = jax.tree.map(np.zeros_like, params)
    for i in range(STEPS):
        batch_stats = jax.tree.map(np.array, state["batch_stats"])
        loss, grads = gradient(as_params(template, params), batch_stats)
        params, trace = sgd_momentum(params, trace, grads, LR_AT[i], WARM)
        state, metrics = program_step(run, state)
        # The smallest rule change (decay on a 0.5 shift at lr 0.1/3) moves a parameter
        # by 1.7e-4; float32 rounding of the same gradient stays below 1e-6.
        diff, where = max_difference(host(state["params"]), params)
        assert diff < 2e-6, f"step {i}: params differ by {diff:.2e} at {where}"
        diff, where = max_difference(host(state["opt_state"][1].trace), trace)
        assert diff < 2e-5, f"step {i}: momentum differs by {diff:.2e} at {where}"
        assert int(state["step"]) == i + 1
        assert float(metrics["lr"]) == pytest.approx(LR_AT[i], abs=1e-7)
        assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)


def test_decay_all_also_decays_bn_and_biases(one_batch_digits):
    # Fails when decay_all is ignored (only kernels decayed) or decay misses some parameter.
    optim = OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.1, decay_all=True)
    cfg = RunConfig(TINY, DIGITS, optim, SHORT, RunInfo(seed=1))
    run = set_up(cfg, one_batch_digits, make_mesh())
    shifted = shifted_params(run)
    state = {**run.state, "params": as_params(run.state["params"], shifted)}
    batch_stats = jax.tree.map(np.array, state["batch_stats"])
    _, grads = hand_gradient(run, one_batch_digits)(state["params"], batch_stats)
    new_state, _ = program_step(run, state)
    # With an empty momentum trace, w - w' = lr * (g + decay): the decay the program applied.
    applied = jax.tree.map(
        lambda w, w1, g: (w - w1) / optim.lr - g, shifted, host(new_state["params"]), grads
    )
    kinds = {"kernel": 0, "scale": 0, "bias": 0}
    for (path, leaf), w in zip(
        jax.tree_util.tree_leaves_with_path(applied), jax.tree.leaves(shifted), strict=True
    ):
        # wd * w is 0.05 on the shifted parameters: 1e-4 is float32 noise divided by lr
        np.testing.assert_allclose(leaf, optim.weight_decay * w, atol=1e-4, err_msg=str(path))
        kinds[path[-1].key] += 1
    # every BN scale and shift and the dense bias was checked, not only kernels
    assert kinds == {"kernel": 8, "scale": 7, "bias": 8}
