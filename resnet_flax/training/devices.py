"""Which devices a job uses: GPUs counted and pinned before JAX starts, CPU cores split."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from resnet_flax.training.cpu_devices import usable_cores

# The GPU lock this process holds for its lifetime (one GPU per worker); the OS frees it on exit.
_gpu_lock: tuple[int, int] | None = None


def gpu_count() -> int:
    """GPUs this process may use, counted without initialising JAX (0 on a CPU-only host)."""
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def visible_gpu_count() -> int:
    """GPUs this process may use, at least 1 (the multi_gpu launcher's job count)."""
    return max(1, gpu_count())


def cpu_sweep_jobs() -> int:
    """Jobs a CPU sweep runs at once: one per usable core; 1 where a GPU would be shared."""
    return 1 if gpu_count() else usable_cores()


def pin_gpu(job_num: int, lock_dir: Path) -> int | None:
    """Make this process see one GPU: prefer job_num % GPUs, skip GPUs other workers hold.

    Must run before JAX initialises its backend. A worker process that already holds a GPU
    (joblib reuses workers) keeps it. Returns the physical GPU index.
    """
    global _gpu_lock
    if _gpu_lock is not None:
        return _gpu_lock[0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    count = len(ids) if ids else visible_gpu_count()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    lock_dir.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        index = (job_num + k) % count
        fd = os.open(lock_dir / f"gpu{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _gpu_lock = (index, fd)
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if ids else str(index)
        return index
    # More workers than GPUs (n_jobs raised by hand): share, as job_num % count says.
    index = job_num % count
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if ids else str(index)
    return index
