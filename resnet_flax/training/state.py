"""The training state: its keys, initial values, and the stacking of a seed group."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_flax.models.resnet import build_model
from resnet_flax.models.spec import ModelSpec
from resnet_flax.training.optim import zero_state

# The training state; every entry but the shared step count gets a leading seed axis when
# several seeds train as one program (TrainerConfig.vmap_seeds).
STATE_KEYS = ("params", "batch_stats", "opt_state", "step", "warm_done", "order", "key")
SEED_AXES = {k: (None if k == "step" else 0) for k in STATE_KEYS}


def stack_trees(trees: list) -> object:
    """Pytrees of one structure stacked leaf by leaf on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def initial_state(spec: ModelSpec, seed: int, tx, n_train: int) -> tuple[object, dict]:
    """Model definition and the initial training state (parameters drawn from seed).

    This is also the restore template of a checkpoint, so analysis builds it the same way.
    """
    model = build_model(spec, seed=seed)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": zero_state(tx, params),
        "step": jnp.int32(0),
        "warm_done": jnp.bool_(False),
        "order": jnp.zeros((n_train,), jnp.int32),  # the epoch's data order, set at step 0
        # Data order and augmentation keys derive from this, so seeds can be vmapped.
        "key": jax.random.PRNGKey(seed),
    }
    return graphdef, state


def stack_seeds(states: list[dict]) -> dict:
    """Per-seed states stacked on a leading axis (the step count stays shared)."""
    return {
        k: states[0][k] if SEED_AXES[k] is None else stack_trees([s[k] for s in states])
        for k in STATE_KEYS
    }


def seed_state(state: dict, index: int) -> dict:
    """One seed's state out of a stacked state."""
    return {
        k: v if SEED_AXES[k] is None else jax.tree.map(lambda a: a[index], v)
        for k, v in state.items()
    }
