"""Streaming TFDS pipeline on mocked imagenet2012 / imagenette: shapes, augmentation, sharding."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from resnet_flax.data.config import StreamConfig
from resnet_flax.data.memory import DataConfig, DataError, load_dataset
from resnet_flax.data.stream import (
    AUGMENTATIONS,
    STREAMING_DATASETS,
    is_streaming,
    measure_input_throughput,
    open_stream,
)

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

SIZE = 32
SMALL = DataConfig(
    name="imagenet2012", stream=StreamConfig(image_size=SIZE, shuffle_buffer=64, prefetch=1)
)
# Split sizes of the split-aware fake; odd on purpose (uneven host shards, a padded eval batch).
FAKE_SIZES = {"train": 41, "validation": 23}
_JPEGS: dict[int, bytes] = {}


def ramp_jpeg(i: int) -> bytes:
    """Example i: a horizontal ramp (dark left, bright right) of an example-dependent size."""
    if i not in _JPEGS:
        height, width = 40 + (7 * i) % 50, 48 + (13 * i) % 60
        ramp = np.linspace(0, 255, width, dtype=np.float32)
        image = np.broadcast_to(ramp[None, :, None], (height, width, 3)).astype(np.uint8)
        _JPEGS[i] = tf.io.encode_jpeg(image, quality=95).numpy()
    return _JPEGS[i]


def split_aware_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """A mock `_as_dataset` that honours sub-splits (plain mock_data returns all N for any split).

    Labels are the example's index in its split (imagenet2012 has 1000 classes), so tests can
    tell which examples a host read. Like the real reader it returns encoded JPEG bytes when
    the image decoder is SkipDecoding, which is what the pipeline asks for.
    """
    from tensorflow_datasets.core import splits as splits_lib

    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
    infos = {name: SimpleNamespace(num_examples=n) for name, n in FAKE_SIZES.items()}
    ids = []
    for inst in splits_lib.AbstractSplit.from_spec(split).to_absolute(infos):
        end = FAKE_SIZES[inst.splitname] if inst.to is None else inst.to
        ids += range(inst.from_ or 0, end)
    images = tf.constant([ramp_jpeg(i) for i in ids], tf.string)
    labels = tf.constant(ids, tf.int64)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    return ds.map(
        lambda ex: {**ex, "label": tf.numpy_function(count_read, [ex["label"]], tf.int64)}
    )


READS = {"count": 0}


def count_read(label: np.ndarray) -> np.ndarray:
    """Count the examples that the fake reader hands out (to see the cache at work)."""
    READS["count"] += 1
    return label


def mock_splits():
    """mock_data whose sub-splits (tfds.even_splits) are the real, disjoint index ranges."""
    return tfds.testing.mock_data(as_dataset_fn=split_aware_as_dataset)


def with_stream(cfg: DataConfig, **changes) -> DataConfig:
    """cfg with some of its stream settings changed."""
    return replace(cfg, stream=replace(cfg.stream, **changes))


def open_host(cfg: DataConfig, index: int = 0, count: int = 1, seed: int = 0, eval_batch: int = 8):
    """open_stream with a global batch of 8 for simulated host `index` of `count`."""
    return open_stream(cfg, 8, eval_batch, seed, process_index=index, process_count=count)


def take(iterator, n: int) -> list:
    """The first n items of an iterator."""
    return [next(iterator) for _ in range(n)]


def test_importing_the_module_does_not_import_tensorflow():
    code = "import sys, resnet_flax.data.stream; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert is_streaming("imagenet2012") and is_streaming("imagenette")
    assert not is_streaming("cifar10") and STREAMING_DATASETS == ("imagenet2012", "imagenette")


@pytest.mark.parametrize("name", STREAMING_DATASETS)
def test_mock_data_images_have_sane_shapes(name):
    with tfds.testing.mock_data(num_examples=4):
        builder = tfds.builder(name)
        assert builder.info.features["image"].shape == (None, None, 3)
        ds = builder.as_dataset(split="train").batch(1)
        for example in tfds.as_numpy(ds):
            height, width, channels = example["image"].shape[1:]
            assert 5 <= height < 50 and 5 <= width < 50 and channels == 3


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
@pytest.mark.parametrize("name", STREAMING_DATASETS)
def test_train_and_eval_batches_on_mock_data(name, augmentation):
    cfg = with_stream(replace(SMALL, name=name), augmentation=augmentation)
    with tfds.testing.mock_data(num_examples=20):
        stream = open_host(cfg, eval_batch=6)
        batches = take(stream.train_batches(0), 3)  # crosses the epoch end (20 // 8 = 2 steps)
        evals = list(stream.eval_batches())
    assert stream.num_classes == (1000 if name == "imagenet2012" else 10)
    assert stream.image_shape == (SIZE, SIZE, 3) and stream.steps_per_epoch == 2
    assert stream.eval_split == "validation" and stream.mean.shape == stream.std.shape == (3,)
    assert stream.mean.dtype == np.float32 and 100 < stream.mean[0] < 130
    for x, y in batches:
        assert x.shape == (8, SIZE, SIZE, 3) and x.dtype == np.uint8
        assert y.shape == (8,) and y.dtype == np.int32
        assert y.min() >= 0 and y.max() < stream.num_classes
        assert x.max() > x.min()  # real pixels, not a blank tensor
    assert len(evals) == 4  # 20 examples in batches of 6: the last has 2 real rows
    for x, y, mask in evals:
        assert x.shape == (6, SIZE, SIZE, 3) and x.dtype == np.uint8 and y.dtype == np.int32
        assert mask.dtype == bool
    assert sum(int(m.sum()) for _, _, m in evals) == 20
    assert not evals[-1][2][2:].any() and not evals[-1][0][2:].any()


def test_augmentation_crops_and_flips_vary_per_example_and_epoch():
    with mock_splits():
        stream = open_host(SMALL, seed=0, index=0, count=1)
        batches = take(stream.train_batches(0), 2 * stream.steps_per_epoch)
    x = np.concatenate([b[0] for b in batches]).astype(np.float32)
    y = np.concatenate([b[1] for b in batches])
    # The ramp rises to the right; a flipped crop falls. About half should be flipped.
    rising = x[:, :, : SIZE // 4].mean(axis=(1, 2, 3)) < x[:, :, -SIZE // 4 :].mean(axis=(1, 2, 3))
    assert 0.25 < rising.mean() < 0.75
    # An example seen in both epochs gets a different crop (or flip) each time. (41 examples,
    # 40 per epoch: the shuffled-out remainder differs between epochs.)
    half = len(y) // 2
    first = dict(zip(y[:half], x[:half], strict=True))
    second = dict(zip(y[half:], x[half:], strict=True))
    both = first.keys() & second.keys()
    assert len(first) == len(second) == 40 and len(both) >= 39
    assert sum(not np.array_equal(first[k], second[k]) for k in both) >= 0.9 * len(both)


def test_resume_yields_the_tail_of_an_uninterrupted_run():
    with mock_splits():
        stream = open_host(SMALL, seed=3, index=0, count=1)
        assert stream.steps_per_epoch == 5
        whole = take(stream.train_batches(0), 12)
        resumed = take(stream.train_batches(7), 5)  # mid-epoch 1, then into epoch 2
        other_seed = replace(stream, seed=4)
        different = take(other_seed.train_batches(7), 1)
    for (xa, ya), (xb, yb) in zip(whole[7:], resumed, strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
    assert not np.array_equal(different[0][0], resumed[0][0])
    # Epochs are reshuffled: the same examples in another order.
    epoch0 = np.concatenate([y for _, y in whole[:5]])
    epoch1 = np.concatenate([y for _, y in whole[5:10]])
    assert sorted(epoch0) != list(epoch0) or sorted(epoch1) != list(epoch1)
    assert not np.array_equal(epoch0, epoch1) and len(set(epoch0)) == 40


def test_cache_reads_the_source_once_and_changes_nothing_else():
    cached = with_stream(SMALL, cache=True)
    with mock_splits():
        stream = open_host(cached, seed=1)
        READS["count"] = 0
        batches = take(stream.train_batches(0), 15)  # three epochs of 5 steps
        evals = [list(stream.eval_batches()) for _ in range(2)]
        resumed = take(stream.train_batches(12), 3)
        reads = READS["count"]
        plain = take(open_host(SMALL, seed=1).train_batches(0), 15)
    # The fake ignores file shuffling, so cached and uncached runs see the same order.
    for (xa, ya), (xb, yb) in zip(plain, batches, strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
    for (xa, ya), (xb, yb) in zip(batches[12:], resumed, strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
    assert reads == 41 + 23  # each split read once, then served from RAM
    np.testing.assert_array_equal(evals[0][0][0], evals[1][0][0])


def test_two_hosts_read_disjoint_shards_that_cover_the_split():
    with mock_splits():
        hosts = [open_host(SMALL, seed=0, index=i, count=2) for i in range(2)]
        train = [take(h.train_batches(0), h.steps_per_epoch) for h in hosts]
        evals = [list(h.eval_batches()) for h in hosts]
        evals_again = list(hosts[1].eval_batches())
    assert [h.local_batch for h in hosts] == [4, 4] and hosts[0].steps_per_epoch == 5
    assert hosts[0].n_train == 41 and hosts[0].n_eval == 23
    seen = [set(np.concatenate([y for _, y in batches]).tolist()) for batches in train]
    assert all(len(s) == 20 for s in seen) and not seen[0] & seen[1]
    assert seen[0] | seen[1] <= set(range(41)) and len(seen[0] | seen[1]) == 40
    # Eval: the same number of batches on every host; the masked rows are each example once.
    assert len(evals[0]) == len(evals[1]) == hosts[0].eval_steps == 3
    labels = [int(y) for batches in evals for _, ys, ms in batches for y in ys[ms]]
    assert sorted(labels) == list(range(23))
    for (xa, ya, ma), (xb, yb, mb) in zip(evals[1], evals_again, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(ma, mb)
    # Centre crops of a rising ramp keep rising: no flips at evaluation.
    x = np.concatenate([xs[ms] for xs, _, ms in evals[0]]).astype(np.float32)
    assert (x[:, :, :8].mean(axis=(1, 2, 3)) < x[:, :, -8:].mean(axis=(1, 2, 3))).all()


def test_input_throughput_is_measured():
    with tfds.testing.mock_data(num_examples=32):
        stream = open_host(SMALL, seed=0, index=0, count=1)
        assert measure_input_throughput(stream, batches=3) > 0


@pytest.mark.parametrize("name", STREAMING_DATASETS)
def test_unprepared_dataset_fails_fast_with_instructions(tmp_path, name):
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        open_stream(replace(SMALL, name=name, data_dir=str(tmp_path)), 8, 8, 0, 0, 1)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert str(tmp_path) in message
    if name == "imagenet2012":
        assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
        assert f"{tmp_path}/downloads/manual" in message
        assert f"tfds build imagenet2012 --data_dir {tmp_path}" in message
    else:
        assert f"tfds build imagenette/320px-v2 --data_dir {tmp_path}" in message
        assert "dataset.download=true" in message


def test_imagenet_download_without_the_manual_files_fails_fast(tmp_path):
    cfg = replace(SMALL, data_dir=str(tmp_path), download=True)
    start = time.perf_counter()
    with pytest.raises(DataError, match="downloads/manual"):
        open_stream(cfg, 8, 8, 0, 0, 1)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    ("data", "stream", "kwargs", "message"),
    [
        (
            {},
            {"augmentation": "mixup"},
            {},
            "augmentation must be one of random_resized_crop, scale",
        ),
        ({}, {"image_size": 4}, {}, "image_size must be at least 8"),
        ({}, {"shuffle_buffer": 0}, {}, "shuffle_buffer must be at least 1"),
        ({}, {"num_parallel_calls": 0}, {}, r"num_parallel_calls must be -1 \(tf.data.AUTOTUNE\)"),
        ({}, {"prefetch": -1}, {}, "prefetch must be >= 0"),
        ({"validation_size": 100}, {}, {}, "validation_size is not supported"),
        ({"name": "cifar10", "stream": None}, None, {}, "streaming dataset must be one of"),
        ({}, {}, {"global_batch": 9, "process_count": 2}, "multiple of the 2 processes"),
        ({}, {}, {"eval_batch": 5, "process_count": 2}, "eval batch size must be a positive"),
        ({}, {}, {"process_index": 2, "process_count": 2}, r"process_index must be in \[0, 2\)"),
        ({"name": "imagenette"}, {"tfds_config": "999px"}, {}, "Valid tfds_config values"),
    ],
)
def test_bad_configs_are_explained(data, stream, kwargs, message):
    args = {"global_batch": 8, "eval_batch": 8, "seed": 0, "process_index": 0, "process_count": 1}
    cfg = replace(SMALL, **data)
    if stream is not None:
        cfg = with_stream(cfg, **stream)
    with pytest.raises(DataError, match=message):
        open_stream(cfg, **(args | kwargs))


def test_too_few_examples_for_a_batch():
    with tfds.testing.mock_data(num_examples=4), pytest.raises(DataError, match="one global"):
        open_stream(SMALL, 8, 8, 0, 0, 1)


def test_load_dataset_points_streamed_sets_to_open_stream():
    with pytest.raises(DataError, match="data.stream.open_stream"):
        load_dataset(DataConfig(name="imagenet2012"))
    with pytest.raises(DataError, match="svhn_cropped, digits, npz, imagenet2012, imagenette"):
        load_dataset(DataConfig(name="imagenet21k"))


def test_generated_imagenette_uses_tfds_class_names():
    from resnet_flax.data.generated import IMAGENETTE_WNIDS

    names = tfds.core.tfds_path("image_classification/imagenette_labels.txt").read_text()
    assert tuple(names.split()) == IMAGENETTE_WNIDS
