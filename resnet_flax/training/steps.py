"""The compiled functions: pure training and evaluation steps, and the program that runs them."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax.data import augment as aug
from resnet_flax.training.optim import OptimStructure, apply_lr, learning_rate, sgd
from resnet_flax.training.state import stack_trees

# --- the pure functions that are compiled ---------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """What every training step's code applies: the network and the optimiser's structure.

    The optimiser's numbers are not here: they are the step's `hparams` argument
    (optim.hyperparameters), so programs differing only in them are one program.
    """

    graphdef: nnx.GraphDef
    optim: OptimStructure


@dataclass(frozen=True)
class MemoryLayout:
    """How a step draws its batch from the training set held on the devices."""

    batch_size: int
    steps_per_epoch: int
    n_train: int
    crop_padding: int
    flip: bool
    batch_sharding: NamedSharding


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def forward(graphdef, params, batch_stats, x: jax.Array, train: bool) -> tuple[jax.Array, object]:
    """Logits of the network and its BatchNorm statistics after the pass."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model(x, train=train)
    return logits, nnx.state(model, nnx.BatchStat)


def sgd_update(
    recipe: Recipe, state: dict, hparams: dict, x: jax.Array, y: jax.Array
) -> tuple[dict, dict]:
    """One SGD step on a normalised, augmented batch: the part every data source shares."""
    i = state["step"]

    def loss_fn(params):
        logits, new_stats = forward(recipe.graphdef, params, state["batch_stats"], x, True)
        return cross_entropy(logits, y), (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    error = jnp.mean(jnp.argmax(logits, -1) != y)
    lr = learning_rate(recipe.optim, hparams, i, state["warm_done"])
    tx = sgd(recipe.optim, hparams["momentum"], hparams["weight_decay"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], apply_lr(updates, lr))
    warm_done = state["warm_done"]
    if recipe.optim.warmup_on_error:
        warm_done = warm_done | (error < hparams["warmup_until_error"])
    new_state = {
        **state,
        "params": params,
        "batch_stats": new_stats,
        "opt_state": opt_state,
        "step": i + 1,
        "warm_done": warm_done,
    }
    return new_state, {"loss": loss, "error": error, "lr": lr}


def memory_train_step(
    recipe: Recipe, layout: MemoryLayout, state: dict, data: tuple, hparams: dict
) -> tuple[dict, dict]:
    """Gather the step's batch from the device-resident set, augment it there, update."""
    x_all, y_all, mean, std = data
    i = state["step"]
    epoch, pos = i // layout.steps_per_epoch, i % layout.steps_per_epoch
    order_key, augment_key = jax.random.split(jax.random.fold_in(state["key"], 1))
    # A fresh permutation at each epoch start, derived from (seed, epoch) alone, carried in
    # the state in between so that it is not recomputed every step.
    order = jax.lax.cond(
        pos == 0,
        lambda: jax.random.permutation(jax.random.fold_in(order_key, epoch), layout.n_train),
        lambda: state["order"],
    )
    batch = layout.batch_size
    idx = jax.lax.dynamic_slice(order, (pos * batch,), (batch,))
    idx = jax.lax.with_sharding_constraint(idx, layout.batch_sharding)
    x = aug.normalize(x_all[idx], mean, std)
    x = aug.augment(jax.random.fold_in(augment_key, i), x, layout.crop_padding, layout.flip)
    new_state, metrics = sgd_update(recipe, state, hparams, x, y_all[idx])
    # The state leaves replicated, as it came: with the batch the whole set, the slice above
    # is the identity and the batch's sharding would otherwise propagate back onto `order`.
    replicated = NamedSharding(layout.batch_sharding.mesh, P())
    new_state = jax.lax.with_sharding_constraint({**new_state, "order": order}, replicated)
    return new_state, metrics


def stream_train_step(recipe: Recipe, state: dict, data: tuple, hparams: dict) -> tuple[dict, dict]:
    """Update on a host-augmented uint8 batch (x, y, mean, std)."""
    x, y, mean, std = data
    return sgd_update(recipe, state, hparams, aug.normalize(x, mean, std), y)


def eval_sums(graphdef, params, batch_stats, x, y, valid, mean, std) -> tuple[jax.Array, jax.Array]:
    """Summed loss and number of errors over the valid rows of one evaluation batch."""
    logits, _ = forward(graphdef, params, batch_stats, aug.normalize(x, mean, std), False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    wrong = jnp.argmax(logits, -1) != y
    return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid & wrong)


def scan_steps(
    step: Callable, state: dict, data: tuple, hparams: dict, length: int
) -> tuple[dict, dict]:
    """`length` steps on the same data as one lax.scan; per-step metrics stacked."""
    return jax.lax.scan(lambda s, _: step(s, data, hparams), state, length=length)


# --- running them ---------------------------------------------------------------------------

# Steps dispatched ahead of the running one. XLA:CPU launches each device's part of a
# multi-device program on a pool of as many threads as devices, and a launch blocks its
# thread once 32 programs are queued on a device, so an unbounded queue can leave no thread
# for the other half of an all-reduce: the run deadlocks (see docs/design.md).
MAX_STEPS_IN_FLIGHT = 2


def run_steps(step: Callable, state: dict, inputs: Iterable, hparams: dict) -> tuple[dict, dict]:
    """Apply a compiled step once per input; per-step metrics stacked on a leading axis.

    At most MAX_STEPS_IN_FLIGHT steps wait behind the running one.
    """
    metrics = []
    for data in inputs:
        state, m = step(state, data, hparams)
        metrics.append(m)
        if len(metrics) > MAX_STEPS_IN_FLIGHT:
            jax.block_until_ready(metrics[-1 - MAX_STEPS_IN_FLIGHT])
    return state, stack_trees(metrics)


class Program:
    """A run's jitted step, scanned chunk and evaluation; each compiled once, on first use.

    `step` is a pure (state, data, hparams) -> (state, metrics) function and `evaluate` a
    pure eval_sums-like function, both already vectorised over a seed group where there is
    one. `hparams` (the recipe's numbers, on the devices) is every step's argument: a
    program is compiled for shapes and structure, never for a learning rate.
    `step_loop` is "scan" (one program per chunk length) or "python" (a loop over the step).
    `options` are XLA compiler options for all three (training.config.compiler_options).
    """

    def __init__(
        self,
        step: Callable,
        evaluate: Callable,
        hparams: dict,
        step_loop: str,
        options: dict | None = None,
    ):
        jit = functools.partial(jax.jit, compiler_options=options or None)
        self.train_step = jit(step, donate_argnums=(0,))
        self.train_chunk = jit(
            functools.partial(scan_steps, step), static_argnums=(3,), donate_argnums=(0,)
        )
        self.evaluate = jit(evaluate)
        self.hparams = hparams
        self.step_loop = step_loop
        self.compile_s = 0.0  # seconds spent compiling, kept out of the training time
        self._compiled: dict = {}

    def _compiled_program(self, key: object, lower: Callable[[], jax.stages.Lowered]):
        """The compiled program under `key`, compiling (and timing) it the first time."""
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = lower().compile()
            self.compile_s += time.perf_counter() - t0
        return self._compiled[key]

    def compiled_repeat(self, state: dict, data: tuple, length: int) -> Callable:
        """The compiled (state, data) -> (state, metrics) running `length` steps on `data`."""
        hparams = self.hparams
        if self.step_loop == "scan":
            lower = functools.partial(self.train_chunk.lower, state, data, hparams, length)
            chunk = self._compiled_program(("chunk", length), lower)
            return lambda state, data: chunk(state, data, hparams)
        step = self._compiled_step(state, data)
        return lambda state, data: run_steps(step, state, itertools.repeat(data, length), hparams)

    def repeat(self, state: dict, data: tuple, length: int) -> tuple[dict, dict]:
        """`length` steps whose data is the same device arrays every step."""
        return self.compiled_repeat(state, data, length)(state, data)

    def each(self, state: dict, inputs: Iterable) -> tuple[dict, dict]:
        """One step per input (fresh batches from the host)."""
        inputs = iter(inputs)
        first = next(inputs)  # the compiled step needs one batch's shapes
        step = self._compiled_step(state, first)
        return run_steps(step, state, itertools.chain([first], inputs), self.hparams)

    def _compiled_step(self, state: dict, data: tuple) -> Callable:
        """The compiled single step for states and data of these shapes."""
        lower = functools.partial(self.train_step.lower, state, data, self.hparams)
        return self._compiled_program("step", lower)
