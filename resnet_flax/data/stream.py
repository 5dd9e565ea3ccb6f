"""Streaming input pipeline from TFDS for ImageNet-scale sets (imagenet2012, imagenette).

Each host reads its own shard of the split, decodes and augments JPEGs in parallel with tf.data
and hands out numpy batches (uint8 images, int32 labels); putting them on the devices is the
training loop's job. Training order and augmentation are a pure function of (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would have seen.

TensorFlow is imported lazily: importing this module costs nothing and never touches a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resnet_flax.data.memory import STREAMING_DATASETS, DataConfig, DataError, default_data_dir

__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_TFDS_CONFIGS",
    "STREAMING_DATASETS",
    "Stream",
    "is_streaming",
    "measure_input_throughput",
    "open_stream",
]

AUGMENTATIONS = ("random_resized_crop", "scale")
# imagenette's 320px variant: shorter side 320, 1/5 the size of full-size, still above 224.
DEFAULT_TFDS_CONFIGS = {"imagenet2012": None, "imagenette": "320px-v2"}
EVAL_SPLIT = "validation"
# ImageNet channel statistics in the uint8 scale (imagenette is drawn from ImageNet).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
# Inception-style random-resized crop (Szegedy et al. 2015; flax examples/imagenet).
RRC_AREA = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10
# He et al. 2015 sec. 3.4: shorter side resized to a random size in [256, 480] for 224 crops.
SCALE_RANGE = (256, 480)
# Evaluation: shorter side resized to image_size / 0.875 (256 for 224), centre crop.
EVAL_CROP_FRACTION = 0.875


def is_streaming(name: str) -> bool:
    """Whether the dataset is streamed from TFDS (rather than loaded into memory)."""
    return name in STREAMING_DATASETS


def _tf():
    """Import TensorFlow for tf.data only, hiding any GPU from it (JAX owns the accelerators)."""
    import tensorflow as tf

    # RuntimeError: TF already initialised its devices (an earlier call did this): fine.
    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")
    return tf


def validate_stream_config(cfg: DataConfig) -> None:
    """Raise one DataError naming what is valid when a streaming DataConfig is inconsistent."""
    if not is_streaming(cfg.name):
        raise DataError(
            f"streaming dataset must be one of {', '.join(STREAMING_DATASETS)}; got {cfg.name!r}"
        )
    if cfg.augmentation not in AUGMENTATIONS:
        raise DataError(
            f"augmentation must be one of {', '.join(AUGMENTATIONS)}; got {cfg.augmentation!r}"
        )
    if cfg.image_size < 8:
        raise DataError(f"image_size must be at least 8; got {cfg.image_size}")
    if cfg.shuffle_buffer < 1:
        raise DataError(f"shuffle_buffer must be at least 1; got {cfg.shuffle_buffer}")
    if cfg.num_parallel_calls != -1 and cfg.num_parallel_calls < 1:
        raise DataError(
            "num_parallel_calls must be -1 (tf.data.AUTOTUNE) or >= 1; "
            f"got {cfg.num_parallel_calls}"
        )
    if cfg.prefetch < 0:
        raise DataError(f"prefetch must be >= 0 batches; got {cfg.prefetch}")
    if cfg.validation_size:
        raise DataError(
            f"validation_size is not supported for streamed {cfg.name}: it is evaluated on its "
            f"{EVAL_SPLIT!r} split; set dataset.validation_size=0"
        )


def _not_prepared_message(name: str, tfds_name: str, data_dir: str) -> str:
    """What to do when the dataset is not in data_dir: one message, with the commands."""
    if name == "imagenet2012":
        return (
            f"imagenet2012 is not prepared in data_dir {data_dir!r}. TFDS cannot download "
            "ImageNet (it needs a registration at https://image-net.org): put "
            "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into "
            f"{data_dir}/downloads/manual, "
            f"then run `tfds build imagenet2012 --data_dir {data_dir}` (or rerun with "
            "dataset.download=true to build it from those files), or point dataset.data_dir / "
            "$TFDS_DATA_DIR at a prepared copy."
        )
    return (
        f"{tfds_name} is not prepared in data_dir {data_dir!r} and downloads are off. On a "
        f"machine with internet run `tfds build {tfds_name} --data_dir {data_dir}` (or rerun with "
        "dataset.download=true), or point dataset.data_dir / $TFDS_DATA_DIR at a prepared copy."
    )


def _builder(cfg: DataConfig, data_dir: str):
    """The TFDS builder for the configured dataset, prepared first when downloads are on."""
    import tensorflow_datasets as tfds

    config = cfg.tfds_config or DEFAULT_TFDS_CONFIGS[cfg.name]
    tfds_name = f"{cfg.name}/{config}" if config else cfg.name
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as err:  # an unknown builder config: list the valid ones
        configs = [c.name for c in getattr(tfds.builder_cls(cfg.name), "BUILDER_CONFIGS", [])]
        raise DataError(
            f"cannot open {tfds_name!r}: {err}. Valid tfds_config values for {cfg.name}: "
            f"{', '.join(configs) or 'none (leave it null)'}"
        ) from err
    if cfg.download and not builder.is_prepared():
        if cfg.name == "imagenet2012":
            manual = os.path.join(data_dir, "downloads", "manual")
            tars = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
            if not all(os.path.isfile(os.path.join(manual, t)) for t in tars):
                raise DataError(_not_prepared_message(cfg.name, tfds_name, data_dir))
        builder.download_and_prepare()
    return builder, tfds_name


def _split_size(builder, split: Any) -> int:
    """Examples in a (sub)split: the dataset's cardinality, else the prepared split info."""
    import tensorflow_datasets as tfds

    skip = {"image": tfds.decode.SkipDecoding()}
    ds = builder.as_dataset(split=split, decoders=skip, read_config=_read_config(None))
    n = int(ds.cardinality())
    if n < 0:  # unknown cardinality; the prepared dataset's info knows the sizes
        n = builder.info.splits[split].num_examples
    return n


