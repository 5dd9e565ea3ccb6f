"""Run a training job in a child process, so that a process abort is recorded, not silent."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from resnet_flax.rundir import mark_unfinished_failed
from resnet_flax.training.preemption import forward_stop_signals

log = logging.getLogger(__name__)

T = TypeVar("T")


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


def run_guarded(job: Callable[[], T], run_dir: Path) -> T:
    """Run job() in a forked child process and return its result (or raise its exception).

    XLA ends a stuck collective with abort(), which no Python handler can catch. Here only
    the child dies: this process marks the runs it left 'running' as failed, with the reason,
    and raises JobDied, so a sweep can go on with its next job. Call it before JAX starts its
    backend in this process (a forked XLA client is unusable).
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_serve, args=(job, sender), daemon=False)
    child.start()
    sender.close()
    try:
        with forward_stop_signals(child.pid):
            outcome = receiver.recv()
    except EOFError:
        outcome = None
    finally:
        receiver.close()
        child.join()
    if outcome is None:
        reason = death_reason(child.exitcode)
        marked = mark_unfinished_failed(run_dir, reason)
        log.error("%s: %s; marked failed: %s", run_dir, reason, [str(p.parent) for p in marked])
        raise JobDied(reason)
    kind, value = outcome
    if kind == "raised":
        raise value
    return value


def _serve(job: Callable[[], object], sender) -> None:
    """The child's side: run the job and send ('ok', result) or ('raised', exception)."""
    # Out of the terminal's process group: a Ctrl-C reaches the child once, through the parent.
    os.setpgid(0, 0)
    try:
        outcome = ("ok", job())
    except BaseException as err:  # handed to the parent, which re-raises it
        outcome = ("raised", err)
    try:
        sender.send(outcome)
    except Exception as err:  # an exception that does not pickle
        sender.send(("raised", RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}; {err}")))
    sender.close()
