"""The layers a network is built of: conv + BatchNorm, pre-activation, option A's shortcut."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_flax.backend import current_backend
from resnet_flax.models.batchnorm import GroupBatchNorm
from resnet_flax.models.conv import select_conv
from resnet_flax.models.options import BRANCH, NetOptions, net_options
from resnet_flax.models.spec import ModelSpec, for_backend, resolve


def decided(spec: ModelSpec) -> ModelSpec:
    """The spec with its "auto" choices decided for this process's backend (a run's are)."""
    auto = "auto" in (spec.conv_impl, spec.stage_loop, spec.block)
    return for_backend(spec, current_backend()) if auto else spec


def _conv_fn(spec: ModelSpec) -> Callable:
    """The convolution primitive for this spec (XLA's, or the CPU-friendly custom VJP)."""
    return select_conv(decided(spec).conv_impl)


def _batch_norm(
    spec: ModelSpec, channels: int, *, zero_scale: bool = False, rngs: nnx.Rngs
) -> GroupBatchNorm:
    """The spec's BatchNorm: its momentum, epsilon, dtype and statistics group (bn_batch)."""
    return GroupBatchNorm(
        channels,
        group=spec.bn_batch,
        momentum=spec.bn_momentum,
        epsilon=spec.bn_epsilon,
        dtype=jnp.dtype(spec.precision),
        scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
        rngs=rngs,
    )


def window_padding(spec: ModelSpec, kernel: int, stride: int) -> str | tuple:
    """A conv or pool window's padding: (k-1)/2 each side, or TF's SAME where strided."""
    if spec.strided_padding == "same" and stride > 1:
        return "SAME"  # TF: the deficit split floor before, ceil after (0/1 on even maps)
    pad = (kernel - 1) // 2
    return ((pad, pad), (pad, pad))


def resolved_options(spec: ModelSpec, options: NetOptions | None) -> NetOptions:
    """The given options, or the spec's own (resolved here) when built without a ResNet."""
    return options if options is not None else net_options(resolve(spec))


class ConvBN(nnx.Module):
    """Convolution followed by BatchNorm (which may be zero-initialised), or by nothing.

    Its kernel and bias come from the options' init scheme for the layer's role; with BN
    (norm=batch) the He et al. 2015 conv has no bias.
    """

    def __init__(
        self,
        spec: ModelSpec,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        *,
        zero_scale: bool = False,
        bn: bool = True,
        padding: str | tuple | None = None,
        role: str = BRANCH,
        options: NetOptions | None = None,
        rngs: nnx.Rngs,
    ):
        options = resolved_options(spec, options)
        dtype = jnp.dtype(spec.precision)
        if padding is None:
            padding = window_padding(spec, kernel, stride)
        init = options.init.layer(role)
        self.conv = nnx.Conv(
            cin,
            cout,
            (kernel, kernel),
            strides=stride,
            padding=padding,
            use_bias=init.bias is not None,
            kernel_init=init.kernel,
            bias_init=init.bias or nnx.initializers.zeros,
            dtype=dtype,
            conv_general_dilated=_conv_fn(spec),
            rngs=rngs,
        )
        bn = bn and options.batch_norm
        self.bn = _batch_norm(spec, cout, zero_scale=zero_scale, rngs=rngs) if bn else None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self.conv(x)
        return y if self.bn is None else self.bn(y, use_running_average=not train)


class PreActBN(nnx.Module):
    """BatchNorm then the activation: what precedes a conv in He et al. 2016 (no BN: none)."""

    def __init__(
        self,
        spec: ModelSpec,
        channels: int,
        *,
        options: NetOptions | None = None,
        rngs: nnx.Rngs,
    ):
        options = resolved_options(spec, options)
        self.act = options.activation
        self.bn = _batch_norm(spec, channels, rngs=rngs) if options.batch_norm else None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.act(x if self.bn is None else self.bn(x, use_running_average=not train))


def option_a_shortcut(x: jax.Array, cout: int, stride: int) -> jax.Array:
    """Parameter-free shortcut: subsample spatially, zero-pad the new channels."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    extra = cout - x.shape[-1]
    if extra > 0:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x
