"""One Flax NNX builder for plain, residual and pre-activation nets (CIFAR and ImageNet)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_flax.models.initializers import stacked_modules
from resnet_flax.models.layers import (
    ConvBN,
    PreActBN,
    decided,
    option_a_shortcut,
    resolved_options,
    window_padding,
)
from resnet_flax.models.options import BRANCH, HEAD, LAST, PROJECTION, STEM, NetOptions, net_options
from resnet_flax.models.spec import Architecture, ModelSpec, StagePlan, resolve


class Block(nnx.Module):
    """One unit: basic or bottleneck branch, original or pre-activation order, any shortcut.

    Plain, residual and pre-activation nets differ only here: plain has no shortcut,
    residual adds it before the last ReLU, pre-activation puts BN-ReLU before each conv.
    """

    def __init__(
        self,
        spec: ModelSpec,
        kind: str,
        cin: int,
        width: int,
        cout: int,
        stride: int,
        rngs: nnx.Rngs,
        *,
        stage_first: bool = False,
        options: NetOptions | None = None,
    ):
        options = resolved_options(spec, options)
        self.act = options.activation
        self.preact = spec.model == "preact"
        self.residual = spec.model != "plain"
        self.cout, self.stride = cout, stride
        if kind == "basic":
            shapes = [(cin, width, 3, stride), (width, cout, 3, 1)]
        elif spec.bottleneck_stride == "1x1":
            shapes = [(cin, width, 1, stride), (width, width, 3, 1), (width, cout, 1, 1)]
        else:
            shapes = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
        last = len(shapes) - 1
        zero_last = spec.zero_init_residual and self.residual and not self.preact
        # Fixup zero-initialises the last conv of a residual branch, not of a plain block.
        last_role = LAST if self.residual else BRANCH
        self.convs = nnx.List(
            [
                ConvBN(
                    spec,
                    a,
                    b,
                    k,
                    s,
                    zero_scale=zero_last and i == last,
                    bn=not self.preact,
                    role=last_role if i == last else BRANCH,
                    options=options,
                    rngs=rngs,
                )
                for i, (a, b, k, s) in enumerate(shapes)
            ]
        )
        self.preacts = (
            nnx.List([PreActBN(spec, a, options=options, rngs=rngs) for (a, _, _, _) in shapes])
            if self.preact
            else None
        )
        self.branch = options.branch(len(shapes))  # plain, preact: PlainBranch, which adds nothing
        self.changes_shape = stride != 1 or cin != cout
        project = self.residual and (
            spec.shortcut == "C" or (spec.shortcut == "B" and self.changes_shape)
        )
        # A pre-activation projection takes the normalised input, as in He et al. 2016.
        self.projection = (
            ConvBN(
                spec,
                cin,
                cout,
                1,
                stride,
                bn=not self.preact,
                role=PROJECTION,
                options=options,
                rngs=rngs,
            )
            if project
            else None
        )
        # fb.resnet.torch's stage-first units apply BN-ReLU before splitting into two paths.
        self.shared_preact = (
            self.preact and stage_first and spec.preact_first_shortcut == "activated"
        )

    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, list[jax.Array]]:
        """Apply the unit; also return each branch conv's response (after BN in v1)."""
        responses = []
        h = x
        first_preact = None
        for i, conv in enumerate(self.convs):
            if self.preact:
                h = self.preacts[i](h, train)
                if i == 0:
                    first_preact = h
            elif i > 0:
                h = self.act(h)
            h = self.branch.after(i, conv(self.branch.before(i, h), train))
            responses.append(h)
        if self.residual:
            if self.projection is not None:
                short = first_preact if self.preact else x
            else:
                short = first_preact if self.shared_preact else x
            if self.changes_shape or self.projection is not None:
                short = self.branch.shortcut_input(short)
            if self.projection is not None:
                h = h + self.projection(short, train)
            else:
                h = h + option_a_shortcut(short, self.cout, self.stride).astype(h.dtype)
        return (h if self.preact else self.act(h)), responses


