"""In-memory datasets as uint8 arrays: TFDS image sets, scikit-learn's digits, a user's npz.

ImageNet-scale sets (resnet_flax.data.config.STREAMED) do not fit in memory; they are streamed
from TFDS by resnet_flax.data.stream.open_stream.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnet_flax.data.config import (
    STREAMING_DATASETS,
    DataConfig,
    DataError,
    require_tfds,
)

log = logging.getLogger(__name__)

# Channel counts of image arrays: one before the spatial axes (and none after) means NCHW.
IMAGE_CHANNELS = (1, 3)

# The validation split is always drawn with this seed, so every run of a sweep sees the same one.
VALIDATION_SEED = 12345


@dataclass
class Dataset:
    """Host-memory uint8 images (NHWC) and int32 labels for each split."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        return tuple(self.x_train.shape[1:])


def default_data_dir(data_dir: str | None) -> str:
    """The TFDS data_dir: the given one, $TFDS_DATA_DIR, or TFDS's default ~/tensorflow_datasets."""
    return os.path.expanduser(
        data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    )


def _read_tfds_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split fully into numpy, batching explicitly (batch_size=-1 breaks under mocks)."""
    import tensorflow_datasets as tfds

    xs, ys = [], []
    ds = builder.as_dataset(split=split, as_supervised=True, batch_size=10_000)
    for x, y in tfds.as_numpy(ds):
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs).astype(np.uint8), np.concatenate(ys).astype(np.int32)


def load_tfds(name: str, data_dir: str | None, download: bool) -> Dataset:
    """Load a prepared TFDS image dataset; fail in seconds with a fix when it is not prepared."""
    require_tfds(name)
    import tensorflow_datasets as tfds

    data_dir = default_data_dir(data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        builder.download_and_prepare()
    try:
        x_train, y_train = _read_tfds_split(builder, "train")
        x_test, y_test = _read_tfds_split(builder, "test")
    except AssertionError as err:
        raise DataError(
            f"dataset {name!r} is not prepared in data_dir {data_dir!r} and downloads are off. "
            f"On a machine with internet run `tfds build {name} --data_dir {data_dir}` "
            f"(or `python -m experiments.train dataset={name} dataset.download=true`), then copy "
            f"{data_dir}/{name} here or point dataset.data_dir / $TFDS_DATA_DIR at it; "
            f"offline, use dataset=digits."
        ) from err
    num_classes = builder.info.features["label"].num_classes
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, info={"source": "tfds"})


def load_digits() -> Dataset:
    """scikit-learn's bundled 1,797 real 8x8 digits, scaled to uint8, a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, 10, info={"source": "sklearn"})


