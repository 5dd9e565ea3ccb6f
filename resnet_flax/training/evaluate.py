"""Evaluation: fixed-shape host batches of a split, summed on the devices."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np

from resnet_flax.data.prefetch import DevicePrefetcher
from resnet_flax.training.config import TrainerConfig


def global_eval_batch(
    trainer: TrainerConfig, num_devices: int, smallest_split: int | None = None
) -> int:
    """The evaluation batch rounded up to a multiple of the device count.

    With `smallest_split`, no larger than that split (so rounded up): a 360-image test set
    is not padded to a batch of 1,000.
    """
    batch = trainer.eval_batch_size
    if smallest_split is not None:
        batch = min(batch, smallest_split)
    return math.ceil(batch / num_devices) * num_devices


def array_eval_batches(
    x: np.ndarray, y: np.ndarray, batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's rows of each global evaluation batch of in-memory arrays, with a mask.

    The last batch is padded (mask False) to the full size, so every batch has one shape.
    """
    n, local = len(x), batch // jax.process_count()
    first = jax.process_index() * local
    for start in range(0, n, batch):
        rows = np.arange(start + first, start + first + local)
        valid = rows < n
        rows = np.minimum(rows, n - 1)
        yield x[rows], y[rows], valid


def evaluate_batches(
    evaluate: Callable, state: dict, batches: Iterable, n: int, sharding, prefetch: int, stats
) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and error (per seed when vmapped) over host batches (x, y, mask) of n rows.

    The batches are copied to the devices `prefetch` ahead of the compiled evaluation.
    """
    loss, wrong = 0.0, 0
    on_device = DevicePrefetcher(iter(batches), sharding, prefetch)
    try:
        for x, y, valid in on_device:
            sums = evaluate(state["params"], state["batch_stats"], x, y, valid, *stats)
            loss, wrong = loss + np.asarray(sums[0]), wrong + np.asarray(sums[1])
    finally:
        on_device.close()
    return loss / n, wrong / n