class Stage(nnx.Module):
    """A stage: the first block (may change shape) and the identical rest, stacked and scanned."""

    def __init__(
        self,
        spec: ModelSpec,
        kind: str,
        cin: int,
        plan: StagePlan,
        rngs: nnx.Rngs,
        options: NetOptions | None = None,
    ):
        options = resolved_options(spec, options)
        self.remat = spec.remat
        self.unroll = decided(spec).stage_loop == "unroll"
        self.first = Block(
            spec,
            kind,
            cin,
            plan.width,
            plan.out_width,
            plan.stride,
            rngs,
            stage_first=True,
            options=options,
        )
        self.num_rest = plan.num_blocks - 1
        rest = None
        if self.num_rest > 0:
            make = partial(
                Block, spec, kind, plan.out_width, plan.width, plan.out_width, 1, options=options
            )
            rest = stacked_modules(make, rngs, self.num_rest)
        self.rest = rest

    def _apply(self, block: Block, x: jax.Array, train: bool):
        if not self.remat:
            return block(x, train)
        # Rematerialise a block: keep only its input, recompute its inside on the backward.
        graphdef, state = nnx.split(block)

        def pure(state, h):
            b = nnx.merge(graphdef, state, copy=True)
            out = b(h, train)
            return out, nnx.state(b)

        out, new_state = jax.checkpoint(pure)(state, x)
        nnx.update(block, new_state)
        return out

    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict]:
        """Apply all blocks; responses of scanned blocks come back stacked on axis 0."""
        x, first = self._apply(self.first, x, train)
        rest = []
        if self.rest is not None and self.unroll and self.num_rest == 1:
            # A scan of length 1 stays an XLA while loop even with unroll=True: "unroll"
            # means no loop, so the one block is applied directly.
            graphdef, stacked = nnx.split(self.rest)
            block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked), copy=True)
            x, responses = self._apply(block, x, train)
            nnx.update(self.rest, jax.tree.map(lambda a: a[None], nnx.state(block)))
            return x, {"first": first, "rest": jax.tree.map(lambda a: a[None], responses)}
        if self.rest is not None:

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0), unroll=self.unroll or 1)
            def body(h, block):
                return self._apply(block, h, train)

            x, rest = body(x, self.rest)
        return x, {"first": first, "rest": rest}


class ResNet(nnx.Module):
    """Stem, stages of blocks, global average pool, classifier; see resolve() for the layout."""

    def __init__(self, arch: Architecture, *, rngs: nnx.Rngs):
        spec = arch.spec
        options = net_options(arch)
        self.arch = arch
        self.act = options.activation
        self.family, self.preact = spec.family, spec.model == "preact"
        stem_kernel, stem_stride = (3, 1) if spec.family == "cifar" else (7, 2)
        # A CIFAR pre-activation net starts straight with a conv; its first unit normalises.
        stem_act = not (self.preact and spec.family == "cifar")
        pad = (stem_kernel - 1) // 2  # 3/3 for the 7x7 in every reference, TF official too
        self.stem = ConvBN(
            spec,
            spec.in_channels,
            arch.stem_width,
            stem_kernel,
            stem_stride,
            bn=stem_act,
            padding=((pad, pad), (pad, pad)),
            role=STEM,
            options=options,
            rngs=rngs,
        )
        self.stem_act = stem_act
        self.scalars = options.net_scalars()
        self.pool_padding = window_padding(spec, 3, 2)
        stages, cin = [], arch.stem_width
        for plan in arch.stages:
            stages.append(Stage(spec, arch.block, cin, plan, rngs, options))
            cin = plan.out_width
        self.stages = nnx.List(stages)
        self.final_preact = PreActBN(spec, cin, options=options, rngs=rngs) if self.preact else None
        head = options.init.layer(HEAD)
        self.head = nnx.Linear(
            cin,
            spec.num_classes,
            kernel_init=head.kernel,
            bias_init=head.bias,
            dtype=jnp.dtype(spec.precision),
            rngs=rngs,
        )
        self.dtype = jnp.dtype(spec.precision)

    def __call__(self, x: jax.Array, train: bool = False, capture: bool = False):
        """Logits (float32); with capture=True also every branch conv's response per stage."""
        x = self.stem(x.astype(self.dtype), train)
        if self.stem_act:
            x = self.act(self.scalars.stem_output(x))
        if self.family == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=self.pool_padding)
        responses = []
        for stage in self.stages:
            x, r = stage(x, train)
            responses.append(r)
        if self.final_preact is not None:
            x = self.final_preact(x, train)
        x = self.scalars.head_input(jnp.mean(x, axis=(1, 2)))
        logits = self.head(x).astype(jnp.float32)
        return (logits, responses) if capture else logits


def build_model(spec: ModelSpec, seed: int = 0) -> ResNet:
    """Validate the spec and build the network with parameters drawn from seed.

    Drawn with programs per parameter shape (models.initializers), which every network of
    the same widths shares: a second depth in a process compiles nothing.
    """
    arch = resolve(decided(spec))
    return ResNet(arch, rngs=nnx.Rngs(jax.random.key(seed)))


def abstract_model(spec: ModelSpec) -> ResNet:
    """The network with shapes only (no memory, no compile): for counting and restoring."""
    arch = resolve(decided(spec))
    return nnx.eval_shape(lambda: ResNet(arch, rngs=nnx.Rngs(0)))


def flatten_responses(responses: list[dict]) -> list[tuple[str, jax.Array]]:
    """Per-stage responses in layer order as (name, array) pairs; stacked blocks unstacked."""
    out = []
    for s, stage in enumerate(responses, start=1):
        for c, r in enumerate(stage["first"], start=1):
            out.append((f"stage{s}/block0/conv{c}", r))
        if stage["rest"]:
            num = stage["rest"][0].shape[0]
            for b in range(num):
                for c, r in enumerate(stage["rest"], start=1):
                    out.append((f"stage{s}/block{b + 1}/conv{c}", r[b]))
    return out