def _options():
    """tf.data options: a deterministic order (needed for exact resume), TF off the GPU."""
    tf = _tf()
    options = tf.data.Options()
    options.deterministic = True
    return options


def _read_config(shuffle_seed: int | None):
    """TFDS read settings: our own caching and prefetch, file order seeded per epoch."""
    import tensorflow_datasets as tfds

    return tfds.ReadConfig(
        shuffle_seed=shuffle_seed,
        options=_options(),
        try_autocache=False,  # caching is DataConfig.cache's decision
        skip_prefetch=True,  # the pipeline prefetches whole batches at its end
    )


def _epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """Two independent seeds (file order, example order) for one epoch of one run."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(state[0]), int(state[1])


def _resize(tf, image, size: int):
    """Resize to size x size (bilinear) and round back to uint8.

    No antialiasing, as in big_vision and TF's official ResNet: it would triple the per-image
    cost (about 4.5 ms against 1.7 ms for a 500x375 JPEG on one core here), and crops shrink by
    under 2x on ImageNet, where bilinear aliasing is mild.
    """
    image = tf.image.resize(image, [size, size], method="bilinear")
    return tf.saturate_cast(tf.round(image), tf.uint8)


def _random_resized_crop(tf, jpeg, seed, size: int):
    """Inception crop: area 8-100%, aspect 3/4-4/3, decoding only the crop window."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=whole,
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=RRC_RATIO,
        area_range=RRC_AREA,
        max_attempts=RRC_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(crop_size)
    window = tf.stack([offset_y, offset_x, height, width])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    return _resize(tf, image, size)


def _scale_crop(tf, jpeg, seed, size: int):
    """He et al. sec. 3.4: shorter side to a random s in [256, 480] (x size/224), random crop.

    Cropping the source window that maps onto the crop and then resizing it is the same
    image as resizing the whole picture and cropping, at a fraction of the cost.
    """
    shape = tf.image.extract_jpeg_shape(jpeg)
    height, width = shape[0], shape[1]
    lo, hi = (round(s * size / 224) for s in SCALE_RANGE)
    scale_seed, y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shorter = tf.random.stateless_uniform([], scale_seed, lo, hi + 1, dtype=tf.int32)
    factor = tf.cast(tf.minimum(height, width), tf.float32) / tf.cast(shorter, tf.float32)
    crop = tf.cast(tf.round(size * factor), tf.int32)
    crop = tf.clip_by_value(crop, 1, tf.minimum(height, width))
    offset_y = tf.random.stateless_uniform([], y_seed, 0, height - crop + 1, dtype=tf.int32)
    offset_x = tf.random.stateless_uniform([], x_seed, 0, width - crop + 1, dtype=tf.int32)
    window = tf.stack([offset_y, offset_x, crop, crop])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    return _resize(tf, image, size)


