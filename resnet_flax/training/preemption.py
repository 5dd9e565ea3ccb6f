"""Stop requests: the signals a cluster or a person sends before a run is killed.

SLURM sends SIGTERM (and, with --signal, SIGUSR1/SIGUSR2) ahead of preemption or the time
limit; a person presses Ctrl-C (SIGINT). While a run trains, these only ask it to stop: the
loop finishes its chunk, checkpoints, records the run as interrupted and raises RunInterrupted.
The previous handlers are restored afterwards, so the caller can hand the signal on (submitit
requeues the job on its signal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import jax
import numpy as np

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class RunInterrupted(Exception):
    """A run stopped on a signal after saving its checkpoint; rerunning resumes it."""

    def __init__(self, signum: int, iteration: int, run_dir: str):
        self.signum, self.iteration, self.run_dir = signum, iteration, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"{run_dir}: stopped by {name} at iteration {iteration}, checkpoint saved")

    def __reduce__(self):
        """Pickle by the constructor's arguments (the guard sends it between processes)."""
        return RunInterrupted, (self.signum, self.iteration, self.run_dir)


class StopRequests:
    """Catch the stop signals while a run trains (a context manager); a second SIGINT aborts.

    Outside the main thread (where Python cannot install handlers) it catches nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _request(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        if self.signum is None:
            self.signum = signum
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
