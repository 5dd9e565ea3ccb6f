"""What a spec's norm, activation, init and branch options make of each layer.

Each option is one object with one interface: an activation is a function, an init scheme
gives every layer role its kernel and bias initialisers, a branch mode gives a residual unit
(and the whole net) the scalars its source adds. Sources in docs/design.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_flax.models.initializers import DrawnByShape, dense_init, he_normal
from resnet_flax.models.spec import Architecture
from resnet_flax.models.tat import transformed_leaky_relu

Initializer = Callable[..., jax.Array]
zeros = nnx.initializers.zeros

# Layer roles an init scheme distinguishes.
STEM, BRANCH, LAST, PROJECTION, HEAD = "stem", "branch", "last", "projection", "head"


def _haar_q(a: np.ndarray) -> np.ndarray:
    """Q of a (stack of) Gaussian matrices, signs fixed by R's diagonal: Haar-distributed."""
    q, r = np.linalg.qr(a)
    return (q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]).astype(a.dtype)


def orthogonal(key: jax.Array, rows: int, cols: int, dtype=jnp.float32) -> jax.Array:
    """A Haar-random rows x cols matrix with orthonormal rows or columns (the shorter side).

    The QR runs in numpy on the host: jaxlib's CPU QR kernels split a batch over XLA's
    thread pool and wait for it, and two of them running at once (the stacked blocks of a
    net of depth 44 or more, drawn in one program) hung forever on 2 cores.
    """
    tall = (max(rows, cols), min(rows, cols))
    gauss = jax.random.normal(key, tall, jnp.float32)
    result = jax.ShapeDtypeStruct(tall, jnp.float32)
    q = jax.pure_callback(_haar_q, result, gauss, vmap_method="expand_dims")
    return (q if rows >= cols else q.T).astype(dtype)


# Each scale's initializer is made once, so its per-shape programs serve every network.
@cache
def delta_orthogonal(scale: float) -> Initializer:
    """Xiao et al. 2018's kernel: scale times an orthogonal c_in x c_out centre tap (needs
    c_in <= c_out, checked by the spec), zeros elsewhere."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        centre = tuple(s // 2 for s in shape[:-2])
        matrix = scale * orthogonal(key, *shape[-2:], dtype)
        return jnp.zeros(shape, dtype).at[centre].set(matrix)

    return DrawnByShape(init)


@cache
def normal(stddev: float) -> Initializer:
    """N(0, stddev^2), one program per shape."""
    return DrawnByShape(nnx.initializers.normal(stddev))


@cache
def he_normal_fan_out(variance: float) -> Initializer:
    """N(0, variance / fan_out), one program per shape."""
    return DrawnByShape(nnx.initializers.variance_scaling(variance, "fan_out", "normal"))


def _suo_delta(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """DKS/TAT's scaled uniform orthogonal init: a Haar-orthogonal c_in x c_out matrix times
    max(sqrt(c_out / c_in), 1), at a conv kernel's centre tap (zeros elsewhere); a dense
    kernel is the matrix itself (dks/jax/parameter_sampling_functions.py)."""
    cin, cout = shape[-2:]
    matrix = max(math.sqrt(cout / cin), 1.0) * orthogonal(key, cin, cout, dtype)
    if len(shape) == 2:
        return matrix
    centre = tuple(s // 2 for s in shape[:-2])
    return jnp.zeros(shape, dtype).at[centre].set(matrix)


suo_delta = DrawnByShape(_suo_delta)


@dataclass(frozen=True)
class LayerInit:
    """A layer's kernel initialiser and its bias initialiser (None: the layer has no bias)."""

    kernel: Initializer
    bias: Initializer | None = None


@dataclass(frozen=True)
class HeInit:
    """He et al. 2015's N(0, 2/fan_in) for every conv; a zero bias where BatchNorm is gone."""

    bias: bool

    def layer(self, role: str) -> LayerInit:
        """The initialisers of a layer in this role."""
        if role == HEAD:
            return LayerInit(dense_init, zeros)
        return LayerInit(he_normal, zeros if self.bias else None)


