"""Host batches to sharded device arrays on a background thread, a few batches ahead."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Sharding

_DONE = object()


class DevicePrefetcher:
    """Iterate global device arrays built from this host's numpy batches, `size` ahead.

    Each host passes its own slice of the global batch; `jax.make_array_from_process_local_data`
    assembles the global array, so the same code runs on one host and on several. The
    transfer overlaps the running step because it happens on this thread. `wait_s` adds up
    the time the consumer spent blocked on the next batch (input-bound time).
    """

    def __init__(self, batches: Iterator[tuple[np.ndarray, ...]], sharding: Sharding, size: int):
        self._batches = batches
        self._sharding = sharding
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for batch in self._batches:
                arrays = tuple(
                    jax.make_array_from_process_local_data(self._sharding, np.asarray(a))
                    for a in batch
                )
                while not self._stop.is_set():
                    try:
                        self._queue.put(arrays, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(_DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._queue.put(err)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[jax.Array, ...]:
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the producer thread (it may be blocked on a full queue)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
