"""Split the host CPU into one single-threaded XLA device per core, for data parallelism."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import jax

log = logging.getLogger(__name__)

# One XLA:CPU program leaves a core idle in ops that do not parallelise internally; one
# single-threaded device per core keeps every core busy, with the same math (batch sharded).
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_SINGLE_THREAD_FLAG = "--xla_cpu_multi_thread_eigen=false"


class CpuDevicesError(ValueError):
    """A CPU device count that cannot be used."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which respects cgroup pinning)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity mask
        return os.cpu_count() or 1


def pin_cores(count: int) -> list[int]:
    """Restrict this process and the processes it starts to the first `count` usable cores.

    For measurements per core (JAX and PyTorch on the same core budget). Returns the cores
    kept. Raises CpuDevicesError, before anything runs, for a count outside 1..usable cores.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        raise CpuDevicesError("pinning to cores needs os.sched_setaffinity (Linux)")
    if not 1 <= count <= len(cores):
        raise CpuDevicesError(
            f"cores must be between 1 and the {len(cores)} usable cores of this machine; "
            f"got {count}"
        )
    os.sched_setaffinity(0, cores[:count])
    return cores[:count]


def cpu_device_count(
    requested: int | str, batch_sizes: Iterable[int], cores: int | None = None
) -> int:
    """How many CPU devices to create: an explicit count, or 'auto'.

    'auto' is the largest count not above `cores` (default: the usable cores) that divides
    every batch size (the global batch is split evenly over the devices).
    """
    sizes = [int(b) for b in batch_sizes]
    if requested == "auto":
        limit = cores or usable_cores()
        return max(d for d in range(1, limit + 1) if all(b % d == 0 for b in sizes))
    try:
        count = int(requested)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise CpuDevicesError(
            f"cpu_devices must be 'auto' or a positive integer; got {requested!r}"
        )
    bad = [b for b in sizes if b % count]
    if bad:
        raise CpuDevicesError(
            f"cpu_devices={count} does not divide the batch size {bad[0]}: choose a divisor "
            f"of it, or cpu_devices=auto"
        )
    return count


def jax_backend_started() -> bool:
    """Whether JAX has started a backend in this process (a forked child could not use it)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # assume started: the safe answer
        return True
    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: True)())


def use_cpu_devices(count: int, single_threaded: bool = False) -> bool:
    """Create `count` CPU devices, each single-threaded, before JAX runs anything.

    Returns whether the process has the `count` > 1 devices. Changes nothing when `count`
    is 1 (unless `single_threaded`: one device on one thread, for a job that shares the
    machine with others) or when XLA_FLAGS already sets a host device count (e.g. the 8
    simulated devices of the sharding tests). GPU and TPU runs are unaffected: their
    devices stay the default ones. In a process where JAX has already started (several jobs
    of one Hydra sweep in one process) the devices it has are kept and a different request
    is logged.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG in flags:
        return False
    if count > 1 and jax.config.jax_num_cpu_devices != count:
        try:
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError:  # the backend already started with another count
            log.warning(
                "JAX already runs with %d CPU devices in this process; cpu_devices=%d is ignored",
                len(jax.devices("cpu")),
                count,
            )
            return False
    if count > 1 or single_threaded:
        _single_thread(flags)
    return count > 1


def _single_thread(flags: str) -> None:
    """Run each CPU device's program on one thread (XLA reads XLA_FLAGS when it starts)."""
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_SINGLE_THREAD_FLAG}".strip()
