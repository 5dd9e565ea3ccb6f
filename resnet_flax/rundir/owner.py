"""One owner per run directory: an OS lock that a training process holds while it writes there.

The lock is flock(2) on a file in the run directory. The OS releases it when the last process
holding it ends, however it ends, so a killed run never leaves a stale lock; a child forked
while it is held (the guarded trainer) holds it too. Holds are counted per process and
released together when their scope ends (ownership_scope), so one process may claim a
directory in several places, and a sweep that trains many runs in one process keeps only
the current run's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from resnet_flax.rundir.records import RunDirError

LOCK_FILE = ".owner.lock"

P = ParamSpec("P")
T = TypeVar("T")


class RunDirBusy(RunDirError):
    """Another process trains in the run directory."""


@dataclass
class _Hold:
    """An acquired lock and how many claims of this process share it."""

    fd: int
    count: int = 1


_held: dict[str, _Hold] = {}  # resolved run directory -> its lock, in this process
_scopes: list[list[str]] = []  # the directories each open ownership scope claimed


def lock_path(run_dir: Path) -> Path:
    """The lock file of a run directory."""
    return Path(run_dir) / LOCK_FILE


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).absolute())


def own(run_dir: Path) -> None:
    """Hold run_dir's lock until the innermost ownership scope ends (RunDirBusy if taken).

    Without an open scope the lock is held for the life of the process.
    """
    key = _key(run_dir)
    if key in _held:
        _held[key].count += 1
    else:
        _held[key] = _Hold(_acquire(Path(key)))
    if _scopes:
        _scopes[-1].append(key)


def _acquire(run_dir: Path) -> int:
    """Lock the run directory's lock file; its descriptor. The file names the owner's pid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(run_dir)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(busy_message(run_dir)) from None
        # The owner removes the file when it lets go: a lock on a removed file owns nothing.
        if _same_file(fd, path):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open descriptor is still the file at `path`."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _release(key: str) -> None:
    """Drop one claim; the last one removes the lock file and unlocks."""
    hold = _held[key]
    hold.count -= 1
    if hold.count > 0:
        return
    del _held[key]
    if os.getpid() == _owner_pid(hold.fd):  # a forked child leaves the parent's lock alone
        with contextlib.suppress(OSError):
            os.unlink(lock_path(Path(key)))
    os.close(hold.fd)


def _owner_pid(fd: int) -> int | None:
    """The pid written in a held lock file."""
    try:
        return int(os.pread(fd, 64, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def ownership_scope() -> Iterator[None]:
    """Claims made inside (own) are released when the block ends."""
    _scopes.append([])
    try:
        yield
    finally:
        for key in reversed(_scopes.pop()):
            _release(key)


def owning(fn: Callable[P, T]) -> Callable[P, T]:
    """Run `fn` in its own ownership scope: what it claims is released when it returns."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with ownership_scope():
            return fn(*args, **kwargs)

    return wrapper


def owner(run_dir: Path) -> int | None:
    """The pid of the process that owns run_dir, or None when none does (reads only)."""
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _owner_pid(fd) or -1
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def busy_message(run_dir: Path) -> str:
    """One line: who holds run_dir and what to do."""
    try:
        pid, _, since = lock_path(run_dir).read_text().strip().partition(" ")
    except OSError:
        pid, since = "?", "?"
    return (
        f"{run_dir} is in use by process {pid} (since {since}): one process trains in a run "
        "directory at a time; wait for it to end or stop it, or train into another "
        "hydra.run.dir"
    )
