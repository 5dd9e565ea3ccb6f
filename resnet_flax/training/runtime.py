"""Where a run executes: the device mesh, multi-host start-up, the compilation cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# --- host side --------------------------------------------------------------------------------


def make_mesh() -> Mesh:
    """A 1-D data-parallel mesh over every device of every process."""
    return Mesh(np.array(jax.devices()), ("data",))


def put_replicated(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """Copy a host array to every device (works on one host and on several)."""
    sharding = NamedSharding(mesh, P())
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def maybe_initialize_distributed() -> None:
    """Join a multi-host job before touching devices: SLURM's, or an explicit coordinator.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID; under a cluster JAX detects (SLURM, Open MPI) the last two may be left out.
    """
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        # JAX reads only the address from the environment; outside a detected cluster it
        # needs the process count and index as arguments.
        count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(
            address, int(count) if count else None, int(index) if index else None
        )
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def process_index_from_env() -> int:
    """This process's index in a multi-host job, read from the environment before JAX starts
    (the variables maybe_initialize_distributed joins by); 0 in a single-process job.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return int(os.environ.get("JAX_PROCESS_ID") or os.environ.get("SLURM_PROCID") or 0)
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def enable_compilation_cache(path: str | None) -> None:
    """Persist compiled programs so reruns of the same shapes skip compilation.

    Every program, however quick to compile: the parameter-drawing programs (~0.1 s each)
    are shared by every network of a family, and reading one back is quicker still.
    """
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
