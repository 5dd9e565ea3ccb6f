"""Drawing a network's parameters without compiling a program per network.

Each initializer is a small compiled program per parameter shape, with the key as its
argument, so every depth, seed and model of a family shares the few programs its shapes
need (docs/performance.md). The stacked blocks of a stage get nnx.split_rngs' keys, split
and stacked on the host. The values are those of drawing the whole network in one
compiled program, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# A program that runs once: XLA's optimisations would only lengthen its compile.
RUN_ONCE = {"xla_backend_optimization_level": 0}


def traced(*values) -> bool:
    """Whether any value is a tracer (the network is built inside eval_shape or jit)."""
    return any(isinstance(v, jax.core.Tracer) for v in values)


class DrawnByShape:
    """An initializer run as one compiled program per (shape, dtype), the key its argument.

    Inside a transformation (eval_shape, jit) it is the initializer itself, traced inline.
    """

    def __init__(self, init: Callable):
        self.init = init
        self.program = jax.jit(init, static_argnums=(1, 2), compiler_options=RUN_ONCE)

    def __call__(self, key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
        return (self.init if traced(key) else self.program)(key, tuple(shape), dtype)


# He et al. 2015 initialise with N(0, 2/n), n = k*k*c_in (the fan-in).
he_normal = DrawnByShape(nnx.initializers.variance_scaling(2.0, "fan_in", "normal"))
# The classifier as in the paper's Torch code (PyTorch's Linear default: U(+-1/sqrt(fan_in))).
dense_init = DrawnByShape(nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"))


def split_key(key: jax.Array, count: int) -> list[jax.Array]:
    """jax.random.split(key, count) as a list, through programs shared by every count.

    Split keys do not depend on how many are split (threefry's counters are the positions),
    so the key is split into a power of two of at least 16 and cut on the host.
    """
    many = jax.random.split(key, max(16, 1 << (count - 1).bit_length()))
    rows = np.asarray(jax.random.key_data(many))[:count]
    return [jax.random.wrap_key_data(row, impl=jax.random.key_impl(key)) for row in rows]


def stack(*leaves) -> jax.Array:
    """Arrays stacked on a new leading axis on the host (no program per shape)."""
    return jax.device_put(np.stack([np.asarray(leaf) for leaf in leaves]))


def stacked_modules(make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs, count: int):
    """`count` modules from make(rngs) as one module of stacked parameters.

    Traced (eval_shape, jit), nnx.vmap builds them at once over nnx.split_rngs' keys.
    Drawn, each is built on its own from the same keys (the stream's next key split, every
    count from 0) and stacked on the host: no program the size of the stack.
    """
    if traced(rngs.default.key[...]):

        @nnx.split_rngs(splits=count)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs) -> nnx.Module:
            return make(rngs)

        return create(rngs)
    modules = [make(nnx.Rngs(key)) for key in split_key(rngs.default(), count)]
    states = [nnx.state(m) for m in modules]
    return nnx.merge(nnx.graphdef(modules[0]), jax.tree.map(stack, *states))
