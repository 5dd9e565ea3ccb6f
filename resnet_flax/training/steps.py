"""The compiled functions: the pure training and evaluation steps and their jit, scan, vmap."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax.data import augment as aug
from resnet_flax.training.config import TrainerConfig, resolve_loop
from resnet_flax.training.optim import OptimConfig, apply_lr, learning_rate
from resnet_flax.training.state import SEED_AXES, stack_trees

# --- the pure functions that are compiled ---------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclass(frozen=True)
class Compiled:
    """The jitted training steps (one, or a scanned chunk) and the evaluation functions."""

    train_step: object
    train_chunk: object
    evaluate: object
    step_loop: str
    # The one compiled step behind every chunk length of the python loop.
    _compiled_step: dict = dataclasses.field(default_factory=dict)

    def compile_step(self, state, data):
        """The single training step (state, data) -> (state, metrics), compiled once."""
        if "step" not in self._compiled_step:
            self._compiled_step["step"] = self.train_step.lower(state, data).compile()
        return self._compiled_step["step"]

    def compile_chunk(self, length: int, state, data):
        """A callable (state, data) -> (state, per-step metrics) running `length` steps."""
        if self.step_loop == "scan":
            return self.train_chunk.lower(state, data, length).compile()
        step = self.compile_step(state, data)
        return lambda state, data: run_steps(step, state, itertools.repeat(data, length))


# Steps dispatched ahead of the running one. XLA:CPU launches each device's part of a
# multi-device program on a pool of as many threads as devices, and a launch blocks its
# thread once 32 programs are queued on a device, so an unbounded queue can leave no thread
# for the other half of an all-reduce: the run deadlocks (see docs/design.md).
MAX_STEPS_IN_FLIGHT = 2


def run_steps(step, state, inputs) -> tuple[dict, dict]:
    """Apply a compiled step once per input; per-step metrics stacked on a leading axis.

    At most MAX_STEPS_IN_FLIGHT steps wait behind the running one.
    """
    metrics = []
    for data in inputs:
        state, m = step(state, data)
        metrics.append(m)
        if len(metrics) > MAX_STEPS_IN_FLIGHT:
            jax.block_until_ready(metrics[-1 - MAX_STEPS_IN_FLIGHT])
    return state, stack_trees(metrics)


def build_functions(
    graphdef,
    layout: dict,
    optim: OptimConfig,
    schedule,
    tx,
    trainer: TrainerConfig,
    mesh: Mesh,
    num_seeds: int = 1,
) -> Compiled:
    """Close the model, recipe and data layout into the jitted functions.

    layout["streaming"] says where a batch comes from: False, the step gathers it from
    the device-resident training set (and augments it there); True, the step receives a
    host-augmented uint8 batch. With num_seeds > 1 the state holds that many seeds
    stacked on a leading axis and every function is vmapped over it (one program).
    """
    batch_sharding = NamedSharding(mesh, P("data"))
    batch = trainer.batch_size
    streaming = layout["streaming"]
    steps_per_epoch, n_train = layout["steps_per_epoch"], layout["n_train"]
    padding, flip = layout.get("crop_padding", 0), layout.get("flip", False)

    def forward(params, batch_stats, x, train):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        logits = model(x, train=train)
        return logits, nnx.state(model, nnx.BatchStat)

    def update(state, x, y):
        """One SGD step on a normalised, augmented batch: the part every data source shares."""
        i = state["step"]

        def loss_fn(params):
            logits, new_stats = forward(params, state["batch_stats"], x, True)
            return cross_entropy(logits, y), (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        error = jnp.mean(jnp.argmax(logits, -1) != y)
        lr = learning_rate(optim, schedule, i, state["warm_done"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], apply_lr(updates, lr))
        warm_done = state["warm_done"]
        if optim.warmup_until_error is not None:
            warm_done = warm_done | (error < optim.warmup_until_error)
        new_state = {
            **state,
            "params": params,
            "batch_stats": new_stats,
            "opt_state": opt_state,
            "step": i + 1,
            "warm_done": warm_done,
        }
        return new_state, {"loss": loss, "error": error, "lr": lr}

    def memory_step(state, data):
        x_all, y_all, mean, std = data
        i = state["step"]
        epoch, pos = i // steps_per_epoch, i % steps_per_epoch
        order_key, augment_key = jax.random.split(jax.random.fold_in(state["key"], 1))
        # A fresh permutation at each epoch start, derived from (seed, epoch) alone, and
        # carried in the state in between (recomputing it every step cost ~27 ms on CPU).
        order = jax.lax.cond(
            pos == 0,
            lambda: jax.random.permutation(jax.random.fold_in(order_key, epoch), n_train),
            lambda: state["order"],
        )
        idx = jax.lax.dynamic_slice(order, (pos * batch,), (batch,))
        idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
        x = aug.normalize(x_all[idx], mean, std)
        x = aug.augment(jax.random.fold_in(augment_key, i), x, padding, flip)
        new_state, metrics = update(state, x, y_all[idx])
        return {**new_state, "order": order}, metrics

    def stream_step(state, data):
        x, y, mean, std = data
        return update(state, aug.normalize(x, mean, std), y)

    step = stream_step if streaming else memory_step
    if num_seeds > 1:
        # The data (and a streamed batch) is shared; parameters, statistics, optimizer state
        # and random keys are per seed. The step count is shared, so the epoch-start cond
        # stays a cond instead of becoming a select that permutes every step.
        step = jax.vmap(step, in_axes=(SEED_AXES, None), out_axes=(SEED_AXES, 0))

    @functools.partial(jax.jit, static_argnums=(2,), donate_argnums=(0,))
    def train_chunk(state, data, length):
        return jax.lax.scan(lambda s, _: step(s, data), state, length=length)

    train_step = jax.jit(step, donate_argnums=(0,))

    def eval_sums(params, batch_stats, x, y, valid, mean, std):
        """Summed loss and number of errors over the valid rows of one evaluation batch."""
        logits, _ = forward(params, batch_stats, aug.normalize(x, mean, std), False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        wrong = jnp.argmax(logits, -1) != y
        return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid & wrong)

    # One evaluation program for every split and data source: batches of a fixed shape come
    # from the host (evaluate_batches), so it compiles once per run. A scan over a whole
    # device-resident split compiled once per split size (test, train, val): one extra
    # forward compile per run, ~10 s of ResNet-56's 43 s in the digits demo.
    evaluate = eval_sums
    if num_seeds > 1:
        evaluate = jax.vmap(evaluate, in_axes=(0, 0) + (None,) * 5)
    return Compiled(train_step, train_chunk, jax.jit(evaluate), resolve_loop(trainer.step_loop))
