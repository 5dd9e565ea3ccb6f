"""Micro-benchmark of the convolution passes: XLA's autodiff vs resnet_flax.models.conv's fast VJP.

For each layer shape it times, under jit on the CPU, the forward pass, the kernel
gradient (dW) and the input gradient (dX) of `lax.conv_general_dilated` ("xla") and of
`resnet_flax.models.conv.conv_general_dilated` ("fast"), plus (with --all) the matrix-product
alternatives for dW and the forward pass. The convolution input is
produced inside the jitted function by a BatchNorm/ReLU/residual-like elementwise chain,
as in a real network: that is what makes XLA's own kernel gradient slow (it fuses the
chain into a strided NHWC->CHWN transpose).

With --torch it also times PyTorch eager's convolution at the same shapes (oneDNN; NCHW, its
default, and channels-last): forward, dW, dX, and fwd+dW+dX (all three, as a training step
runs them), after all of JAX's timings (PyTorch's OpenMP threads keep spinning after its
ops). --one-core pins the process to one core and runs XLA single-threaded and PyTorch on
one thread: the per-core comparison, as each device of resnet_flax.training.cpu_devices runs.

Run: python -m benchmarks.conv [--all] [--torch] [--one-core] [--batch 64] [--reps 7]
Times are the minimum over --reps runs (the machine is shared; the minimum is the least
disturbed), in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.common import exit_code, parser, require_torch
from resnet_flax.models import conv as fastconv
from resnet_flax.rundir import git_commit
from resnet_flax.training.cpu_devices import pin_cores, usable_cores

DN = ("NHWC", "HWIO", "NHWC")

# (name, batch, height=width, Cin, Cout, kernel, stride, padding)
SHAPES = [
    ("3x3 s1 32x32 16->16", 128, 32, 16, 16, 3, 1, 1),
    ("3x3 s1 16x16 32->32", 128, 16, 32, 32, 3, 1, 1),
    ("3x3 s1 8x8 64->64", 128, 8, 64, 64, 3, 1, 1),
    ("3x3 s2 32x32 16->32", 128, 32, 16, 32, 3, 2, 1),
    ("1x1 s2 32x32 16->32", 128, 32, 16, 32, 1, 2, 0),
    ("7x7 s2 112x112 3->64", 16, 112, 3, 64, 7, 2, 3),
]


def _timeit(fn: Callable, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _producer(z: jax.Array, s: jax.Array, b: jax.Array) -> jax.Array:
    """A residual-stream-like elementwise chain (what feeds a conv in a ResNet)."""
    h = z
    for _ in range(3):
        h = jax.nn.relu(h * s + b + h)
    return h


def _dw_im2col(x, dy, k, stride, pad):
    """Kernel gradient as ONE matmul: patches (N*Ho*Wo, k*k*Cin)^T @ dy (N*Ho*Wo, Cout)."""
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = dy.shape[1:3]
    cols = [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
        for i in range(k)
        for j in range(k)
    ]
    p = jnp.concatenate(cols, -1).reshape(-1, k * k * x.shape[-1])
    g = lax.dot_general(p, dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())))
    return g.reshape(k, k, x.shape[-1], dy.shape[-1])


def _dw_shifted(x, dy, k, stride, pad):
    """Kernel gradient as k*k shifted matmuls (N*Ho*Wo, Cin)^T @ (N*Ho*Wo, Cout)."""
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = dy.shape[1:3]
    d = dy.reshape(-1, dy.shape[-1])
    out = [
        lax.dot_general(
            xp[
                :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride
            ].reshape(-1, x.shape[-1]),
            d,
            (((0,), (0,)), ((), ())),
        )
        for i in range(k)
        for j in range(k)
    ]
    return jnp.stack(out).reshape(k, k, x.shape[-1], dy.shape[-1])


def _fwd_im2col(x, w, stride, pad):
    """Forward as ONE matmul: patches (N*Ho*Wo, k*k*Cin) @ W (k*k*Cin, Cout)."""
    k = w.shape[0]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (xp.shape[1] - k) // stride + 1
    cols = [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (ho - 1) + 1 : stride]
        for i in range(k)
        for j in range(k)
    ]
    p = jnp.concatenate(cols, -1)
    return p.reshape(-1, p.shape[-1]) @ w.reshape(-1, w.shape[-1])


def _torch_rows(shapes: list[tuple], reps: int) -> None:
    """PyTorch eager's forward, dW, dX and all three at each shape, NCHW and channels-last.

    dW and dX each run one backward of a kept graph (the kernel alone); fwd+dW+dX builds a
    new graph every time, as training does (PyTorch then also reorders to oneDNN's layouts).
    """
    import torch

    def best(fn: Callable) -> float:
        fn()
        out = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t)
        return out * 1e3

    torch.manual_seed(0)
    for name, n, hw, cin, cout, k, stride, pad in shapes:
        for impl, fmt in (("torch", torch.contiguous_format), ("t-cl", torch.channels_last)):
            conv = torch.nn.Conv2d(cin, cout, k, stride, pad, bias=False)
            conv = conv.to(memory_format=fmt)
            x = torch.randn(n, cin, hw, hw).to(memory_format=fmt).requires_grad_()
            y = conv(x)  # one graph; each backward below runs only the requested gradient
            dy = torch.randn_like(y)

            def fwd(conv=conv, x=x):
                with torch.no_grad():
                    conv(x)

            def dw(conv=conv, y=y, dy=dy):
                torch.autograd.grad(y, conv.weight, dy, retain_graph=True)

            def dx(x=x, y=y, dy=dy):
                torch.autograd.grad(y, x, dy, retain_graph=True)

            def step(conv=conv, x=x, dy=dy):  # what a training step runs: a fresh graph
                torch.autograd.grad(conv(x), (x, conv.weight), dy)

            row = [best(fwd), best(dw), best(dx), best(step)]
            print(f"{name:24s} {impl:5s} " + " ".join(f"{v:10.1f}" for v in row), flush=True)


def _residual_stack(conv: Callable, x: jax.Array, ws: list[jax.Array]) -> jax.Array:
    """Residual blocks conv -> affine -> ReLU (+ skip): the pattern that trips XLA's dW."""
    for w in ws:
        h = conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
        x = jax.nn.relu(h * 0.5 + 0.1 + x)
    return x


def main(argv: list[str] | None = None) -> int:
    """Print the tables; one error line without PyTorch for --torch."""
    return exit_code(lambda: conv_tables(parse_args(argv), argv))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's command line."""
    ap = parser("benchmarks.conv", __doc__)
    ap.add_argument("--all", action="store_true", help="also time the matmul alternatives")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--torch", action="store_true", help="also time PyTorch eager's conv")
    ap.add_argument(
        "--one-core",
        action="store_true",
        help="pin to one core: XLA single-threaded, PyTorch on one thread (per-core numbers)",
    )
    ap.add_argument("--batch", type=int, default=128, help="batch of the CIFAR-shaped layers")
    return ap.parse_args(argv)


def conv_tables(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Time every layer shape, then the residual stacks."""
    if args.torch:
        require_torch("--torch")
    if args.one_core:
        pin_cores(1)
        # read when XLA's CPU client starts, which is at the first computation below
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        ).strip()
    if args.torch:
        import torch

        torch.set_num_threads(1 if args.one_core else usable_cores())
    shapes = [(s[0], args.batch if s[1] == 128 else s[1], *s[2:]) for s in SHAPES]
    words = argv if argv is not None else sys.argv[1:]
    print(f"command: python -m benchmarks.conv {' '.join(words)}  ")
    print(f"commit: {git_commit()}  ")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, min of {args.reps} runs, ms")
    cols = ["fwd", "dW", "dX", "fwd+dW+dX"] + (
        ["dW im2col", "dW shifted", "fwd im2col"] if args.all else []
    )
    print(f"{'layer':24s} {'impl':5s} " + " ".join(f"{c:>10s}" for c in cols))
    key = jax.random.PRNGKey(0)
    for name, n, hw, cin, cout, k, stride, pad in shapes:
        z = jax.random.normal(key, (n, hw, hw, cin), jnp.float32)
        s = jnp.full((cin,), 0.5)
        b = jnp.full((cin,), 0.1)
        w = jax.random.normal(key, (k, k, cin, cout), jnp.float32) * 0.1
        pads = ((pad, pad), (pad, pad))
        ho = (hw + 2 * pad - k) // stride + 1
        dy = jax.random.normal(key, (n, ho, ho, cout), jnp.float32)
        for impl, conv in (
            ("xla", lax.conv_general_dilated),
            ("fast", fastconv.select_conv("fast")),
        ):

            def f(x, w, conv=conv, strides=(stride, stride), pads=pads):
                return conv(x, w, strides, pads, dimension_numbers=DN)

            fwd = jax.jit(lambda z, s, b, w, f=f: f(_producer(z, s, b), w))
            dw = jax.jit(
                lambda z, s, b, w, dy, f=f: jax.vjp(lambda w: f(_producer(z, s, b), w), w)[1](dy)[0]
            )
            dx = jax.jit(
                lambda z, s, b, w, dy, f=f: jax.vjp(lambda x: f(x, w), _producer(z, s, b))[1](dy)[0]
            )

            def train_pass(z, s, b, w, dy, f=f):
                """Forward output and both gradients, as a training step needs them."""
                y, vjp = jax.vjp(f, _producer(z, s, b), w)
                return y, vjp(dy)

            all3 = jax.jit(train_pass)
            row = [
                _timeit(fwd, z, s, b, w, reps=args.reps),
                _timeit(dw, z, s, b, w, dy, reps=args.reps),
                _timeit(dx, z, s, b, w, dy, reps=args.reps),
                _timeit(all3, z, s, b, w, dy, reps=args.reps),
            ]
            if args.all and impl == "fast":
                for alt in (_dw_im2col, _dw_shifted):
                    g = jax.jit(
                        lambda z, s, b, dy, alt=alt, a=(k, stride, pad): alt(
                            _producer(z, s, b), dy, *a
                        )
                    )
                    row.append(_timeit(g, z, s, b, dy, reps=args.reps))
                g = jax.jit(
                    lambda z, s, b, w, a=(stride, pad): _fwd_im2col(_producer(z, s, b), w, *a)
                )
                row.append(_timeit(g, z, s, b, w, reps=args.reps))
            print(f"{name:24s} {impl:5s} " + " ".join(f"{v:10.1f}" for v in row), flush=True)
    if args.torch:
        _torch_rows(shapes, args.reps)
    _stack_rows(args.batch, args.reps)
    return 0


def _stack_rows(batch: int, reps: int) -> None:
    """fwd+bwd of residual conv stacks at the three CIFAR stage shapes, XLA's conv vs ours."""
    key = jax.random.PRNGKey(0)
    blocks = "6 residual 3x3 conv blocks (conv, affine, ReLU, skip)"
    print(f"\nfwd+bwd of {blocks}, batch {batch}, ms")
    for hw, c in ((32, 16), (16, 32), (8, 64)):
        x = jax.random.normal(key, (batch, hw, hw, c), jnp.float32)
        ws = [jax.random.normal(key, (3, 3, c, c)) * 0.05 for _ in range(6)]
        row = []
        for conv in (lax.conv_general_dilated, fastconv.select_conv("fast")):
            g = jax.jit(jax.grad(lambda ws, x, conv=conv: _residual_stack(conv, x, ws).sum()))
            row.append(_timeit(g, ws, x, reps=reps))
        print(f"{hw}x{hw}x{c:<3d}  xla {row[0]:7.1f}   fast {row[1]:7.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
