"""TAT's transformed leaky ReLU (Zhang et al. 2022) from DeepMind's dks, solved on the host.

Only `dks.base.activation_transform` is used (numpy and scipy): its `dks.jax` subpackage does
not import on current JAX. The constants depend on how many activations the net chains, so
they are solved once per (activations, target) here, never inside a compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, reduce


class UnreachableTarget(ValueError):
    """TAT's C-map target cannot be met by a leaky-ReLU chain this short."""

    def __init__(self, num_activations: int, target: float, reachable: float):
        self.num_activations, self.target, self.reachable = num_activations, target, reachable
        super().__init__(
            f"c(0) target {target} is unreachable with {num_activations} activations "
            f"(at most {reachable:.4f})"
        )


@dataclass(frozen=True)
class TatConstants:
    """The transformed leaky ReLU: x -> output_scale * leaky_relu(x, negative_slope)."""

    negative_slope: float
    output_scale: float


def chain_subnet_max(num_activations: int) -> Callable:
    """dks's subnetwork maximising function of a plain chain: r_fn applied L times.

    Every subnetwork of a chain is a shorter chain, and C maps rise with composition, so the
    whole chain is the maximum (TAT paper, appendix on computing M_{f,r}).
    """

    def subnet_max(x: float, r_fn: Callable[[float], float]) -> float:
        return reduce(lambda c, _: r_fn(c), range(num_activations), x)

    return subnet_max


def reachable_target(num_activations: int) -> float:
    """The largest c(0) a chain of L leaky ReLUs reaches: slope 0, ReLU's C map L times."""
    from dks.base import activation_transform

    # dks's closed-form leaky-ReLU C map (arc-cosine kernel); ReLU is the most nonlinear.
    relu_cmap = lambda c: activation_transform._leaky_relu_cmap(c, 0.0)
    return float(chain_subnet_max(num_activations)(0.0, relu_cmap))


@lru_cache(maxsize=64)
def transformed_leaky_relu(
    num_activations: int, target: float, activation_getter: Callable | None = None
) -> Callable:
    """dks's TAT leaky ReLU for a chain of L activations, built on activation_getter's ones.

    activation_getter maps a name to an activation (None: dks's numpy ones); cached, so one
    spec gets one function object. Raises UnreachableTarget when dks finds no slope.
    """
    from dks.base import activation_getter as numpy_getter
    from dks.base import activation_transform

    getter = activation_getter or numpy_getter.get_activation_function
    try:
        transformed = activation_transform.get_transformed_activations(
            ["leaky_relu"],
            method="TAT",
            tat_params={"c_val_0_target": float(target)},
            subnet_max_func=chain_subnet_max(num_activations),
            activation_getter=getter,
        )
    except ValueError as err:
        reachable = reachable_target(num_activations)
        if target < reachable:
            raise  # dks failed for another reason: show it as it is
        raise UnreachableTarget(num_activations, target, reachable) from err
    return transformed["leaky_relu"]


@lru_cache(maxsize=64)
def tat_constants(num_activations: int, target: float) -> TatConstants:
    """Negative slope and output scale of TAT's leaky ReLU, read off dks's numpy function."""
    act = transformed_leaky_relu(num_activations, target)
    scale = float(act(1.0))
    return TatConstants(negative_slope=-float(act(-1.0)) / scale, output_scale=scale)
