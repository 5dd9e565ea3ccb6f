"""He et al. 2015's construction: a deeper net that computes what a shallower one computes.

The deeper net copies the shallower net's stem, classifier and the first blocks of each stage;
its extra blocks are identity mappings. Parameters are handled as pure dicts (nnx's
`State.to_pure_dict()`): a stage holds its block 0 under "first" and the stacked blocks
1..n-1 under "rest" (absent when n = 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from resnet_flax.models.spec import Architecture, ModelSpec, SpecError, resolve

# Model kinds whose extra blocks can be identities: a plain block by Dirac convs and BNs that
# undo themselves, a residual block by a branch that adds zero.
CONSTRUCTIBLE = ("plain", "residual")
# Fields that must agree, or the copied layers would compute something else.
SAME_FIELDS = ("model", "shortcut", "num_classes", "in_channels", "bn_epsilon")


def check_construction(source: ModelSpec, target: ModelSpec) -> None:
    """Raise SpecError (one line: what is valid, what to do) unless `target` can be built
    from `source` by adding identity blocks."""
    arches = {"target": resolve(target), "source": resolve(source)}
    for name, arch in arches.items():
        spec = arch.spec
        if spec.family != "cifar" or arch.block != "basic":
            raise SpecError(
                "the construction maps CIFAR-family nets of basic blocks (depth 6n+2); the "
                f"{name} is family={spec.family} with {arch.block} blocks (depth {spec.depth})"
            )
        if spec.norm != "batch" or spec.activation != "relu":
            raise SpecError(
                "the construction's identity blocks need BatchNorm and ReLU (norm=batch, "
                f"activation=relu); the {name} has norm={spec.norm}, "
                f"activation={spec.activation}"
            )
        if spec.model not in CONSTRUCTIBLE:
            raise SpecError(
                f"the construction maps {' and '.join(CONSTRUCTIBLE)} nets; the {name} is "
                f"model={spec.model}"
            )
    for field in SAME_FIELDS:
        if getattr(source, field) != getattr(target, field):
            raise SpecError(
                f"the source has {field}={getattr(source, field)!r} and the target "
                f"{getattr(target, field)!r}: the construction keeps {field}; set "
                f"{field}={getattr(source, field)!r} or start from another run"
            )
    if target.model == "residual" and target.shortcut == "C":
        raise SpecError(
            "shortcut C puts a projection on every block, so an extra block cannot be an "
            "identity; use shortcut A or B"
        )
    if source.depth > target.depth:
        raise SpecError(
            f"the source (depth {source.depth}) is deeper than the target (depth "
            f"{target.depth}): the construction only adds blocks; set depth to at least "
            f"{source.depth}"
        )


def layer_name(stage: int, block: int, conv: int) -> str:
    """A branch conv's name as models.resnet.flatten_responses gives it (all 0-based here)."""
    return f"stage{stage + 1}/block{block}/conv{conv + 1}"


def _blocks_per_stage(arch: Architecture) -> list[int]:
    """How many blocks each stage holds."""
    return [plan.num_blocks for plan in arch.stages]


def extra_layers(source: ModelSpec, target: ModelSpec) -> list[str]:
    """Names of the extra blocks' branch convs (each followed by a BN), in layer order."""
    names = []
    pairs = zip(_blocks_per_stage(resolve(source)), _blocks_per_stage(resolve(target)), strict=True)
    for s, (n_src, n_dst) in enumerate(pairs):
        names += [layer_name(s, b, c) for b in range(n_src, n_dst) for c in range(2)]
    return names


def stage_blocks(stage: dict) -> list[dict]:
    """A stage's blocks in order: "first", then each of the stacked "rest"."""
    blocks = [stage["first"]]
    rest = stage.get("rest")
    if rest:
        count = jax.tree.leaves(rest)[0].shape[0]
        blocks += [jax.tree.map(lambda a, i=i: a[i], rest) for i in range(count)]
    return blocks


