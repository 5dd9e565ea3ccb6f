"""Signal-propagation probes of one network: shattered gradients, per-layer signals, Jacobian.

- Shattered gradients (Balduzzi et al. 2017, arXiv 1702.08591): g(t) = d logit_y / dt along
  lines x(t) = x0 + t u through training images, by forward-mode differentiation over every
  point of every line at once; its autocorrelation over t (`autocorrelation`).
- Signal propagation (the mean-field papers: Schoenholz et al. 2017, arXiv 1611.01232; Xiao
  et al. 2018, arXiv 1806.05393): each branch conv's response (its pre-activation, after BN),
  its second moment and the mean cosine similarity of different inputs' responses, with BN
  in training mode (batch statistics) and in eval mode (stored statistics).
- The input-output Jacobian of the logits: its singular values per image.

The math takes any `apply(x) -> logits` so that it can be checked on linear models; the
`net_*` programs are the same math on a ResNet, compiled once per network definition.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_flax.analysis.layer_stats import AnalysisError
from resnet_flax.backend import current_backend
from resnet_flax.models.resnet import flatten_responses

# A correlation below this ends the correlation length (Balduzzi et al.'s cheap summary).
CORRELATION_LENGTH_LEVEL = 0.5


@dataclass(frozen=True)
class ProbeConfig:
    """How many lines, points and images the probes use, and the seed that picks them."""

    lines: int = 8  # lines x0 + t u, each through its own training image
    points: int = 256  # values of t per line, evenly spaced on [-span, span]
    span: float = 1.0  # t's range; u has the training images' RMS norm (see line_points)
    max_lag: int = 64  # autocorrelation lags computed (the correlation length is capped here)
    batch: int = 64  # images for the per-layer signals and the Jacobian
    seed: int = 0  # which images and directions

    def check(self) -> None:
        """Raise AnalysisError (one line) for settings that cannot work."""
        if self.lines < 1 or self.batch < 2:
            raise AnalysisError(
                f"probe lines must be >= 1 and batch >= 2 (two inputs to compare); "
                f"got lines={self.lines}, batch={self.batch}"
            )
        if not 1 <= self.max_lag < self.points - 1:
            raise AnalysisError(
                f"probe max_lag must be in [1, points - 2] = [1, {self.points - 2}] "
                f"(points={self.points}); got {self.max_lag}"
            )
        if not self.span > 0:
            raise AnalysisError(f"probe span must be positive; got {self.span}")

    def to_dict(self) -> dict:
        """The settings as a plain dict (recorded with every result)."""
        return dataclasses.asdict(self)


# --- the math on any apply(x) -> logits ----------------------------------------------------


def directional_derivatives(apply, x: jax.Array, u: jax.Array, labels: jax.Array) -> jax.Array:
    """d logit_label(x + t u) / dt at t = 0 for every row: one forward-mode pass (jax.jvp).

    `apply` must treat rows independently (BN in eval mode), or rows would mix.
    """
    _, tangent = jax.jvp(apply, (x,), (u,))
    return jnp.take_along_axis(tangent, labels[:, None], axis=1)[:, 0]


def jacobian_singular_values(apply, x: jax.Array) -> jax.Array:
    """Singular values of d logits / d input for each image (rows of `x`), largest first."""

    def single(image):
        return apply(image[None])[0]

    jac = jax.vmap(jax.jacrev(single))(x)  # (batch, classes, *image)
    return jnp.linalg.svd(jac.reshape(jac.shape[0], jac.shape[1], -1), compute_uv=False)


def layer_signal(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(second moment, mean cosine similarity over pairs of different inputs) of a response."""
    flat = h.reshape(h.shape[0], -1).astype(jnp.float32)
    norms = jnp.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / jnp.where(norms > 0, norms, 1.0)  # an all-zero response counts as cosine 0
    gram = unit @ unit.T
    n = flat.shape[0]
    return jnp.mean(jnp.square(flat)), (jnp.sum(gram) - jnp.trace(gram)) / (n * (n - 1))


