"""Stop requests: the signals a cluster or a person sends before a run is killed.

SLURM sends SIGTERM (and, with --signal, SIGUSR1/SIGUSR2) ahead of preemption or the time
limit; a person presses Ctrl-C (SIGINT). While a run trains, these only ask it to stop: the
loop finishes its chunk, checkpoints, records the run as interrupted and raises RunInterrupted.
A job records them from its start (training.guard), so a signal that arrives before the loop
stops the run before it writes anything. The previous handlers are restored afterwards, so the
caller can hand the signal on (submitit requeues the job on its signal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import ClassVar

import jax
import numpy as np

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class RunInterrupted(Exception):
    """A run stopped on a signal after saving its checkpoint; rerunning resumes it.

    before_start: the signal came before training (re)started, and nothing was written.
    """

    def __init__(self, signum: int, iteration: int, run_dir: str, before_start: bool = False):
        self.signum, self.iteration, self.run_dir = signum, iteration, run_dir
        self.before_start = before_start
        name = signal.Signals(signum).name
        done = (
            f"before training from iteration {iteration}, nothing written"
            if before_start
            else f"at iteration {iteration}, checkpoint saved"
        )
        super().__init__(f"{run_dir}: stopped by {name} {done}")

    def __reduce__(self):
        """Pickle by the constructor's arguments (the guard sends it between processes)."""
        return RunInterrupted, (self.signum, self.iteration, self.run_dir, self.before_start)


class StopRequests:
    """Catch the stop signals while a run trains (a context manager); a second SIGINT aborts.

    Opened inside another one (the job's, from its start) it shares that one's requests, so
    a signal received before the loop began still stops it. Outside the main thread (where
    Python cannot install handlers) it catches nothing.
    """

    _outermost: ClassVar[StopRequests | None] = None  # the one whose handlers are installed

    def __init__(self) -> None:
        self._signum: int | None = None
        self._previous: dict[int, object] = {}
        self._outer: StopRequests | None = None

    @property
    def signum(self) -> int | None:
        """The first stop signal received, or None."""
        return self._outer.signum if self._outer is not None else self._signum

    def __enter__(self) -> StopRequests:
        if StopRequests._outermost is not None:
            self._outer = StopRequests._outermost
        elif threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._request)
            StopRequests._outermost = self
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if StopRequests._outermost is self:
            StopRequests._outermost = None

    def _request(self, signum: int, frame: FrameType | None) -> None:
        if self._signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        if self._signum is None:
            self._signum = signum
            log.warning(
                "%s received: stopping after the current chunk (Ctrl-C again to stop at once)",
                signal.Signals(signum).name,
            )

    def agreed(self) -> int | None:
        """The signal every process stops on, or None; all processes of a job call this."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        # Processes stop at the same chunk: the first signal any of them received decides.
        local = np.int32(self.signum or 0)
        signums = np.asarray(multihost_utils.process_allgather(local))
        received = signums[signums > 0]
        return int(received[0]) if received.size else None


def requested_stop() -> int | None:
    """The stop signal this job received so far (every process of a job agrees), or None."""
    with StopRequests() as stop:
        return stop.agreed()


@contextlib.contextmanager
def forward_stop_signals(pid: int) -> Iterator[None]:
    """While the block runs, hand every stop signal this process receives to process `pid`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, _: os.kill(pid, signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
