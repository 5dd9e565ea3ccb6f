"""Datasets, validation split, normalisation and on-device augmentation."""

import json
import time
from dataclasses import asdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.data import augment as aug
from resnet_flax.data.config import StreamConfig
from resnet_flax.data.memory import (
    DataConfig,
    DataError,
    hold_out_validation,
    load_dataset,
    load_npz,
)
from resnet_flax.training.config import ConfigError
from resnet_flax.training.run_config import RunConfig


def test_digits_are_real_uint8_images():
    data = load_dataset(DataConfig(name="digits"))
    assert data.x_train.dtype == np.uint8 and data.x_train.shape[1:] == (8, 8, 1)
    assert len(data.x_train) + len(data.x_test) == 1797
    assert data.num_classes == 10 and data.x_train.max() == 255


def test_validation_split_is_fixed_and_disjoint():
    a = load_dataset(DataConfig(name="digits", validation_size=100))
    b = load_dataset(DataConfig(name="digits", validation_size=100))
    assert len(a.x_val) == 100 and len(a.x_train) == 1437 - 100
    np.testing.assert_array_equal(a.x_val, b.x_val)
    train_rows = {r.tobytes() for r in a.x_train.reshape(len(a.x_train), -1)}
    val_rows = [r.tobytes() for r in a.x_val.reshape(100, -1)]
    # digits has a few duplicate images, so compare counts, not exact disjointness
    assert sum(r in train_rows for r in val_rows) < 10


def test_missing_tfds_dataset_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path)))
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "'cifar10'" in message and str(tmp_path) in message and "tfds build cifar10" in message


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(DataError, match="dataset must be one of cifar10, cifar100"):
        load_dataset(DataConfig(name="cifar11"))


