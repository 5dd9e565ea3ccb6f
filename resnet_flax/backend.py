"""The JAX backend this process computes on, asked in one place."""

from __future__ import annotations

import jax


def current_backend() -> str:
    """JAX's default backend ("cpu", "gpu" or "tpu"); starts the backend if it has not started."""
    return jax.default_backend()
