"""Drop-in `lax.conv_general_dilated` with a custom VJP whose backward pass is fast on CPU."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

ConvFn = Callable[..., jax.Array]

# Dimension numbers that flax.nnx.Conv passes for 2-D inputs (NHWC, HWIO, NHWC).
_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)
_DN = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers: Any) -> bool:
    """True when `dimension_numbers` describe NHWC input, HWIO kernel and NHWC output."""
    if dimension_numbers is None:
        return False
    try:
        dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
    except (TypeError, ValueError):
        return False
    return tuple(dn) == tuple(_NHWC)


def _all_one(dilation: Sequence[int] | None) -> bool:
    return dilation is None or all(d == 1 for d in dilation)


def _explicit_pads(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
) -> tuple[tuple[int, int], ...]:
    """Resolve 'SAME'/'VALID'/pairs to explicit (lo, hi) pairs for the two spatial dims."""
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[0:2], strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _fast_supported(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    batch_group_count: int,
    preferred_element_type: Any,
    out_sharding: Any,
) -> bool:
    """Whether the fast path handles this call (2-D NHWC/HWIO, no dilation, no groups)."""
    if lhs.ndim != 4 or rhs.ndim != 4 or len(window_strides) != 2:
        return False
    if not _is_nhwc(dimension_numbers):
        return False
    if not (_all_one(lhs_dilation) and _all_one(rhs_dilation)):
        return False
    if feature_group_count != 1 or batch_group_count != 1 or out_sharding is not None:
        return False
    if lhs.dtype != rhs.dtype or not jnp.issubdtype(lhs.dtype, jnp.floating):
        return False
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != lhs.dtype:
        return False
    if isinstance(padding, str):
        return padding.upper() in ("SAME", "VALID")
    pads = tuple(padding)
    return len(pads) == 2 and all(lo >= 0 and hi >= 0 for lo, hi in pads)


def _conv(x, w, strides, pads, precision):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN, precision=precision)


def _materialize(x: jax.Array) -> jax.Array:
    """Return a copy of `x` made by an op that XLA cannot fuse its producers into.

    XLA's kernel gradient transposes the conv input from NHWC to CHWN. XLA:CPU fuses the
    cheap elementwise producers of x (BatchNorm, ReLU, whole residual chains) into that
    transpose and recomputes them in a cache-hostile strided loop: up to ~100 ms per layer
    at 128x32x32x16. `lax.optimization_barrier` does not stop this (XLA:CPU strips it
    before fusion), but a convolution is never fused into, so an identity 1x1 conv makes
    the transpose read a materialised array (about 2-3 ms instead).
    """
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)[None, None]
    # HIGHEST so the copy is exact even where the default precision rounds (TF32 on GPU).
    return lax.conv_general_dilated(
        x, eye, (1, 1), "VALID", dimension_numbers=_DN, precision=lax.Precision.HIGHEST
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fast_conv(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision)


def _fast_conv_fwd(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision), (x, w)


def _fast_conv_bwd(strides, pads, precision, res, dy):
    x, w = res
    if strides == (1, 1):
        dx = _input_grad(dy, w, pads, precision)
        return dx, _kernel_grad(_materialize(x), dy, pads, precision)
    # dX: XLA's own transpose (a conv with the flipped kernel); the im2col matmul dy @ W^T
    # plus col2im was 4-10x slower. For strided convs, one stride-1 conv per input phase
    # (skipping the zeros of the dilated dy) was faster with XLA's multi-threaded convs but
    # slower on the single-threaded devices of resnet_flax.training.cpu_devices, so it was removed.
    (dx,) = jax.linear_transpose(
        lambda x_: _conv(x_, w, strides, pads, precision), jax.ShapeDtypeStruct(x.shape, x.dtype)
    )(dy)
    # dW: XLA's kernel-gradient conv is fast once its input is materialised (see
    # _materialize); one im2col matmul or k*k shifted matmuls were 2-6x slower on CPU.
    xm = _materialize(x)
    (dw,) = jax.linear_transpose(
        lambda w_: _conv(xm, w_, strides, pads, precision), jax.ShapeDtypeStruct(w.shape, w.dtype)
    )(dy)
    return dx, dw


def _input_grad(dy, w, pads, precision):
    """dX of a stride-1 conv as a forward NHWC/HWIO conv of dy with the flipped kernel.

    Written out, not left to autodiff: inside a loop (a scanned stage) XLA:CPU keeps the
    transposed conv's odd dimension order and runs it on a slow generic path.
    """
    kh, kw = w.shape[:2]
    flipped = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))
    back_pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), pads, strict=True))
    return _conv(dy, flipped, (1, 1), back_pads, precision)


def _kernel_grad(x, dy, pads, precision):
    """dW of a stride-1 conv as a forward NHWC/HWIO conv: channels as batch, images as features.

    dW[i, j, c, o] = sum over n, h, w of x_pad[n, h + i, w + j, c] * dy[n, h, w, o], i.e. the
    (C, H, W, N) input convolved with the (Ho, Wo, N, O) window; explicit for the same reason
    as _input_grad.
    """
    x_cf = jnp.transpose(x, (3, 1, 2, 0))
    dy_win = jnp.transpose(dy, (1, 2, 0, 3))
    return jnp.transpose(_conv(x_cf, dy_win, (1, 1), pads, precision), (1, 2, 0, 3))


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)


def _conv_as_matmul(x, w, strides, pads, precision):
    """The conv as one matrix product of the input's patches (im2col); autodiff as usual.

    For maps smaller than the kernel (a 3x3 conv on the 2x2 maps of 8x8 inputs' last stage)
    XLA:CPU folds the padding into a reversed window that its fast conv path does not take:
    forward and gradients of a 3x3 64->64 conv on 128x2x2 took 10.7 ms, this 1.1 ms (one
    thread). From 4x4 maps on the convolutions are faster (4x4: 1.1 vs 1.3 ms; 32x32: 13 vs
    47 ms), so only the smaller maps come here.
    """
    kh, kw, cin, cout = w.shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    n, hp, wp, _ = xp.shape
    oh, ow = (hp - kh) // strides[0] + 1, (wp - kw) // strides[1] + 1
    taps = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (n, i + (oh - 1) * strides[0] + 1, j + (ow - 1) * strides[1] + 1, cin),
            (1, strides[0], strides[1], 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.concatenate(taps, axis=-1).reshape(n * oh * ow, kh * kw * cin)
    out = jnp.dot(patches, w.reshape(kh * kw * cin, cout), precision=precision)
    return out.reshape(n, oh, ow, cout)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """Same semantics as `jax.lax.conv_general_dilated`, with a CPU-fast backward pass.

    Calls that the fast path supports (2-D, NHWC input, HWIO kernel, NHWC output, no
    dilation, one feature/batch group, floating inputs of one dtype) use a custom VJP;
    every other call goes to `lax.conv_general_dilated` unchanged.
    """
    if not _fast_supported(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        preferred_element_type,
        out_sharding,
    ):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_pads(lhs.shape, rhs.shape, strides, padding)
    if lhs.shape[1] < rhs.shape[0] or lhs.shape[2] < rhs.shape[1]:
        return _conv_as_matmul(lhs, rhs, strides, pads, precision)
    return _fast_conv(lhs, rhs, strides, pads, precision)


def select_conv(impl: str) -> ConvFn:
    """The convolution to pass as `nnx.Conv(..., conv_general_dilated=...)`.

    `impl` is "fast" (this module's custom-VJP conv) or "xla" (`lax.conv_general_dilated`);
    models.spec.for_backend decides "auto" (fast on CPU; on GPU/TPU XLA's are already fast).
    """
    if impl == "fast":
        return conv_general_dilated
    if impl == "xla":
        return lax.conv_general_dilated
    raise ValueError(f"conv_impl must be 'fast' or 'xla' here, got {impl!r}")
