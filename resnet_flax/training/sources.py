"""Where a run's batches come from: the in-memory splits or a host stream, one interface.

Both sources answer the same questions for the loop: the dataset's shape and size, the pure
training step that consumes their batches, how a chunk of steps runs, and the evaluation of
a split. Everything that differs between them stays inside the class.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_flax.data import augment as aug
from resnet_flax.data.memory import DataConfig, Dataset, load_dataset
from resnet_flax.data.prefetch import DevicePrefetcher
from resnet_flax.data.stream import Stream, is_streaming, open_stream
from resnet_flax.training.config import ConfigError, TrainerConfig
from resnet_flax.training.evaluate import array_eval_batches, evaluate_batches, global_eval_batch
from resnet_flax.training.runtime import put_replicated
from resnet_flax.training.steps import (
    MemoryLayout,
    Program,
    Recipe,
    memory_train_step,
    stream_train_step,
)


def open_data(data_cfg: DataConfig, trainer: TrainerConfig, seed: int) -> Dataset | Stream:
    """A run's data: the in-memory sets, or a host stream for the ImageNet-scale ones.

    Either way this fails in seconds with a DataError (nothing has compiled yet).
    """
    if is_streaming(data_cfg.name):
        eval_batch = global_eval_batch(trainer, jax.device_count())
        return open_stream(data_cfg, trainer.batch_size, eval_batch, seed)
    return load_dataset(data_cfg)


class DataSource(Protocol):
    """Where the loop gets its batches from; MemorySource and StreamSource implement it."""

    name: str
    num_classes: int
    image_shape: tuple
    n_train: int
    steps_per_epoch: int
    order_len: int  # length of the data order the training state carries
    eval_batch_size: int
    eval_splits: tuple[str, ...]  # evaluated every trainer.eval_every iterations
    final_splits: tuple[str, ...]  # evaluated once, in eval mode, when the run completes
    summary_fields: dict
    stats: tuple  # (mean, std) on the devices

    @property
    def wait_s(self) -> float:
        """Seconds the loop has waited for input."""

    def train_step(self, recipe: Recipe) -> Callable:
        """The pure training step over this source's batches."""

    def start(self, step: int) -> None:
        """Begin delivering batches at `step`."""

    def run_chunk(self, program: Program, state: dict, length: int) -> tuple[dict, dict]:
        """`length` training steps: (state, per-step metrics)."""

    def evaluate(self, program: Program, state: dict, split: str) -> tuple:
        """Mean loss and error of `state` on a split."""

    def close(self) -> None:
        """Release what the source holds."""


class _Source:
    """What both sources share: sizes, the batch sharding, the device copy of the statistics."""

    def __init__(
        self, name: str, num_classes: int, image_shape: tuple, n_train: int, trainer, mesh, stats
    ):
        if n_train < trainer.batch_size:
            raise ConfigError(
                f"the training split has {n_train} images, fewer than batch_size "
                f"{trainer.batch_size}"
            )
        self.name, self.num_classes, self.image_shape = name, num_classes, tuple(image_shape)
        self.n_train = n_train
        self.steps_per_epoch = n_train // trainer.batch_size
        self.prefetch = trainer.device_prefetch
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self.stats = tuple(put_replicated(np.asarray(a, np.float32), mesh) for a in stats)

    def _evaluate(self, program: Program, state: dict, batches, n: int) -> tuple:
        """Mean loss and error (per seed when vmapped) of `state` over host batches."""
        return evaluate_batches(
            program.evaluate, state, batches, n, self.batch_sharding, self.prefetch, self.stats
        )


