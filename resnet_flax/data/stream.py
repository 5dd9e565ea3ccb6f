"""Streaming input pipeline from TFDS for ImageNet-scale sets (imagenet2012, imagenette).

Each host reads its own shard of the split, decodes and augments JPEGs in parallel with tf.data
and hands out numpy batches (uint8 images, int32 labels); putting them on the devices is the
training loop's job. Training order and augmentation are a pure function of (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would have seen.

TensorFlow is imported lazily: importing this module costs nothing and never touches a GPU.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from resnet_flax.data.config import STREAMING_DATASETS, DataConfig, DataError, require_tfds
from resnet_flax.data.memory import default_data_dir
from resnet_flax.data.stream_ops import eval_view, train_view
from resnet_flax.data.stream_source import (
    EVAL_SPLIT,
    data_options,
    host_split,
    not_prepared_message,
    open_builder,
    read_config,
    split_size,
    tf_cpu,
)

__all__ = [
    "AUGMENTATIONS",
    "STREAMING_DATASETS",
    "Stream",
    "is_streaming",
    "measure_input_throughput",
    "open_stream",
]

AUGMENTATIONS = ("random_resized_crop", "scale")
# ImageNet channel statistics in the uint8 scale (imagenette is drawn from ImageNet).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def is_streaming(name: str) -> bool:
    """Whether the dataset is streamed from TFDS (rather than loaded into memory)."""
    return name in STREAMING_DATASETS


def validate_stream_config(cfg: DataConfig) -> None:
    """Raise one DataError naming what is valid when a streaming DataConfig is inconsistent."""
    if not is_streaming(cfg.name):
        raise DataError(
            f"streaming dataset must be one of {', '.join(STREAMING_DATASETS)}; got {cfg.name!r}"
        )
    stream = cfg.stream
    if stream.augmentation not in AUGMENTATIONS:
        raise DataError(
            f"augmentation must be one of {', '.join(AUGMENTATIONS)}; got {stream.augmentation!r}"
        )
    if stream.image_size < 8:
        raise DataError(f"image_size must be at least 8; got {stream.image_size}")
    if stream.shuffle_buffer < 1:
        raise DataError(f"shuffle_buffer must be at least 1; got {stream.shuffle_buffer}")
    if stream.num_parallel_calls != -1 and stream.num_parallel_calls < 1:
        raise DataError(
            "num_parallel_calls must be -1 (tf.data.AUTOTUNE) or >= 1; "
            f"got {stream.num_parallel_calls}"
        )
    if stream.prefetch < 0:
        raise DataError(f"prefetch must be >= 0 batches; got {stream.prefetch}")
    if cfg.validation_size:
        raise DataError(
            f"validation_size is not supported for streamed {cfg.name}: it is evaluated on its "
            f"{EVAL_SPLIT!r} split; set dataset.validation_size=0"
        )


def _epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """Two independent seeds (file order, example order) for one epoch of one run."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(state[0]), int(state[1])


