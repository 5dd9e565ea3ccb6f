"""On-device input processing: normalisation and the paper's pad-crop-flip augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def normalization_stats(x_train: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std images (on the [0, 1] scale) from the training split only.

    pixel_mean: the paper's per-pixel mean subtraction (std 1); channel_std: per-channel
    mean and std, broadcast to the image shape so both share one code path.
    """
    x = x_train.astype(np.float64) / 255.0
    if kind == "pixel_mean":
        mean = x.mean(axis=0)
        std = np.ones_like(mean)
    else:
        mean = np.broadcast_to(x.mean(axis=(0, 1, 2)), x.shape[1:])
        std = np.broadcast_to(x.std(axis=(0, 1, 2)) + 1e-8, x.shape[1:])
    return mean.astype(np.float32), std.astype(np.float32)


def normalize(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """uint8 images to float32, mean-subtracted (and scaled when std is not 1)."""
    return (x.astype(jnp.float32) / 255.0 - mean) / std


def random_crop(key: jax.Array, x: jax.Array, padding: int) -> jax.Array:
    """Zero-pad each image by `padding` pixels and cut a random window of the original size."""
    if padding <= 0:
        return x
    n, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    """Mirror each image horizontally with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def augment(key: jax.Array, x: jax.Array, padding: int, flip: bool) -> jax.Array:
    """The paper's training augmentation on normalised images (zero padding = the mean pixel)."""
    crop_key, flip_key = jax.random.split(key)
    x = random_crop(crop_key, x, padding)
    return random_flip(flip_key, x) if flip else x
