"""Run a training job that owns its run directory and records stop signals from its start.

With several CPU devices the job runs in a child process, so that a process abort is
recorded, not silent; the child dies with its parent, stopping through the checkpoint path.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from resnet_flax.rundir import (
    RunDirUnwritable,
    mark_unfinished_failed,
    unwritable_message,
    write_failure,
)
from resnet_flax.rundir.owner import own, ownership_scope
from resnet_flax.training.preemption import STOP_SIGNALS, StopRequests, forward_stop_signals
from resnet_flax.training.runtime import process_index_from_env

log = logging.getLogger(__name__)

T = TypeVar("T")

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class JobDied(RuntimeError):
    """The child process ended without a result (killed by a signal or exited early)."""


def death_reason(exitcode: int | None) -> str:
    """One sentence saying how the child ended, for summary.json and the log."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = (
            "XLA aborts a process whose cross-device collective does not complete in time; "
            "the job's log holds its message"
            if -exitcode == signal.SIGABRT
            else "it was stopped from outside"
        )
        return f"the training process was killed by {name} ({why})"
    return f"the training process exited with code {exitcode} without a result"


@contextlib.contextmanager
def owned_job(run_dir: Path) -> Iterator[None]:
    """Own run_dir for the block (RunDirBusy at once if another process trains there).

    Only the process that writes a multi-host job's records takes the lock.
    """
    with ownership_scope():
        if process_index_from_env() == 0:
            own(run_dir)
        yield


def run_here(job: Callable[[], T], run_dir: Path) -> T:
    """Run job() in this process, owning run_dir and recording stop signals from the start."""
    with owned_job(run_dir), StopRequests():
        try:
            return job()
        except Exception as err:
            converted = in_one_line(err, run_dir)
            if converted is err:
                raise
            raise converted from None


def in_one_line(err: Exception, run_dir: Path) -> Exception:
    """A full disk or a read-only run directory as one RunDirUnwritable line; others as is."""
    why = write_failure(err)
    return err if why is None else RunDirUnwritable(unwritable_message(run_dir, why))


def run_guarded(job: Callable[[], T], run_dir: Path) -> T:
    """Run job() in a forked child process and return its result (or raise its exception).

    XLA ends a stuck collective with abort(), which no Python handler can catch. Here only
    the child dies: this process marks the runs it left 'running' as failed, with the reason,
    and raises JobDied, so a sweep can go on with its next job. The child holds this
    process's lock on run_dir, records stop signals from its first instruction (this process
    forwards its own), and gets SIGTERM when this process dies. Call it before JAX starts its
    backend in this process (a forked XLA client is unusable).
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    args = (job, sender, os.getpid(), run_dir)
    child = context.Process(target=_serve, args=args, daemon=False)
    with owned_job(run_dir):
        # Blocked across the fork: each process handles them only once its handlers are set.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            child.start()
            sender.close()
            with forward_stop_signals(child.pid):
                signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
                outcome = _receive(receiver)
                child.join()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
            receiver.close()
    if outcome is None:
        reason = death_reason(child.exitcode)
        marked = mark_unfinished_failed(run_dir, reason)
        log.error("%s: %s; marked failed: %s", run_dir, reason, [str(p.parent) for p in marked])
        raise JobDied(reason)
    kind, value = outcome
    if kind == "raised":
        raise value
    return value


def _receive(receiver) -> tuple | None:
    """The child's outcome, or None when it ended without sending one."""
    try:
        return receiver.recv()
    except EOFError:
        return None


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Have the OS send `signum` to this process when its parent dies (Linux), or now if the
    parent has already gone; elsewhere, only the second.
    """
    with contextlib.suppress(OSError, AttributeError):  # no prctl outside Linux
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)


def _serve(job: Callable[[], object], sender, parent_pid: int, run_dir: Path) -> None:
    """The child's side: run the job and send ('ok', result) or ('raised', exception)."""
    # Out of the terminal's process group: a Ctrl-C reaches the child once, through the parent.
    os.setpgid(0, 0)
    with StopRequests():
        die_with_parent(parent_pid)  # an orphan would train on, and write, unowned
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            outcome = ("ok", job())
        except Exception as err:  # handed to the parent, which re-raises it
            outcome = ("raised", in_one_line(err, run_dir))
        except BaseException as err:
            outcome = ("raised", err)
    with contextlib.suppress(OSError):  # BrokenPipeError: the parent is gone
        try:
            sender.send(outcome)
        except OSError:
            raise
        except Exception as err:  # an exception that does not pickle
            message = f"{type(outcome[1]).__name__}: {outcome[1]}; {err}"
            sender.send(("raised", RuntimeError(message)))
        sender.close()