class MemorySource(_Source):
    """In-memory splits: the training set lives on the devices, a step gathers its batch there.

    Evaluation batches come from the host, so one evaluation program serves every split.
    """

    final_splits = ("train",)  # evaluated once, in eval mode, when the run completes
    summary_fields: dict = {}
    wait_s = 0.0  # the data is on the devices: the loop never waits for input

    def __init__(self, data: Dataset, cfg: DataConfig, trainer: TrainerConfig, mesh: Mesh):
        stats = aug.normalization_stats(data.x_train, cfg.normalization)
        n = len(data.x_train)
        super().__init__(data.name, data.num_classes, data.image_shape, n, trainer, mesh, stats)
        self.data = data
        self.splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
        if data.x_val is not None:
            self.splits["val"] = (data.x_val, data.y_val)
        self.eval_splits = tuple(s for s in ("test", "val") if s in self.splits)
        smallest = min(len(x) for x, _ in self.splits.values())
        self.eval_batch_size = global_eval_batch(trainer, mesh.size, smallest)
        self.order_len = n  # the per-epoch permutation the state carries
        self.layout = MemoryLayout(
            trainer.batch_size,
            self.steps_per_epoch,
            n,
            cfg.crop_padding,
            cfg.flip,
            self.batch_sharding,
        )
        arrays = (data.x_train, data.y_train)
        self.train_data = tuple(put_replicated(a, mesh) for a in arrays) + self.stats

    def train_step(self, recipe: Recipe) -> Callable:
        """The pure step over the device-resident training set."""
        return functools.partial(memory_train_step, recipe, self.layout)

    def start(self, step: int) -> None:
        """Nothing to open: the step derives its batch from the step count."""

    def run_chunk(self, program: Program, state: dict, length: int) -> tuple[dict, dict]:
        """`length` training steps over the device-resident set."""
        return program.repeat(state, self.train_data, length)

    def evaluate(self, program: Program, state: dict, split: str) -> tuple:
        """Mean loss and error of `state` on an in-memory split."""
        x, y = self.splits[split]
        batches = array_eval_batches(x, y, self.eval_batch_size)
        return self._evaluate(program, state, batches, len(x))

    def close(self) -> None:
        """Nothing to release."""


class StreamSource(_Source):
    """A host stream (ImageNet-scale): batches decoded on the host, copied a few steps ahead."""

    eval_splits = ("test",)  # the stream's evaluation split, logged as the test error
    final_splits = ()  # a pass over the whole training set in eval mode is not affordable
    order_len = 1  # the stream orders its own data; Orbax cannot save an empty placeholder

    def __init__(self, stream: Stream, trainer: TrainerConfig, mesh: Mesh):
        # The stream's statistics are on the 0-255 scale; normalize() works on 0-1.
        stats = (stream.mean / 255.0, stream.std / 255.0)
        shape, n = stream.image_shape, stream.n_train
        super().__init__(stream.name, stream.num_classes, shape, n, trainer, mesh, stats)
        self.stream = stream
        self.eval_batch_size = stream.eval_batch
        self.summary_fields = {"eval_split": stream.eval_split}
        self._batches: DevicePrefetcher | None = None

    def train_step(self, recipe: Recipe) -> Callable:
        """The pure step over one host batch."""
        return functools.partial(stream_train_step, recipe)

    def start(self, step: int) -> None:
        """Open the stream at `step` (a resumed run sees the batches it would have seen)."""
        train = self.stream.train_batches(step)
        self._batches = DevicePrefetcher(train, self.batch_sharding, self.prefetch)

    @property
    def wait_s(self) -> float:
        """Time the loop spent waiting for the next batch."""
        return self._batches.wait_s if self._batches is not None else 0.0

    def run_chunk(self, program: Program, state: dict, length: int) -> tuple[dict, dict]:
        """`length` training steps over the next streamed batches."""
        inputs = ((x, y, *self.stats) for x, y in itertools.islice(self._batches, length))
        return program.each(state, inputs)

    def evaluate(self, program: Program, state: dict, split: str) -> tuple:
        """Mean loss and error of `state` over the stream's evaluation split."""
        return self._evaluate(program, state, self.stream.eval_batches(), self.stream.n_eval)

    def close(self) -> None:
        """Stop the prefetching thread."""
        if self._batches is not None:
            self._batches.close()


def make_source(
    data: Dataset | Stream, cfg: DataConfig, trainer: TrainerConfig, mesh: Mesh
) -> DataSource:
    """The source for loaded data: in-memory splits or a stream."""
    if isinstance(data, Dataset):
        return MemorySource(data, cfg, trainer, mesh)
    return StreamSource(data, trainer, mesh)
