"""The custom-VJP convolution matches lax.conv_general_dilated in value and gradients."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from resnet_flax.models.conv import conv_general_dilated, select_conv

DN = ("NHWC", "HWIO", "NHWC")

# (input NHWC shape, kernel size, Cout, strides, padding)
CASES = [
    ((2, 8, 8, 4), 3, 5, (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), 3, 6, (2, 2), ((1, 1), (1, 1))),
    ((2, 7, 9, 3), 3, 4, (2, 2), ((1, 1), (1, 1))),  # odd sizes
    ((2, 8, 8, 4), 3, 6, (2, 2), "SAME"),  # asymmetric (0, 1) padding
    ((2, 7, 9, 3), 3, 4, (1, 1), "SAME"),
    ((2, 8, 7, 3), 3, 4, (1, 1), ((0, 2), (2, 1))),  # stride 1, uneven explicit pads
    ((2, 8, 8, 4), 1, 6, (1, 1), ((0, 0), (0, 0))),
    ((2, 8, 8, 4), 1, 6, (2, 2), "VALID"),
    ((2, 7, 9, 4), 1, 6, (2, 2), ((0, 0), (0, 0))),
    ((2, 16, 16, 3), 7, 8, (2, 2), ((3, 3), (3, 3))),
    ((2, 11, 13, 3), 7, 8, (2, 2), ((3, 3), (3, 3))),
    # maps smaller than the kernel: computed as one matmul of patches
    ((2, 2, 2, 4), 3, 5, (1, 1), ((1, 1), (1, 1))),
    ((2, 1, 1, 4), 3, 5, (1, 1), "SAME"),
    ((2, 2, 3, 4), 3, 6, (2, 2), ((1, 1), (1, 1))),
    ((2, 2, 2, 4), 3, 6, (2, 2), "SAME"),
]
IDS = [
    f"{c[0][1]}x{c[0][2]}-k{c[1]}-s{c[3][0]}-{c[4] if isinstance(c[4], str) else 'pad'}"
    for c in CASES
]


def _data(shape, k, cout, dtype=jnp.float32, seed=0):
    # numpy random numbers: jax.random would add a threefry compile to every test.
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1], cout), np.float32) * 0.3, dtype)
    return x, w, seed


def _fwd_and_grads(conv, x, w, strides, padding, seed):
    f = lambda x, w: conv(x, w, strides, padding, dimension_numbers=DN)
    y, vjp = jax.vjp(f, x, w)
    dy = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(y.shape, np.float32), y.dtype)
    return (y, *vjp(dy))


def _assert_close(got, want, rtol=1e-5, atol=1e-5):
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(np.float32(g), np.float32(r), rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape,k,cout,strides,padding", CASES, ids=IDS)
def test_matches_lax_forward_and_gradients(shape, k, cout, strides, padding):
    x, w, kd = _data(shape, k, cout)
    run = jax.jit(_fwd_and_grads, static_argnums=(0, 3, 4, 5))
    want = run(lax.conv_general_dilated, x, w, strides, padding, kd)
    got = run(conv_general_dilated, x, w, strides, padding, kd)
    _assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The fast path is really the one taken: a custom VJP, or a matmul for maps smaller
    # than the kernel.
    jaxpr = str(
        jax.make_jaxpr(lambda x, w: conv_general_dilated(x, w, strides, padding, None, None, DN))(
            x, w
        )
    )
    if shape[1] < k or shape[2] < k:
        assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
    else:
        assert "custom_vjp_call" in jaxpr


def test_bf16_within_tolerance():
    x, w, kd = _data((2, 8, 8, 4), 3, 6, dtype=jnp.bfloat16)
    run = jax.jit(_fwd_and_grads, static_argnums=(0, 3, 4, 5))
    got = run(conv_general_dilated, x, w, (1, 1), ((1, 1), (1, 1)), kd)
    want = run(lax.conv_general_dilated, x, w, (1, 1), ((1, 1), (1, 1)), kd)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    _assert_close(got, want, rtol=5e-2, atol=5e-2)


def _loss(conv, x, w):
    y = conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
    return jnp.sum(jnp.sin(y))


@pytest.mark.parametrize("transform", ["vmap", "scan", "checkpoint"])
def test_under_transformations(transform):
    x, w, _ = _data((3, 2, 6, 6, 4), 3, 4)  # leading axis of 3 for vmap/scan
    ws = jnp.stack([w, w * 0.5, -w])

    def run(conv):
        if transform == "vmap":
            g = jax.vmap(jax.grad(lambda x, w: _loss(conv, x, w), argnums=(0, 1)))
            return g(x, ws)
        if transform == "scan":

            def body(h, w):
                h = jax.nn.relu(conv(h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN))
                return h, None

            f = lambda x0, ws: jnp.sum(lax.scan(body, x0, ws)[0] ** 2)
            return jax.grad(f, argnums=(0, 1))(x[0], ws)
        f = jax.checkpoint(lambda x, w: _loss(conv, x, w))
        return jax.grad(f, argnums=(0, 1))(x[0], w)

    _assert_close(
        jax.jit(lambda: run(conv_general_dilated))(), run(lax.conv_general_dilated), 1e-4, 1e-4
    )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's compiled program")
def test_scanned_gradient_convolutions_stay_in_the_fast_layout():
    """In a scan, XLA:CPU runs a conv of another dimension order on a generic path (~40x slower).

    Autodiff's transposed convs (dX with a swapped kernel, dW with a CHWN input) kept their
    order inside while loops; every conv of the compiled gradient must be NHWC/HWIO.
    """
    x, w, _ = _data((4, 6, 6, 8), 3, 8)
    ws = jnp.stack([w, w * 0.5])

    def loss(ws, x0):
        def body(h, w):
            conv = conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
            return jax.nn.relu(conv) + h, None

        return jnp.sum(lax.scan(body, x0, ws)[0] ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(ws, x).compile().as_text()
    labels = re.findall(r"convolution\(.*?dim_labels=(\S+?),", hlo)
    assert len(labels) >= 3  # forward, dX and dW of the scanned block
    assert set(labels) == {"b01f_01io->b01f"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"feature_group_count": 2},
        {"rhs_dilation": (2, 2)},
        {"lhs_dilation": (2, 2)},
        {"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
        {"preferred_element_type": jnp.float32},  # with bf16 inputs
    ],
    ids=["groups", "rhs_dilation", "lhs_dilation", "nchw", "preferred_type"],
)
def test_unsupported_falls_back_to_lax(kwargs):
    x, w, _ = _data((2, 8, 8, 4), 3, 4)
    if kwargs.get("feature_group_count"):
        w = w[:, :, :2]
    if kwargs.get("dimension_numbers"):
        x, w = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
    kwargs = {"dimension_numbers": DN, **kwargs}
    if "preferred_element_type" in kwargs:
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    args = (x, w, (1, 1), ((1, 1), (1, 1)))
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv_general_dilated(x, w, *args[2:], **kwargs))(x, w))
    assert "custom_vjp_call" not in jaxpr
    grad = lambda conv: jax.jit(jax.grad(lambda w: jnp.sum(conv(x, w, *args[2:], **kwargs) ** 2)))
    want, got = grad(lax.conv_general_dilated)(w), grad(conv_general_dilated)(w)
    np.testing.assert_array_equal(np.float32(got), np.float32(want))


def test_select_conv():
    assert select_conv("xla") is lax.conv_general_dilated
    assert select_conv("fast") is conv_general_dilated
    for bad in ("auto", "cudnn"):  # "auto" is decided by models.spec.for_backend, never here
        with pytest.raises(ValueError):
            select_conv(bad)


@pytest.mark.parametrize("padding,strides", [("SAME", 2), (1, 1), ("VALID", 1)])
def test_nnx_conv_drop_in(padding, strides):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 9, 3), np.float32))

    def grads(fn):
        m = nnx.Conv(3, 5, (3, 3), strides=strides, padding=padding, rngs=nnx.Rngs(0))
        m.conv_general_dilated = fn
        return nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(m)

    got, want = grads(select_conv("fast")), grads(lax.conv_general_dilated)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_batch_sharded_jit():
    """Under jit with a NamedSharding along the batch axis (4 fake CPU devices)."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jax import lax
        from resnet_flax.models.conv import conv_general_dilated
        mesh = Mesh(np.array(jax.devices()), ("data",))
        x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 4))
        w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 4))
        x = jax.device_put(x, NamedSharding(mesh, P("data")))
        w = jax.device_put(w, NamedSharding(mesh, P()))
        def loss(conv, x, w):
            y = conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.sum(y ** 2)
        g = jax.jit(jax.grad(lambda x, w: loss(conv_general_dilated, x, w), argnums=(0, 1)))(x, w)
        r = jax.grad(lambda x, w: loss(lax.conv_general_dilated, x, w), argnums=(0, 1))(x, w)
        assert g[0].sharding.spec == P("data"), g[0].sharding
        for a, b in zip(g, r):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
        print("ok", len(jax.devices()))
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok 4" in out.stdout
