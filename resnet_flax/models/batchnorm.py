"""BatchNorm whose training statistics come from fixed-size groups of images (the paper's GPUs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_flax.models.spec import check_bn_batch


class GroupBatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` that normalises each group of `group` consecutive images on its own.

    He et al. 2015 trained batch 128 on two GPUs, and the frameworks of the time normalised
    each GPU's 64 images with their own mean and variance. `group=64` reproduces that on any
    number of devices (the groups are fixed by the batch, not by the hardware). With groups
    that lie on one device, training needs no all-reduce per BatchNorm, only the gradients'.
    `group=None` (or the whole batch) is `nnx.BatchNorm` unchanged. Inference uses the running
    averages either way; they move towards the mean over groups of each statistic.
    """

    def __init__(self, num_features: int, *, group: int | None = None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.group = group

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask=None):
        """Normalise `x` (batch first, features last) by its groups' statistics in training."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        # None falls through to nnx.BatchNorm, which explains how to set it.
        whole_batch = self.group is None or x.shape[0] == self.group
        if use_running_average or use_running_average is None or whole_batch:
            return super().__call__(x, use_running_average, mask=mask)
        if mask is not None:
            raise ValueError("GroupBatchNorm does not take a mask with group statistics")
        check_bn_batch(self.group, x.shape[0])  # SpecError, a ValueError
        # Statistics in at least float32, as nnx.BatchNorm computes them.
        out_dtype = x.dtype if self.dtype is None else self.dtype
        stat_dtype = jnp.promote_types(out_dtype, jnp.float32)
        groups = x.reshape((x.shape[0] // self.group, self.group) + x.shape[1:]).astype(stat_dtype)
        within = tuple(range(1, groups.ndim - 1))
        mean = groups.mean(within, keepdims=True)
        # E[x^2] - E[x]^2 clipped at 0: nnx.BatchNorm's default (use_fast_variance).
        var = jnp.maximum((groups * groups).mean(within, keepdims=True) - mean * mean, 0.0)
        across = tuple(range(groups.ndim - 1))
        m = self.momentum
        self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean.mean(across))
        self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var.mean(across))
        mul = jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            mul = mul * self.scale[...]
        y = (groups - mean) * mul
        if self.bias is not None:
            y = y + self.bias[...]
        return y.reshape(x.shape).astype(out_dtype)
