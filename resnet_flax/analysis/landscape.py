"""Loss landscapes (Li et al. 2018, arXiv 1712.09913): filter-normalised random directions,
1-D and 2-D surfaces of training loss and error, and the PCA plane of a run's trajectory.

The loss is the training code's own evaluation (eval_sums: BN in eval mode with the run's
statistics) on a fixed training subset; the parameters move, the BN statistics do not.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from sklearn.decomposition import PCA

from resnet_flax.analysis.layer_stats import AnalysisError
from resnet_flax.training.steps import eval_sums

# Li et al.'s guard against an all-zero random filter.
FILTER_EPS = 1e-10


@dataclass(frozen=True)
class LandscapeConfig:
    """Grid sizes, the training subset, the direction seed and how the grid is evaluated."""

    points_1d: int = 51  # alphas on [-span, span] (Li et al.: 51)
    points_2d: int = 21  # the 2-D grid is points_2d x points_2d (Li et al.: 51 x 51)
    span: float = 1.0  # the random-direction grids cover [-span, span] per direction
    subset: int = 512  # training images the loss is averaged over; 0: all of them
    seed: int = 0  # the random directions (and the subset)
    step: int | None = None  # the checkpoint the surfaces centre on; None: the newest
    trajectory: bool = True  # also the PCA plane of the run's checkpoints
    trajectory_points: int = 21  # that plane's grid side
    min_checkpoints: int = 3  # checkpoints a trajectory needs (the initial state is added)
    chunk: int = 32  # grid points per call of the compiled evaluation
    vmap_points: int = 0  # grid points vmapped together within a call; 0: 1 on CPU, else chunk

    def check(self) -> None:
        """Raise AnalysisError (one line) for settings that cannot work, before any compile."""
        for name in ("points_1d", "points_2d", "trajectory_points"):
            value = getattr(self, name)
            if value < 3 or value % 2 == 0:
                raise AnalysisError(
                    f"landscape {name} must be an odd number >= 3, so that the grid's centre "
                    f"is the parameters themselves (defaults: 51, 21, 21); got {value}"
                )
        if not self.span > 0 or self.subset < 0 or self.chunk < 1 or self.vmap_points < 0:
            raise AnalysisError(
                "landscape span must be > 0, subset >= 0 (0: every training image), chunk >= 1 "
                f"and vmap_points >= 0; got {self.span}, {self.subset}, {self.chunk}, "
                f"{self.vmap_points}"
            )
        if self.min_checkpoints < 2:
            raise AnalysisError(
                f"landscape min_checkpoints must be >= 2 (with the initial state, three points "
                f"span a plane); got {self.min_checkpoints}"
            )

    def to_dict(self) -> dict:
        """The settings as a plain dict (saved with every surface)."""
        return dataclasses.asdict(self)


# --- directions ------------------------------------------------------------------------------


def is_filtered(path) -> bool:
    """Whether a parameter gets a direction: conv and dense kernels; biases and BN scale and
    shift (Li et al.'s 'biasbn', the tensors of ndim <= 1 per layer) get zero."""
    return any(getattr(key, "key", None) == "kernel" for key in path)


def filter_axes(ndim: int) -> tuple[int, ...]:
    """The axes one filter spans in a kernel of `ndim` axes: a conv's (H, W, C_in) or a
    dense layer's C_in. The filter is one output channel, the last axis; axes before the
    kernel's own are blocks stacked by nnx.vmap, each a layer of its own."""
    own = 4 if ndim >= 4 else 2
    return tuple(range(ndim - own, ndim - 1))


def filter_normalized_direction(rng: np.random.Generator, params) -> object:
    """A Gaussian direction with each filter rescaled to its weight's norm (biases, BN: 0).

    Drawn on the host with numpy: as one XLA program, drawing ResNet-20's tensors compiled
    for 20 s on CPU."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for path, w in leaves:
        w = np.asarray(w)
        if not is_filtered(path):
            out.append(np.zeros_like(w))
            continue
        d = rng.standard_normal(w.shape).astype(w.dtype)
        axes = filter_axes(w.ndim)
        w_norm = np.sqrt(np.sum(np.square(w), axis=axes, keepdims=True))
        d_norm = np.sqrt(np.sum(np.square(d), axis=axes, keepdims=True))
        out.append(d * (w_norm / (d_norm + FILTER_EPS)))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_directions(seed: int, params) -> tuple[object, object]:
    """Two filter-normalised directions drawn from `seed` (the same seed, the same pair)."""
    return tuple(
        filter_normalized_direction(np.random.default_rng([seed, i]), params) for i in (0, 1)
    )


def kernel_mask(params) -> np.ndarray:
    """1 for every kernel entry of the flattened parameters, 0 for biases and BN."""
    mask = jax.tree_util.tree_map_with_path(
        lambda path, w: jnp.full(w.shape, float(is_filtered(path)), w.dtype), params
    )
    return np.asarray(ravel_pytree(mask)[0])


# --- the compiled evaluation over grid points -------------------------------------------------


def net_loss(graphdef, params, batch_stats, x, y, mean, std) -> tuple[jax.Array, jax.Array]:
    """(mean loss, error) of a network on uint8 images (x, y): the training's evaluation."""
    loss, wrong = eval_sums(graphdef, params, batch_stats, x, y, jnp.ones(y.shape, bool), mean, std)
    return loss / y.shape[0], wrong / y.shape[0]


def surface_values(loss_fn, map_batch: int, params, d1, d2, coords, data) -> tuple:
    """loss_fn(params + a d1 + b d2, *data) for every row (a, b) of coords.

    lax.map runs the points one after another, `map_batch` of them vmapped together: on CPU
    a vmap over parameters turns every conv into a slow grouped one, so 1 there.
    """

    def one(c):
        return loss_fn(jax.tree.map(lambda w, a, b: w + c[0] * a + c[1] * b, params, d1, d2), *data)

    return jax.lax.map(one, coords, batch_size=map_batch)


class SurfaceEvaluator:
    """One compiled evaluation of chunks of grid points, for any centre and directions.

    `loss_fn(params, *data) -> (loss, error)` is a pure function (net_loss with its network
    definition bound, for a network); `data` its fixed other arguments.
    """

    def __init__(self, loss_fn, data: tuple, cfg: LandscapeConfig, options: dict | None = None):
        self.loss_fn, self.chunk = loss_fn, cfg.chunk
        on_cpu = jax.default_backend() == "cpu"
        self.map_batch = cfg.vmap_points or (1 if on_cpu else cfg.chunk)
        self.data = jax.tree.map(jnp.asarray, data)
        self.jitted = jax.jit(surface_values, static_argnums=(0, 1), compiler_options=options)
        self.compile_s = 0.0
        self._compiled = None

    def __call__(self, params, d1, d2, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(loss, error) arrays, one value per row of coords; chunks padded to one shape."""
        n = len(coords)
        padded = np.zeros((-(-n // self.chunk) * self.chunk, 2), np.float32)
        padded[:n] = coords
        if self._compiled is None:
            t0 = time.perf_counter()
            first = jnp.asarray(padded[: self.chunk])
            lowered = self.jitted.lower(
                self.loss_fn, self.map_batch, params, d1, d2, first, self.data
            )
            self._compiled = lowered.compile()
            self.compile_s += time.perf_counter() - t0
        parts = [
            self._compiled(params, d1, d2, jnp.asarray(padded[i : i + self.chunk]), self.data)
            for i in range(0, len(padded), self.chunk)
        ]
        loss = np.concatenate([np.asarray(p[0]) for p in parts])[:n]
        error = np.concatenate([np.asarray(p[1]) for p in parts])[:n]
        return loss, error


# --- grids and the trajectory plane -----------------------------------------------------------


def axis(points: int, lo: float, hi: float) -> np.ndarray:
    """`points` evenly spaced values on [lo, hi]."""
    return np.linspace(lo, hi, points, dtype=np.float32)


def plane_coords(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(a, b) rows of the grid xs x ys, ys varying fastest (reshape to (len(xs), len(ys)))."""
    a, b = np.meshgrid(xs, ys, indexing="ij")
    return np.stack([a.ravel(), b.ravel()], axis=1)


def pca_plane(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(components (2, D), explained variance ratios (2,), rows projected (K, 2)).

    As Li et al.: sklearn's PCA of the rows theta_k - theta_final; each row projected onto
    the unit components without centring, so the final parameters sit at the origin.
    """
    if len(rows) < 3:
        raise AnalysisError(f"a trajectory plane needs at least 3 points; got {len(rows)}")
    pca = PCA(n_components=2).fit(rows)
    components = pca.components_.astype(np.float32)
    return components, pca.explained_variance_ratio_, rows @ components.T


def trajectory_axes(coords: np.ndarray, points: int, margin: float = 0.2) -> tuple:
    """Grid axes covering the projected trajectory (and the origin) with a margin."""
    out = []
    for values in coords.T:
        lo, hi = min(values.min(), 0.0), max(values.max(), 0.0)
        pad = margin * (hi - lo or 1.0)
        out.append(axis(points, lo - pad, hi + pad))
    return tuple(out)
