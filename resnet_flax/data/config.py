"""The data configuration: DataConfig, its StreamConfig, and the names of the datasets."""

from __future__ import annotations

from dataclasses import dataclass

TFDS_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn_cropped")
LOCAL_DATASETS = ("digits", "npz")
DATASETS = TFDS_DATASETS + LOCAL_DATASETS
NORMALIZATIONS = ("pixel_mean", "channel_std")


@dataclass(frozen=True)
class Streamed:
    """What the code knows of a streamed TFDS dataset before opening it."""

    tfds_config: str | None  # the builder config used when StreamConfig.tfds_config is None
    train_images: int  # training-split size, for recipes counted in epochs


# The datasets streamed from TFDS by resnet_flax.data.stream (never loaded whole into memory).
# imagenette's 320px variant: shorter side 320, 1/5 the size of full-size, still above 224.
STREAMED = {
    "imagenet2012": Streamed(tfds_config=None, train_images=1_281_167),
    "imagenette": Streamed(tfds_config="320px-v2", train_images=9_469),
}
STREAMING_DATASETS = tuple(STREAMED)


class DataError(ValueError):
    """A dataset that cannot be loaded; the message says what is valid and what to do."""


@dataclass(frozen=True)
class StreamConfig:
    """How a streamed dataset is read, decoded, augmented and batched on the host."""

    image_size: int = 224  # side of the square training / evaluation crops
    augmentation: str = "random_resized_crop"  # random_resized_crop | scale (the paper's)
    tfds_config: str | None = None  # builder config; None: the dataset's (STREAMED)
    shuffle_buffer: int = 16 * 1024  # examples (still JPEG-encoded) in the shuffle buffer
    num_parallel_calls: int = -1  # decode+augment threads; -1: tf.data.AUTOTUNE
    prefetch: int = 2  # batches prepared ahead on the host
    cache: bool = False  # keep the encoded JPEGs in host RAM after the first pass (small sets)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, how it is split, normalised and augmented.

    Streamed datasets (STREAMED) always carry a StreamConfig (the default one when none is
    given); in-memory datasets carry none.
    """

    name: str = "cifar10"
    data_dir: str | None = None
    path: str | None = None  # the npz file for name="npz"
    validation_size: int = 0  # in memory only: training examples held out for validation
    normalization: str = "pixel_mean"  # in memory only: streams use ImageNet's channel stats
    crop_padding: int = 4  # in memory only: 0 disables the pad-and-crop augmentation
    flip: bool = True
    download: bool = False
    num_classes: int | None = None  # npz only: classifier width; None: the largest label + 1
    stream: StreamConfig | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASETS + STREAMING_DATASETS:
            valid = ", ".join(DATASETS + STREAMING_DATASETS)
            raise DataError(f"dataset must be one of {valid}; got {self.name!r}")
        if self.normalization not in NORMALIZATIONS:
            raise DataError(
                f"dataset.normalization must be one of {', '.join(NORMALIZATIONS)}; "
                f"got {self.normalization!r}"
            )
        if self.name in STREAMED and self.stream is None:
            object.__setattr__(self, "stream", StreamConfig())
        if self.name not in STREAMED and self.stream is not None:
            raise DataError(
                f"stream settings apply to the streamed datasets {', '.join(STREAMED)} only; "
                f"{self.name!r} is held in memory: remove dataset.stream"
            )
        if self.num_classes is not None and self.name != "npz":
            raise DataError(
                f"num_classes applies to dataset=npz only; {self.name!r} knows its classes: "
                "remove dataset.num_classes"
            )


# The optional dependencies that read TFDS datasets (everything but digits and npz).
TFDS_EXTRA = "tfds"


def require_tfds(dataset: str) -> None:
    """Raise one DataError naming the extra when TensorFlow Datasets cannot be imported."""
    try:
        import tensorflow  # noqa: F401
        import tensorflow_datasets  # noqa: F401
    except ImportError as err:
        raise DataError(
            f"dataset {dataset!r} is read with TensorFlow Datasets, which is not installed "
            f"({err.name}): in the repository run .venv/bin/pip install -e '.[{TFDS_EXTRA}]' "
            "(`make test` installs it); digits and npz need neither"
        ) from err