def _centre_crop(tf, jpeg, size: int):
    """Evaluation view: the central 87.5% square (shorter side -> size/0.875, centre crop)."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    height, width = shape[0], shape[1]
    crop = tf.cast(
        tf.round(EVAL_CROP_FRACTION * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32
    )
    crop = tf.maximum(crop, 1)
    window = tf.stack([(height - crop) // 2, (width - crop) // 2, crop, crop])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    return _resize(tf, image, size)


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
    cfg: DataConfig = field(default_factory=DataConfig, repr=False)
    _builder: Any = field(default=None, repr=False)
    _train_split: Any = field(default=None, repr=False)
    _eval_split: Any = field(default=None, repr=False)
    _cached: dict = field(default_factory=dict, repr=False)

    # --- sources: encoded (jpeg bytes, label) records of this host's shard -------------------
    def _source(self, split: Any, shuffle_seed: int | None):
        """(jpeg, label) records; with cfg.cache the first pass is kept in RAM for later ones."""
        import tensorflow_datasets as tfds

        if self.cfg.cache and split in self._cached:
            return self._cached[split]
        shuffle_files = shuffle_seed is not None and not self.cfg.cache
        ds = self._builder.as_dataset(
            split=split,
            shuffle_files=shuffle_files,
            decoders={"image": tfds.decode.SkipDecoding()},  # decode in our map, after skips
            read_config=_read_config(shuffle_seed if shuffle_files else None),
        )
        ds = ds.map(lambda ex: (ex["image"], ex["label"]))
        if self.cfg.cache:
            # The cache belongs to this dataset object, so every epoch built on it shares it.
            ds = ds.cache()
            self._cached[split] = ds
        return ds

    def _parallel(self) -> int:
        """num_parallel_calls for tf.data (AUTOTUNE for -1)."""
        tf = _tf()
        return (
            tf.data.AUTOTUNE if self.cfg.num_parallel_calls == -1 else self.cfg.num_parallel_calls
        )

    def _train_epoch(self, epoch: int, skip_steps: int):
        """tf.data pipeline for one epoch of this host, starting after skip_steps batches."""
        tf = _tf()
        file_seed, order_seed = _epoch_seeds(self.seed, epoch)
        per_epoch = self.steps_per_epoch * self.local_batch
        ds = self._source(self._train_split, file_seed)
        ds = ds.shuffle(self.cfg.shuffle_buffer, seed=order_seed, reshuffle_each_iteration=False)
        # Every host takes the same number of examples (shards may differ by one), and the
        # already-consumed ones are skipped before any JPEG is decoded.
        ds = ds.take(per_epoch).skip(skip_steps * self.local_batch)
        ds = ds.enumerate(start=skip_steps * self.local_batch)
        first_step = epoch * self.steps_per_epoch
        size, augmentation, flip = self.cfg.image_size, self.cfg.augmentation, self.cfg.flip
        local_batch, global_batch = self.local_batch, self.global_batch
        host_offset, run_seed = self.process_index * local_batch, self.seed

        def augment(index, record):
            jpeg, label = record
            # Augmentation randomness is a function of (seed, global example number) only.
            step = first_step + index // local_batch
            example = step * global_batch + host_offset + index % local_batch
            seed = tf.stack([tf.constant(run_seed, tf.int64), example])
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            if augmentation == "scale":
                image = _scale_crop(tf, jpeg, crop_seed, size)
            else:
                image = _random_resized_crop(tf, jpeg, crop_seed, size)
            if flip:
                image = tf.image.stateless_random_flip_left_right(image, flip_seed)
            return tf.ensure_shape(image, (size, size, 3)), tf.cast(label, tf.int32)

        ds = ds.map(augment, num_parallel_calls=self._parallel(), deterministic=True)
        ds = ds.batch(self.local_batch, drop_remainder=True)
        return ds.prefetch(self.cfg.prefetch).with_options(_options())

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

        tf = _tf()
        size = self.cfg.image_size

        def view(jpeg, label):
            image = tf.ensure_shape(_centre_crop(tf, jpeg, size), (size, size, 3))
            return image, tf.cast(label, tf.int32), tf.constant(True)

        ds = self._source(self._eval_split, None)
        ds = ds.map(view, num_parallel_calls=self._parallel(), deterministic=True)
        # Pad every host to the same number of full batches so collective eval steps line up.
        padding = self.eval_steps * self.local_eval_batch - self.n_eval_local
        blank = (tf.zeros((size, size, 3), tf.uint8), tf.constant(0, tf.int32), tf.constant(False))
        ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
        ds = ds.batch(self.local_eval_batch, drop_remainder=True)
        ds = ds.prefetch(self.cfg.prefetch).with_options(_options())
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


def _host_split(split: str, process_index: int, process_count: int, drop_remainder: bool):
    """This host's even share of a split (the whole split for one host)."""
    import tensorflow_datasets as tfds

    if process_count == 1:
        return split
    return tfds.even_splits(split, process_count, drop_remainder=drop_remainder)[process_index]


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
    _tf()  # hide the GPU from TF before tfds touches it
    data_dir = default_data_dir(cfg.data_dir)
    builder, tfds_name = _builder(cfg, data_dir)
    train_split = _host_split("train", process_index, process_count, drop_remainder=True)
    eval_split = _host_split(EVAL_SPLIT, process_index, process_count, drop_remainder=False)
    try:
        n_train = _split_size(builder, "train")
        n_eval = _split_size(builder, EVAL_SPLIT)
        n_train_local = _split_size(builder, train_split)
        n_eval_local = _split_size(builder, eval_split)
    except AssertionError as err:  # TFDS's "could not find data in <data_dir>"
        raise DataError(_not_prepared_message(cfg.name, tfds_name, data_dir)) from err
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
    size = cfg.image_size
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
