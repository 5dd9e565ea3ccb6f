"""Model summary from abstract evaluation: parameters, weighted layers, MACs and a stage table."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.core import jaxprs_in_params

from resnet_flax.models.resnet import ResNet, abstract_model
from resnet_flax.models.spec import Architecture, ModelSpec, resolve

INPUT_SIZE = {"cifar": 32, "imagenet": 224}


@dataclass(frozen=True)
class ModelSummary:
    """The numbers model_info prints."""

    params: int
    weighted_layers: int
    macs: int
    input_shape: tuple[int, ...]
    stages: list[dict]


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (BatchNorm scale and shift included, running statistics not)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _jaxpr_macs(jaxpr) -> int:
    """Multiply-accumulates of every convolution and matrix product in a jaxpr, recursively."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            out = eqn.outvars[0].aval
            dn = eqn.params["dimension_numbers"]
            # MACs = output elements x (kernel window x input features per group).
            kernel_in = rhs.shape[dn.rhs_spec[1]]
            window = math.prod(rhs.shape[i] for i in dn.rhs_spec[2:])
            total += math.prod(out.shape) * kernel_in * window
        elif name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            contracted = math.prod(lhs.shape[i] for i in lc)
            total += math.prod(eqn.outvars[0].aval.shape) * contracted
        elif name == "scan":
            total += eqn.params["length"] * _jaxpr_macs(eqn.params["jaxpr"].jaxpr)
        else:
            for sub in jaxprs_in_params(eqn.params):
                total += _jaxpr_macs(sub)
    return total


def count_macs(model: ResNet, input_shape: tuple[int, ...]) -> int:
    """MACs of one inference forward pass, traced abstractly (nothing is compiled)."""
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x, train=False)

    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    closed = jax.make_jaxpr(forward)(state, x)
    return _jaxpr_macs(closed.jaxpr)


def stage_table(arch: Architecture, input_size: int) -> list[dict]:
    """Per-stage rows: blocks, widths, output map size."""
    size = input_size if arch.spec.family == "cifar" else input_size // 4
    rows = []
    for i, plan in enumerate(arch.stages, start=1):
        size = -(-size // plan.stride)
        rows.append(
            {
                "stage": i,
                "blocks": plan.num_blocks,
                "block": arch.block,
                "width": plan.width,
                "out_channels": plan.out_width,
                "output_map": f"{size}x{size}",
            }
        )
    return rows


def summarize(spec: ModelSpec, input_size: int | None = None) -> ModelSummary:
    """Summarise a spec at its family's input size (32x32 or 224x224) without compiling."""
    arch = resolve(spec)
    size = input_size or INPUT_SIZE[spec.family]
    model = abstract_model(spec)
    shape = (1, size, size, spec.in_channels)
    return ModelSummary(
        params=count_params(model),
        weighted_layers=arch.weighted_layers,
        macs=count_macs(model, shape),
        input_shape=shape,
        stages=stage_table(arch, size),
    )