def autocorrelation(g: np.ndarray, max_lag: int) -> np.ndarray:
    """r(k), k = 0..max_lag, of each series in the last axis of g: the cosine between g and g
    shifted by k, sum_t g(t) g(t+k) / sqrt(sum_t g(t)^2 sum_t g(t+k)^2).

    Not mean-centred: Balduzzi et al.'s covariance of gradients E[g(x) g(x')] is uncentred
    (a random net's gradient has mean zero over its weights). So a constant g has r = 1 at
    every lag (perfectly correlated, where the centred estimate is 0/0), zero-mean white
    noise has r(k > 0) near 0, and a gradient that keeps its sign along the line counts as
    correlated. Only a series that is zero everywhere has no value (NaN).
    """
    g = np.asarray(g, np.float64)
    n = g.shape[-1]
    out = []
    for k in range(max_lag + 1):
        a, b = g[..., : n - k], g[..., k:]
        denom = np.sqrt(np.sum(a * a, -1) * np.sum(b * b, -1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(denom > 0, np.sum(a * b, -1) / denom, np.nan))
    return np.stack(out, axis=-1)


def correlation_length(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first lag k >= 1 with r(k) < 0.5, whether it was capped): a series that stays above
    0.5 up to the last lag computed gets that lag, marked capped; an undefined one (a zero
    gradient series) gets NaN."""
    below = r[..., 1:] < CORRELATION_LENGTH_LEVEL
    capped = ~np.any(below, axis=-1)
    first = np.argmax(below, axis=-1) + 1
    length = np.where(capped, r.shape[-1] - 1, first).astype(float)
    return np.where(np.all(np.isnan(r[..., 1:]), axis=-1), np.nan, length), capped


def shattering_summary(g: np.ndarray, max_lag: int) -> dict:
    """Lag-1 autocorrelation and correlation length of gradient series g (lines, points)."""
    r = autocorrelation(g, max_lag)
    length, capped = correlation_length(r)
    with warnings.catch_warnings():  # every line's gradient zero (Fixup at init): NaN, no noise
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "lag1": float(np.nanmean(r[:, 1])),
            "lag1_std": float(np.nanstd(r[:, 1])),
            "correlation_length": float(np.nanmean(length)),
            "correlation_length_capped": float(np.mean(capped)),
            "autocorrelation": np.nanmean(r, axis=0).tolist(),
        }


def spectrum_summary(sigma: np.ndarray) -> dict:
    """Spread of Jacobian singular values (images, k): log10 max/min and std of ln sigma."""
    sigma = np.asarray(sigma, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero singular value: inf / NaN
        log_sigma = np.log(sigma)
        condition = log_sigma[:, 0] - log_sigma[:, -1]  # svd sorts descending
        spread = np.std(log_sigma, axis=1)
    return {
        "log10_condition": float(np.median(condition) / np.log(10)),
        "std_log_sigma": float(np.mean(spread)),
        "sigma_max": float(np.median(sigma[:, 0])),
        "sigma_min": float(np.median(sigma[:, -1])),
    }


def line_points(
    x0: np.ndarray, rms_norm: float, cfg: ProbeConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, directions, t) of lines x0_i + t u_i: u_i Gaussian with norm `rms_norm`.

    points and directions are (lines * points, *image), the lines one after another.
    """
    u = rng.standard_normal(x0.shape).astype(np.float32)
    u *= rms_norm / np.linalg.norm(u.reshape(len(u), -1), axis=1).reshape(-1, *[1] * (u.ndim - 1))
    t = np.linspace(-cfg.span, cfg.span, cfg.points, dtype=np.float32)
    shape = (len(x0) * cfg.points, *x0.shape[1:])
    pts = (x0[:, None] + t[None, :, None, None, None] * u[:, None]).reshape(shape)
    dirs = np.broadcast_to(u[:, None], (len(u), cfg.points, *u.shape[1:])).reshape(shape)
    return pts, np.ascontiguousarray(dirs), t


# --- the same math on a ResNet, compiled once per network definition -----------------------


def _apply(graphdef, params, batch_stats, train: bool = False):
    """x -> logits of the network with these parameters (eval mode unless `train`)."""

    def apply(x):
        return nnx.merge(graphdef, params, batch_stats, copy=True)(x, train=train)

    return apply


def net_line_gradients(graphdef, params, batch_stats, x, u, labels) -> jax.Array:
    """directional_derivatives of the network in eval mode."""
    return directional_derivatives(_apply(graphdef, params, batch_stats), x, u, labels)


def net_jacobian(graphdef, params, batch_stats, x) -> jax.Array:
    """jacobian_singular_values of the network in eval mode."""
    return jacobian_singular_values(_apply(graphdef, params, batch_stats), x)


def net_signals(graphdef, params, batch_stats, x) -> dict:
    """{mode: {layer: (second moment, cosine)}} for BN modes 'train' and 'eval'."""
    out = {}
    for mode, train in (("train", True), ("eval", False)):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        _, responses = model(x, train=train, capture=True)
        out[mode] = {name: layer_signal(r) for name, r in flatten_responses(responses)}
    return out


def signal_table(signals: dict, names: list[str]) -> dict:
    """net_signals as {mode: [{name, second_moment, cosine}]} in layer order."""
    return {
        mode: [
            {"name": n, "second_moment": float(per[n][0]), "cosine": float(per[n][1])}
            for n in names
        ]
        for mode, per in jax.device_get(signals).items()
    }


# XLA:CPU's fast-compile preset: these programs run once or twice per network, so their
# compile time is most of a probe's (docs/performance.md).
CPU_OPTIONS = {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"}


def compiler_options() -> dict | None:
    """The XLA options of the probes' programs on this backend."""
    return CPU_OPTIONS if current_backend() == "cpu" else None


@functools.cache
def compiled(program):
    """`program` (a net_* function) jitted with the network definition static, once."""
    return jax.jit(program, static_argnums=0, compiler_options=compiler_options())