def _save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_roundtrip_accepts_nhw_images(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(
        tmp_path / "mine.npz",
        x_train=rng.integers(0, 256, (20, 6, 6), dtype=np.uint8),
        y_train=np.arange(20) % 3,
        x_test=rng.integers(0, 256, (5, 6, 6), dtype=np.uint8),
        y_test=np.arange(5) % 3,
    )
    data = load_dataset(DataConfig(name="npz", path=path))
    assert data.x_train.shape == (20, 6, 6, 1) and data.num_classes == 3


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"x_train": np.zeros((4, 6, 6), np.uint8)}, "lacks y_train, x_test, y_test"),
        (
            {
                "x_train": np.zeros((4, 6), np.uint8),
                "y_train": np.zeros(4, int),
                "x_test": np.zeros((2, 6, 6), np.uint8),
                "y_test": np.zeros(2, int),
            },
            r"must have shape \(N, H, W\) or \(N, H, W, C\); got \(4, 6\)",
        ),
        (
            {
                "x_train": np.zeros((4, 6, 6), np.uint8),
                "y_train": np.zeros(3, int),
                "x_test": np.zeros((2, 6, 6), np.uint8),
                "y_test": np.zeros(2, int),
            },
            "y_train must be 1-D integer labels, one per image",
        ),
        (
            {
                "x_train": np.full((4, 6, 6), 2.0),
                "y_train": np.zeros(4, int),
                "x_test": np.zeros((2, 6, 6)),
                "y_test": np.zeros(2, int),
            },
            r"must hold values in \[0, 1\]",
        ),
        (
            {
                "x_train": np.zeros((4, 6, 6), np.uint8),
                "y_train": np.zeros(4, int),
                "x_test": np.zeros((2, 5, 5), np.uint8),
                "y_test": np.zeros(2, int),
            },
            "differ",
        ),
    ],
)
def test_malformed_npz_says_what_is_wrong(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_npz(_save(tmp_path / "bad.npz", **arrays))


def _npz(tmp_path, x_train=None, y_train=(0, 1, 2, 0), y_test=(1, 2)) -> str:
    """A small npz of 6x6 images with the given labels (uint8 images unless x_train is given)."""
    if x_train is None:
        x_train = np.zeros((len(y_train), 6, 6), np.uint8)
    return _save(
        tmp_path / "set.npz",
        x_train=x_train,
        y_train=np.asarray(y_train),
        x_test=np.zeros((len(y_test), 6, 6), x_train.dtype),
        y_test=np.asarray(y_test),
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_float_images_must_be_finite(tmp_path, bad):
    x = np.full((4, 6, 6), 0.5)
    x[1, 2, 3] = bad
    with pytest.raises(DataError, match=r"'x_train' must hold finite values .*1 are NaN or inf"):
        load_npz(_npz(tmp_path, x_train=x))


def test_npz_labels_with_gaps_need_num_classes(tmp_path):
    path = _npz(tmp_path, y_train=(0, 1, 2, 99), y_test=(1, 3))
    with pytest.raises(DataError, match=r"found 0-3, 99: .* set dataset.num_classes=100"):
        load_npz(path)
    data = load_dataset(DataConfig(name="npz", path=path, num_classes=100))
    assert data.num_classes == 100 and data.y_train.max() == 99


def test_npz_labels_must_be_below_num_classes(tmp_path):
    path = _npz(tmp_path, y_train=(0, 1, 2, 10), y_test=(1, 2))
    with pytest.raises(DataError, match=r"y_train labels must be below dataset.num_classes=10"):
        load_npz(path, num_classes=10)
    with pytest.raises(DataError, match="num_classes must be at least 2"):
        load_npz(_npz(tmp_path, y_train=(0, 0), y_test=(0,)), num_classes=1)
    assert load_npz(path, num_classes=12).num_classes == 12


def test_data_config_round_trips_through_run_config_json():
    # Fails when the stream node is lost or not rebuilt as a StreamConfig from its dict.
    streamed = DataConfig(name="imagenette", stream=StreamConfig(image_size=64, cache=True))
    for cfg in (DataConfig(name="npz", path="x.npz", num_classes=5), streamed):
        back = RunConfig.from_dict(json.loads(json.dumps({"dataset": asdict(cfg)}))).dataset
        assert back == cfg
    assert DataConfig(name="imagenet2012").stream == StreamConfig()
    assert DataConfig(name="cifar10").stream is None


@pytest.mark.parametrize(
    "fields,error,message",
    [
        (
            {"name": "cifar10", "crop": 4},
            ConfigError,
            r"unknown dataset key\(s\) crop; valid: .*crop_padding",
        ),
        (
            {"name": "imagenette", "stream": {"size": 8}},
            ConfigError,
            r"unknown dataset.stream key\(s\) size",
        ),
        (
            {"name": "cifar10", "stream": {}},
            DataError,
            "cifar10' is held in memory: remove dataset.stream",
        ),
        (
            {"name": "digits", "num_classes": 10},
            DataError,
            "num_classes applies to dataset=npz only",
        ),
        ({"name": "imagenet21k"}, DataError, "dataset must be one of cifar10"),
        ({"name": "digits", "normalization": "zca"}, DataError, "normalization must be one of"),
    ],
)
def test_data_config_names_what_is_valid(fields, error, message):
    with pytest.raises(error, match=message):
        RunConfig.from_dict({"dataset": fields})


def test_npz_not_a_file_or_pickled(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(str(bad))
    with pytest.raises(DataError, match="not found"):
        load_npz(str(tmp_path / "missing.npz"))
    obj = _save(
        tmp_path / "obj.npz",
        x_train=np.array([None] * 4, dtype=object),
        y_train=np.zeros(4, int),
        x_test=np.zeros((2, 6, 6), np.uint8),
        y_test=np.zeros(2, int),
    )
    with pytest.raises(DataError, match="without pickle"):
        load_npz(obj)


def test_hold_out_rejects_too_large_validation():
    data = load_dataset(DataConfig(name="digits"))
    with pytest.raises(DataError, match="below the training set size"):
        hold_out_validation(data, 10_000)


def test_pixel_mean_normalisation_centres_the_training_set():
    x = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    mean, std = aug.normalization_stats(x, "pixel_mean")
    assert mean.shape == (4, 4, 3) and np.all(std == 1)
    out = np.asarray(aug.normalize(jnp.asarray(x), mean, std))
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-5)
    mean, std = aug.normalization_stats(x, "channel_std")
    out = np.asarray(aug.normalize(jnp.asarray(x), mean, std))
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=1e-3)


def test_crops_stay_inside_the_padded_image():
    # Each image holds the index of its pixel: a crop is a shifted window of that ramp.
    h = w = 8
    ramp = (np.arange(h)[:, None] * 100 + np.arange(w)[None, :] + 1).astype(np.float32)
    x = jnp.broadcast_to(jnp.asarray(ramp)[None, :, :, None], (256, h, w, 1))
    out = np.asarray(aug.random_crop(jax.random.key(0), x, 4))
    assert out.shape == x.shape
    for img in out:
        nz = np.argwhere(img[..., 0] > 0)
        assert len(nz) > 0  # the window always overlaps the image (|shift| <= 4 < 8)
        r0, c0 = nz[0]
        v = img[r0, c0, 0] - 1
        dr, dc = int(v // 100) - r0, int(v % 100) - c0
        assert -4 <= dr <= 4 and -4 <= dc <= 4
        # the visible part is exactly the shifted original, the rest is zero padding
        rows = np.arange(h)[:, None] + dr
        cols = np.arange(w)[None, :] + dc
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        expected = np.where(inside, rows * 100 + cols + 1, 0)
        np.testing.assert_array_equal(img[..., 0], expected)
    shifts = {tuple(np.argwhere(img[..., 0] > 0)[0]) for img in out}
    assert len(shifts) > 20  # offsets really vary


def test_flips_happen_on_about_half_the_images():
    x = jnp.broadcast_to(jnp.arange(8.0)[None, None, :, None], (2000, 4, 8, 1))
    out = np.asarray(aug.random_flip(jax.random.key(1), x))
    flipped = np.all(out[:, 0, :, 0] == np.arange(8.0)[::-1], axis=1)
    kept = np.all(out[:, 0, :, 0] == np.arange(8.0), axis=1)
    assert np.all(flipped | kept)
    assert 0.45 < flipped.mean() < 0.55


def test_augment_off_is_identity():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    np.testing.assert_array_equal(aug.augment(jax.random.key(2), x, 0, False), x)


# Runs experiments.train in a Python where TensorFlow and TFDS are not installed (a None entry
# in sys.modules makes both `import` and importlib.util.find_spec see no module).
WITHOUT_TENSORFLOW = """
import runpy, sys

sys.modules.update(tensorflow=None, tensorflow_datasets=None)
sys.argv = ["experiments.train", *sys.argv[1:]]
runpy.run_module("experiments.train", run_name="__main__")
"""


def test_digits_train_without_tensorflow_and_tfds_sets_name_the_extra(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    def train(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", WITHOUT_TENSORFLOW, *args, "trainer.progress=false"]
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)

    tiny = ["depth=8", "trainer.iterations=2", "trainer.log_every=2", "trainer.eval_every=2"]
    done = train(
        "dataset=digits", *tiny, "trainer.checkpoint_every=2", f"hydra.run.dir={tmp_path / 'd'}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"status": "completed"' in (tmp_path / "d" / "summary.json").read_text()
    refused = train("dataset=cifar10", f"hydra.run.dir={tmp_path / 'c'}")
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-3000:]
    assert ".venv/bin/pip install -e '.[tfds]'" in errors[0]  # a clone's command, not PyPI's