def stage_tree(blocks: list[dict]) -> dict:
    """The stage dict of a list of blocks (the inverse of stage_blocks)."""
    stage = {"first": blocks[0]}
    if len(blocks) > 1:
        stage["rest"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks[1:])
    return stage


def dirac(kernel: jax.Array) -> jax.Array:
    """A k x k x c x c kernel that maps each channel to itself (1 at the centre tap)."""
    k, _, cin, cout = kernel.shape
    return jnp.zeros_like(kernel).at[k // 2, k // 2].set(jnp.eye(cin, cout, dtype=kernel.dtype))


def identity_block(
    params: dict, stats: dict, model: str, epsilon: float, inputs: list[tuple] | None
) -> tuple[dict, dict]:
    """(params, batch_stats) of a block that returns its non-negative input, from a fresh one.

    residual: the last BN's scale and shift are zero, so the branch adds exactly 0 in both
    modes; the branch's other parameters keep their fresh initialisation, so it can learn.
    plain: Dirac convs, and each BN gets the (mean, var) of its input from `inputs` as running
    statistics, scale sqrt(var + eps) and shift mean, so in eval mode it is the identity and
    in training mode nearly so; `inputs` None keeps the running statistics it has.
    """
    convs, conv_stats = dict(params["convs"]), dict(stats["convs"])
    if model == "residual":
        last = max(convs)
        bn = convs[last]["bn"]
        zero = {"scale": jnp.zeros_like(bn["scale"]), "bias": jnp.zeros_like(bn["bias"])}
        convs[last] = {**convs[last], "bn": {**bn, **zero}}
        return {**params, "convs": convs}, stats
    for c in sorted(convs):
        running = conv_stats[c]["bn"]
        mean, var = inputs[c] if inputs is not None else (running["mean"], running["var"])
        mean, var = jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)
        bn = {**convs[c]["bn"], "scale": jnp.sqrt(var + epsilon), "bias": mean}
        convs[c] = {**convs[c], "conv": {"kernel": dirac(convs[c]["conv"]["kernel"])}, "bn": bn}
        conv_stats[c] = {**conv_stats[c], "bn": {"mean": mean, "var": var}}
    return {**params, "convs": convs}, {**stats, "convs": conv_stats}


def construct(
    source: ModelSpec,
    target: ModelSpec,
    src: tuple[dict, dict],
    fresh: tuple[dict, dict],
    inputs: dict[str, tuple] | None = None,
) -> tuple[dict, dict]:
    """The target's (params, batch_stats) pure dicts: the source's layers plus identity blocks.

    `src` and `fresh` are (params, batch_stats) of the trained source and of a freshly drawn
    target; `inputs` maps each of extra_layers() to the (mean, var) of its BN's input (plain
    nets; None keeps the fresh running statistics, which eval mode ignores anyway).
    """
    check_construction(source, target)
    (src_params, src_stats), (dst_params, dst_stats) = src, fresh
    # Everything outside the stages (stem, its BN statistics, classifier) is copied.
    params = {**dst_params, **{k: v for k, v in src_params.items() if k != "stages"}}
    stats = {**dst_stats, **{k: v for k, v in src_stats.items() if k != "stages"}}
    params["stages"], stats["stages"] = {}, {}
    for s in dst_params["stages"]:
        new_p = stage_blocks(dst_params["stages"][s])
        new_s = stage_blocks(dst_stats["stages"][s])
        copied_p = stage_blocks(src_params["stages"][s])
        copied_s = stage_blocks(src_stats["stages"][s])
        n_src = len(copied_p)
        # Blocks 0..n_src-1 are the source's: block 0 carries the stage's stride and width
        # change, so the identities go after them, where input and output shapes agree.
        new_p[:n_src], new_s[:n_src] = copied_p, copied_s
        for b in range(n_src, len(new_p)):
            ins = None if inputs is None else [inputs[layer_name(s, b, c)] for c in range(2)]
            new_p[b], new_s[b] = identity_block(
                new_p[b], new_s[b], target.model, target.bn_epsilon, ins
            )
        params["stages"][s], stats["stages"][s] = stage_tree(new_p), stage_tree(new_s)
    return params, stats