@dataclass(frozen=True)
class DeltaOrthogonalInit:
    """Xiao et al. 2018: sigma_w times an orthogonal centre tap, biases N(0, sigma_b^2)."""

    sigma_w2: float
    sigma_b2: float

    def layer(self, role: str) -> LayerInit:
        """The initialisers of a layer in this role (the classifier keeps the suite's)."""
        if role == HEAD:
            return LayerInit(dense_init, zeros)
        kernel = delta_orthogonal(math.sqrt(self.sigma_w2))
        return LayerInit(kernel, normal(math.sqrt(self.sigma_b2)))


@dataclass(frozen=True)
class SUODeltaInit:
    """DKS/TAT: scaled uniform orthogonal (delta for convs) weights, zero biases, everywhere
    the classifier included, as dks's modified ResNet does."""

    def layer(self, role: str) -> LayerInit:
        """The initialisers of a layer in this role."""
        return LayerInit(suo_delta, zeros)


@dataclass(frozen=True)
class FixupInit:
    """Zhang et al. 2019 (hongyi-zhang/Fixup, cifar/models/fixup_resnet_cifar.py).

    Branch convs but the last: He's normal on the fan-out (out channels x k x k, as that code)
    times L^(-1/(2m-2)) (L units, m convs per branch); the last conv of each branch and the
    classifier start at zero; convs have no bias (the branch's scalar biases replace it).
    """

    num_blocks: int
    convs_per_block: int

    @property
    def branch_scale(self) -> float:
        """L^(-1/(2m-2)): the factor on the branch convs' He standard deviation."""
        return self.num_blocks ** (-1.0 / (2 * self.convs_per_block - 2))

    def layer(self, role: str) -> LayerInit:
        """The initialisers of a layer in this role."""
        if role == HEAD:
            return LayerInit(zeros, zeros)
        if role == LAST:
            return LayerInit(zeros)
        if role == BRANCH:
            variance = 2.0 * self.branch_scale**2
            return LayerInit(he_normal_fan_out(variance))
        return LayerInit(he_normal)


class PlainBranch(nnx.Module):
    """A branch as He et al. 2015 built it: nothing added."""

    def __init__(self, convs: int):
        self.last = convs - 1

    def before(self, i: int, h: jax.Array) -> jax.Array:
        """The input of the branch's conv i."""
        return h

    def after(self, i: int, h: jax.Array) -> jax.Array:
        """The output of the branch's conv i (before the activation or the addition)."""
        return h

    def shortcut_input(self, x: jax.Array) -> jax.Array:
        """What a shape-changing shortcut takes."""
        return x


class SkipInitBranch(PlainBranch):
    """SkipInit / ReZero: a learnable scalar, initialised to 0, multiplies the branch."""

    def __init__(self, convs: int):
        super().__init__(convs)
        self.alpha = nnx.Param(jnp.zeros(()))

    def after(self, i: int, h: jax.Array) -> jax.Array:
        """The last conv's output times alpha."""
        return (self.alpha[...] * h).astype(h.dtype) if i == self.last else h


class FixupBranch(PlainBranch):
    """Fixup's scalars: a bias before each conv and after each conv, a multiplier (init 1) on
    the last conv; a shape-changing shortcut takes the input plus the first bias."""

    def __init__(self, convs: int):
        super().__init__(convs)
        self.bias_in = nnx.Param(jnp.zeros((convs,)))
        self.bias_out = nnx.Param(jnp.zeros((convs,)))
        self.scale = nnx.Param(jnp.ones(()))

    def before(self, i: int, h: jax.Array) -> jax.Array:
        """Conv i's input plus its scalar bias."""
        return (h + self.bias_in[i]).astype(h.dtype)

    def after(self, i: int, h: jax.Array) -> jax.Array:
        """Conv i's output (times the multiplier if last) plus its scalar bias."""
        if i == self.last:
            h = h * self.scale[...]
        return (h + self.bias_out[i]).astype(h.dtype)

    def shortcut_input(self, x: jax.Array) -> jax.Array:
        """The downsampling shortcut sees the first conv's biased input, as in the code."""
        return self.before(0, x)