def _as_images(name: str, array: np.ndarray) -> np.ndarray:
    """Check one npz image array and return it as uint8 NHWC."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise DataError(
            f"npz array {name!r} must have shape (N, H, W) or (N, H, W, C); got {array.shape}"
        )
    if array.shape[1] in IMAGE_CHANNELS and array.shape[3] not in IMAGE_CHANNELS:
        log.warning(
            "npz array %r has shape %s, channels first (N, C, H, W): transposed to (N, H, W, C) "
            "%s; store it channels last to silence this",
            name,
            array.shape,
            (array.shape[0], *array.shape[2:], array.shape[1]),
        )
        array = np.moveaxis(array, 1, -1)
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DataError(
                f"npz float array {name!r} must hold finite values in [0, 1]; {bad} are NaN or "
                "inf (replace them, or store uint8 0..255 instead)"
            )
        lo, hi = float(array.min(initial=0)), float(array.max(initial=0))
        if lo < 0 or hi > 1:
            raise DataError(
                f"npz float array {name!r} must hold values in [0, 1]; got [{lo:g}, {hi:g}] "
                "(store uint8 0..255 instead)"
            )
        return np.round(array * 255).astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"npz array {name!r} must be uint8 (or float in [0, 1]); got {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DataError(f"npz integer array {name!r} must hold values in 0..255")
    if array.size and array.max() <= 1:
        log.warning(
            "npz integer array %r holds values up to %d only: integer images are read on the "
            "0..255 scale, so these train as nearly black images; multiply them by 255 (or "
            "store floats in [0, 1])",
            name,
            array.max(),
        )
    return array.astype(np.uint8)


def _format_labels(labels: np.ndarray) -> str:
    """Sorted distinct labels as compact ranges: 0-7, 9, 99."""
    parts, values = [], np.unique(labels).tolist()
    while values:
        run = 1
        while run < len(values) and values[run] == values[0] + run:
            run += 1
        parts.append(str(values[0]) if run == 1 else f"{values[0]}-{values[run - 1]}")
        values = values[run:]
    return ", ".join(parts)


def _npz_labels(arrays: dict, sizes: dict[str, int], num_classes: int | None) -> dict:
    """Check y_train / y_test against their images and the classes; return them as int32."""
    labels = {}
    for split, n in sizes.items():
        y = arrays[f"y_{split}"]
        if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"y_{split} must be 1-D integer labels, one per image ({n}); "
                f"got shape {y.shape}, dtype {y.dtype}"
            )
        if y.size and y.min() < 0:
            raise DataError(f"y_{split} labels must be >= 0; got {y.min()}")
        if num_classes is not None and y.size and y.max() >= num_classes:
            raise DataError(
                f"y_{split} labels must be below dataset.num_classes={num_classes}; got "
                f"{y.max()}: fix the labels or raise dataset.num_classes"
            )
        labels[split] = y.astype(np.int32)
    return labels


def _class_count(labels: dict, num_classes: int | None) -> int:
    """dataset.num_classes, else the largest label + 1 when every class below it occurs."""
    if num_classes is not None:
        if num_classes < 2:
            raise DataError(f"dataset.num_classes must be at least 2 (or null); got {num_classes}")
        return num_classes
    found = np.unique(np.concatenate(list(labels.values())))
    count = int(found[-1]) + 1
    if count < 2:
        raise DataError("the labels must name at least 2 classes")
    if len(found) < count:
        raise DataError(
            f"npz labels must be 0..{count - 1} with every class present; found "
            f"{_format_labels(found)}: fix the labels, or set dataset.num_classes={count} if "
            "the empty classes are intended"
        )
    return count


def _read_npz(path: str | None) -> dict[str, np.ndarray]:
    """The arrays x_train, y_train, x_test, y_test of one .npz file (no pickle)."""
    if not path:
        raise DataError("dataset=npz needs dataset.path=/path/to/file.npz")
    if not Path(path).is_file():
        raise DataError(f"npz file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a readable .npz file (not a zip archive of .npy arrays)")
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise DataError(
                    f"npz file {path} lacks {', '.join(missing)}; it must hold {', '.join(keys)} "
                    f"(found: {', '.join(f.files) or 'nothing'})"
                )
            return {k: f[k] for k in keys}
    except DataError:
        raise
    except ValueError as err:  # object arrays would need pickle
        raise DataError(f"npz file {path} cannot be read without pickle: {err}") from err
    except Exception as err:
        raise DataError(f"{path} is not a readable .npz file: {err}") from err


def load_npz(path: str | None, num_classes: int | None = None) -> Dataset:
    """A user's arrays x_train, y_train, x_test, y_test from one .npz file (no pickle)."""
    arrays = _read_npz(path)
    x_train, x_test = (
        _as_images("x_train", arrays["x_train"]),
        _as_images("x_test", arrays["x_test"]),
    )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"x_train images {x_train.shape[1:]} and x_test images {x_test.shape[1:]} differ"
        )
    labels = _npz_labels(arrays, {"train": len(x_train), "test": len(x_test)}, num_classes)
    if len(x_train) == 0 or len(x_test) == 0:
        raise DataError("x_train and x_test must each hold at least one image")
    unseen = np.setdiff1d(labels["test"], labels["train"])
    if unseen.size:
        log.warning(
            "npz classes %s occur in y_test but never in y_train: the net cannot learn them, "
            "so their %d test images count as errors whatever it learns",
            _format_labels(unseen),
            int(np.isin(labels["test"], unseen).sum()),
        )
    return Dataset(
        Path(path).stem,
        x_train,
        labels["train"],
        x_test,
        labels["test"],
        _class_count(labels, num_classes),
        info={"source": "npz", "path": str(path)},
    )


def hold_out_validation(data: Dataset, size: int) -> Dataset:
    """Move `size` training examples, chosen with a fixed seed, into a validation split."""
    if size <= 0:
        return data
    if size >= len(data.x_train):
        raise DataError(
            f"validation_size must be below the training set size {len(data.x_train)}; got {size}"
        )
    order = np.random.default_rng(VALIDATION_SEED).permutation(len(data.x_train))
    val, train = order[:size], np.sort(order[size:])
    data.x_val, data.y_val = data.x_train[val], data.y_train[val]
    data.x_train, data.y_train = data.x_train[train], data.y_train[train]
    return data


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the configured dataset into host memory, with its validation split if asked."""
    if cfg.name in STREAMING_DATASETS:
        raise DataError(
            f"dataset {cfg.name!r} is streamed, not loaded into memory: "
            "use resnet_flax.data.stream.open_stream"
        )
    if cfg.name == "digits":
        data = load_digits()
    elif cfg.name == "npz":
        data = load_npz(cfg.path, cfg.num_classes)
    else:
        data = load_tfds(cfg.name, cfg.data_dir, cfg.download)
    return hold_out_validation(data, cfg.validation_size)