@dataclass
class Stream:
    """One host's view of a streamed dataset: endless training batches and a padded eval pass."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    n_train: int
    n_eval: int
    eval_split: str
    mean: np.ndarray
    std: np.ndarray
    tfds_name: str = ""
    data_dir: str = ""
    global_batch: int = 0
    local_batch: int = 0
    eval_batch: int = 0
    local_eval_batch: int = 0
    steps_per_epoch: int = 0
    eval_steps: int = 0  # batches per eval pass, the same on every host (padding rows masked)
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    n_train_local: int = 0
    n_eval_local: int = 0
    cfg: DataConfig = field(
        default_factory=partial(DataConfig, name=STREAMING_DATASETS[0]), repr=False
    )
    _builder: Any = field(default=None, repr=False)
    _train_split: Any = field(default=None, repr=False)
    _eval_split: Any = field(default=None, repr=False)
    _cached: dict = field(default_factory=dict, repr=False)

    # --- sources: encoded (jpeg bytes, label) records of this host's shard -------------------
    def _source(self, split: Any, shuffle_seed: int | None):
        """(jpeg, label) records; with stream.cache the first pass is kept in RAM for later ones."""
        import tensorflow_datasets as tfds

        cache = self.cfg.stream.cache
        if cache and split in self._cached:
            return self._cached[split]
        shuffle_files = shuffle_seed is not None and not cache
        ds = self._builder.as_dataset(
            split=split,
            shuffle_files=shuffle_files,
            decoders={"image": tfds.decode.SkipDecoding()},  # decode in our map, after skips
            read_config=read_config(shuffle_seed if shuffle_files else None),
        )
        ds = ds.map(lambda ex: (ex["image"], ex["label"]))
        if cache:
            # The cache belongs to this dataset object, so every epoch built on it shares it.
            ds = ds.cache()
            self._cached[split] = ds
        return ds

    def _parallel(self) -> int:
        """num_parallel_calls for tf.data (AUTOTUNE for -1)."""
        calls = self.cfg.stream.num_parallel_calls
        return tf_cpu().data.AUTOTUNE if calls == -1 else calls

    def _train_epoch(self, epoch: int, skip_steps: int):
        """tf.data pipeline for one epoch of this host, starting after skip_steps batches."""
        tf = tf_cpu()
        file_seed, order_seed = _epoch_seeds(self.seed, epoch)
        per_epoch = self.steps_per_epoch * self.local_batch
        ds = self._source(self._train_split, file_seed)
        settings = self.cfg.stream
        ds = ds.shuffle(settings.shuffle_buffer, seed=order_seed, reshuffle_each_iteration=False)
        # Every host takes the same number of examples (shards may differ by one), and the
        # already-consumed ones are skipped before any JPEG is decoded.
        ds = ds.take(per_epoch).skip(skip_steps * self.local_batch)
        ds = ds.enumerate(start=skip_steps * self.local_batch)
        first_step = epoch * self.steps_per_epoch
        size, augmentation, flip = settings.image_size, settings.augmentation, self.cfg.flip
        local_batch, global_batch = self.local_batch, self.global_batch
        host_offset, run_seed = self.process_index * local_batch, self.seed

        def augment(index, record):
            jpeg, label = record
            # Augmentation randomness is a function of (seed, global example number) only.
            step = first_step + index // local_batch
            example = step * global_batch + host_offset + index % local_batch
            seed = tf.stack([tf.constant(run_seed, tf.int64), example])
            image = train_view(tf, jpeg, seed, size, augmentation, flip)
            return image, tf.cast(label, tf.int32)

        ds = ds.map(augment, num_parallel_calls=self._parallel(), deterministic=True)
        ds = ds.batch(self.local_batch, drop_remainder=True)
        return ds.prefetch(settings.prefetch).with_options(data_options())

    def _start_epoch(self, epoch: int, skip_steps: int) -> _Ahead:
        """Build an epoch's pipeline here and fetch its first batch on a background thread."""
        import tensorflow_datasets as tfds

        # TFDS calls stay on the caller's thread; the thread only runs the tf.data iterator.
        batches = tfds.as_numpy(self._train_epoch(epoch, skip_steps))

        def start():
            iterator = iter(batches)
            return next(iterator), iterator

        return _Ahead(start)

    def train_batches(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless (x uint8 (local_batch, S, S, 3), y int32) host batches from start_step on."""
        if start_step < 0:
            raise DataError(f"start_step must be >= 0; got {start_step}")
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        # Start the next epoch this many steps before the current one ends, so its shuffle
        # buffer fills while the last batches are consumed (no stall at the epoch boundary).
        lead = max(1, self.steps_per_epoch // 20)
        current = self._start_epoch(epoch, skip)
        while True:
            # A fresh pipeline per epoch: its order depends on (seed, epoch) alone, so resuming
            # mid-run rebuilds exactly the same epoch.
            first, iterator = current.result()
            upcoming = None
            for step in range(skip, self.steps_per_epoch):
                if upcoming is None and self.steps_per_epoch - step <= lead:
                    upcoming = self._start_epoch(epoch + 1, 0)
                yield first if step == skip else next(iterator)
            epoch, skip, current = epoch + 1, 0, upcoming

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One pass over this host's eval shard: (x uint8 centre crops, y int32, mask bool)."""
        import tensorflow_datasets as tfds

        tf = tf_cpu()
        size = self.cfg.stream.image_size

        def view(jpeg, label):
            return eval_view(tf, jpeg, size), tf.cast(label, tf.int32), tf.constant(True)

        ds = self._source(self._eval_split, None)
        ds = ds.map(view, num_parallel_calls=self._parallel(), deterministic=True)
        # Pad every host to the same number of full batches so collective eval steps line up.
        padding = self.eval_steps * self.local_eval_batch - self.n_eval_local
        blank = (tf.zeros((size, size, 3), tf.uint8), tf.constant(0, tf.int32), tf.constant(False))
        ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
        ds = ds.batch(self.local_eval_batch, drop_remainder=True)
        ds = ds.prefetch(self.cfg.stream.prefetch).with_options(data_options())
        yield from tfds.as_numpy(ds)


class _Ahead:
    """Run a function on a daemon thread now; result() waits for it (and re-raises its error)."""

    def __init__(self, fn):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as err:  # handed to the consumer's thread by result()
            self._error = err

    def result(self) -> Any:
        """The function's return value, once it has finished."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def open_stream(
    cfg: DataConfig,
    global_batch: int,
    eval_batch: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Stream:
    """Open this host's stream of a prepared TFDS dataset; fail in seconds when it is missing."""
    validate_stream_config(cfg)
    require_tfds(cfg.name)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index must be in [0, {process_count}); got {process_index}")
    for what, batch in (("batch size", global_batch), ("eval batch size", eval_batch)):
        if batch < 1 or batch % process_count:
            raise DataError(
                f"the global {what} must be a positive multiple of the {process_count} "
                f"processes (hosts); got {batch}"
            )
    tf_cpu()  # hide the GPU from TF before tfds touches it
    data_dir = default_data_dir(cfg.data_dir)
    builder, tfds_name = open_builder(cfg, data_dir)
    train_split = host_split("train", process_index, process_count, drop_remainder=True)
    eval_split = host_split(EVAL_SPLIT, process_index, process_count, drop_remainder=False)
    try:
        n_train = split_size(builder, "train")
        n_eval = split_size(builder, EVAL_SPLIT)
        n_train_local = split_size(builder, train_split)
        n_eval_local = split_size(builder, eval_split)
    except AssertionError as err:  # TFDS's "could not find data in <data_dir>"
        raise DataError(not_prepared_message(cfg.name, tfds_name, data_dir)) from err
    except (KeyError, ValueError) as err:  # prepared, but without the split
        raise DataError(
            f"{tfds_name} in {data_dir!r} lacks the train or {EVAL_SPLIT} split ({err}); "
            f"rebuild it with `tfds build {tfds_name} --data_dir {data_dir}`"
        ) from err
    local_batch = global_batch // process_count
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch < 1 or n_train_local < steps_per_epoch * local_batch:
        raise DataError(
            f"{tfds_name} has {n_train} training examples, fewer than one global batch of "
            f"{global_batch}"
        )
    local_eval_batch = eval_batch // process_count
    size = cfg.stream.image_size
    return Stream(
        name=cfg.name,
        num_classes=builder.info.features["label"].num_classes,
        image_shape=(size, size, 3),
        n_train=n_train,
        n_eval=n_eval,
        eval_split=EVAL_SPLIT,
        mean=IMAGENET_MEAN.copy(),
        std=IMAGENET_STD.copy(),
        tfds_name=tfds_name,
        data_dir=data_dir,
        global_batch=global_batch,
        local_batch=local_batch,
        eval_batch=eval_batch,
        local_eval_batch=local_eval_batch,
        steps_per_epoch=steps_per_epoch,
        eval_steps=math.ceil(math.ceil(n_eval / process_count) / local_eval_batch),
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        n_train_local=n_train_local,
        n_eval_local=n_eval_local,
        cfg=cfg,
        _builder=builder,
        _train_split=train_split,
        _eval_split=eval_split,
    )


def measure_input_throughput(stream: Stream, batches: int) -> float:
    """Training images/s that train_batches delivers on this host, after one warm-up batch."""
    if batches < 1:
        raise DataError(f"batches must be >= 1; got {batches}")
    iterator = stream.train_batches(0)
    next(iterator)  # pipeline start-up and shuffle-buffer fill are not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * stream.local_batch / (time.perf_counter() - start)
