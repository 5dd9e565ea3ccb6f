"""The stream's TFDS side: opening the prepared builder, split sizes, host shards, read options.

TensorFlow and TFDS are imported inside the functions, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from resnet_flax.data.config import STREAMED, DataConfig, DataError

EVAL_SPLIT = "validation"
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def tf_cpu() -> Any:
    """Import TensorFlow for tf.data only, hiding any GPU from it (JAX owns the accelerators)."""
    import tensorflow as tf

    # RuntimeError: TF already initialised its devices (an earlier call did this): fine.
    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")
    return tf


def data_options() -> Any:
    """tf.data options: a deterministic order (needed for exact resume), TF off the GPU."""
    tf = tf_cpu()
    options = tf.data.Options()
    options.deterministic = True
    return options


def read_config(shuffle_seed: int | None) -> Any:
    """TFDS read settings: our own caching and prefetch, file order seeded per epoch."""
    import tensorflow_datasets as tfds

    return tfds.ReadConfig(
        shuffle_seed=shuffle_seed,
        options=data_options(),
        try_autocache=False,  # caching is StreamConfig.cache's decision
        skip_prefetch=True,  # the pipeline prefetches whole batches at its end
    )


def not_prepared_message(name: str, tfds_name: str, data_dir: str) -> str:
    """What to do when the dataset is not in data_dir: one message, with the commands."""
    if name == "imagenet2012":
        return (
            f"imagenet2012 is not prepared in data_dir {data_dir!r}. TFDS cannot download "
            "ImageNet (it needs a registration at https://image-net.org): put "
            f"{' and '.join(IMAGENET_TARS)} into {data_dir}/downloads/manual, "
            f"then run `tfds build imagenet2012 --data_dir {data_dir}` (or rerun with "
            "dataset.download=true to build it from those files), or point dataset.data_dir / "
            "$TFDS_DATA_DIR at a prepared copy."
        )
    return (
        f"{tfds_name} is not prepared in data_dir {data_dir!r} and downloads are off. On a "
        f"machine with internet run `tfds build {tfds_name} --data_dir {data_dir}` (or rerun with "
        "dataset.download=true), or point dataset.data_dir / $TFDS_DATA_DIR at a prepared copy."
    )


def open_builder(cfg: DataConfig, data_dir: str) -> tuple[Any, str]:
    """The TFDS builder for the configured dataset, prepared first when downloads are on."""
    import tensorflow_datasets as tfds

    config = cfg.stream.tfds_config or STREAMED[cfg.name].tfds_config
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
            if not all(os.path.isfile(os.path.join(manual, t)) for t in IMAGENET_TARS):
                raise DataError(not_prepared_message(cfg.name, tfds_name, data_dir))
        builder.download_and_prepare()
    return builder, tfds_name


def split_size(builder: Any, split: Any) -> int:
    """Examples in a (sub)split: the dataset's cardinality, else the prepared split info."""
    import tensorflow_datasets as tfds

    skip = {"image": tfds.decode.SkipDecoding()}
    ds = builder.as_dataset(split=split, decoders=skip, read_config=read_config(None))
    n = int(ds.cardinality())
    if n < 0:  # unknown cardinality; the prepared dataset's info knows the sizes
        n = builder.info.splits[split].num_examples
    return n


def host_split(split: str, process_index: int, process_count: int, drop_remainder: bool) -> Any:
    """This host's even share of a split (the whole split for one host)."""
    import tensorflow_datasets as tfds

    if process_count == 1:
        return split
    return tfds.even_splits(split, process_count, drop_remainder=drop_remainder)[process_index]