class PlainNetScalars(nnx.Module):
    """No scalars around the stem and the classifier."""

    def stem_output(self, x: jax.Array) -> jax.Array:
        """The stem conv's output, before its activation."""
        return x

    def head_input(self, x: jax.Array) -> jax.Array:
        """The pooled features, before the classifier."""
        return x


class FixupNetScalars(PlainNetScalars):
    """Fixup's scalar biases after the stem conv and before the classifier."""

    def __init__(self):
        self.stem_bias = nnx.Param(jnp.zeros(()))
        self.head_bias = nnx.Param(jnp.zeros(()))

    def stem_output(self, x: jax.Array) -> jax.Array:
        """Stem output plus its scalar bias."""
        return (x + self.stem_bias[...]).astype(x.dtype)

    def head_input(self, x: jax.Array) -> jax.Array:
        """Pooled features plus their scalar bias."""
        return (x + self.head_bias[...]).astype(x.dtype)


def jax_activation_getter(name: str) -> Callable:
    """Our JAX activations by dks's names, for dks to transform."""
    return {"leaky_relu": jax.nn.leaky_relu, "relu": jax.nn.relu, "tanh": jnp.tanh}[name]


# Each activation option: the function for a resolved architecture.
ACTIVATIONS: dict[str, Callable[[Architecture], Callable]] = {
    "relu": lambda arch: jax.nn.relu,
    "tanh": lambda arch: jnp.tanh,
    "leaky_relu": lambda arch: partial(
        jax.nn.leaky_relu, negative_slope=arch.spec.leaky_relu_slope
    ),
    # The slope and output scale depend on how many activations the chain has (its depth).
    "tat": lambda arch: transformed_leaky_relu(
        arch.num_activations, arch.spec.tat_target, jax_activation_getter
    ),
}


@dataclass(frozen=True)
class NetOptions:
    """A resolved spec's options: activation, init scheme, BatchNorm or not, branch scalars."""

    activation: Callable
    init: HeInit | DeltaOrthogonalInit | SUODeltaInit | FixupInit
    batch_norm: bool
    branch: type[PlainBranch]
    net_scalars: type[PlainNetScalars]


def _init_scheme(arch: Architecture) -> HeInit | DeltaOrthogonalInit | SUODeltaInit | FixupInit:
    """The init scheme the spec names (Fixup's own under branch=fixup)."""
    spec = arch.spec
    if spec.branch == "fixup":
        return FixupInit(arch.num_blocks, arch.convs_per_block)
    schemes = {
        "he_normal": lambda: HeInit(bias=spec.norm == "none"),
        "delta_orthogonal": lambda: DeltaOrthogonalInit(spec.sigma_w2, spec.sigma_b2),
        "suo_delta": SUODeltaInit,
    }
    return schemes[spec.init]()


BRANCHES: dict[str, tuple[type[PlainBranch], type[PlainNetScalars]]] = {
    "plain": (PlainBranch, PlainNetScalars),
    "skipinit": (SkipInitBranch, PlainNetScalars),
    "fixup": (FixupBranch, FixupNetScalars),
}


def net_options(arch: Architecture) -> NetOptions:
    """The options of a resolved (validated) architecture, computed once on the host."""
    spec = arch.spec
    branch, net_scalars = BRANCHES[spec.branch]
    return NetOptions(
        activation=ACTIVATIONS[spec.activation](arch),
        init=_init_scheme(arch),
        batch_norm=spec.norm == "batch",
        branch=branch,
        net_scalars=net_scalars,
    )
