"""Model specification and its validation: which blocks, widths and strides a depth means."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODELS = ("plain", "residual", "preact")
FAMILIES = ("cifar", "imagenet")
SHORTCUTS = ("A", "B", "C")
BLOCKS = ("auto", "basic", "bottleneck")
DTYPES = ("float32", "bfloat16")
# Conventions on which published implementations of the same network differ.
BOTTLENECK_STRIDES = ("3x3", "1x1")
STRIDED_PADDINGS = ("symmetric", "same")
PREACT_FIRST_SHORTCUTS = ("raw", "activated")
# Cures for degradation other than shortcuts (docs/design.md, "Training without shortcuts").
NORMS = ("batch", "none")
ACTIVATIONS = ("relu", "tanh", "leaky_relu", "tat")
INITS = ("he_normal", "delta_orthogonal", "suo_delta")
BRANCHES = ("plain", "fixup", "skipinit")

# ImageNet family, He et al. 2015 Table 1: blocks per stage and the block kind.
IMAGENET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
# He et al. 2016 use bottleneck units from 164 layers on; below that basic units.
CIFAR_BOTTLENECK_FROM = 164


class SpecError(ValueError):
    """An impossible model choice; the message names the valid values."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines a network; plain values only so configs map onto it directly."""

    model: str = "residual"
    depth: int = 20
    family: str = "cifar"
    shortcut: str = "A"
    block: str = "auto"
    # Taken from the dataset in a training run (not keys of its command).
    num_classes: int = field(default=10, metadata={"from_data": True})
    in_channels: int = field(default=3, metadata={"from_data": True})
    zero_init_residual: bool = False
    remat: bool = False
    precision: str = "float32"  # activations' dtype (parameters stay float32)
    bn_momentum: float = 0.9  # PyTorch's momentum 0.1 in Flax's convention
    bn_epsilon: float = 1e-5
    # Images per BatchNorm statistics group in training; None: the whole batch. He et al.
    # 2015 trained batch 128 on two GPUs, each normalising its own 64 images (bn_batch=64).
    bn_batch: int | None = None
    conv_impl: str = "auto"
    # Identical blocks are stacked and applied with a scan (compile time flat in depth);
    # "unroll" emits them one by one. "auto": unroll on CPU, where the scanned step is a
    # little slower (docs/performance.md), scan on accelerators.
    stage_loop: str = "auto"
    # Conventions on which published implementations differ (none changes the parameter count):
    # where a bottleneck unit's stride sits; how strided 3x3 convs and the max pool pad (the
    # 7x7 stem conv pads 3/3 either way); what a pre-activation net's stage-first unit passes
    # to an identity/option-A shortcut (projections always take the BN-ReLU'd input).
    # "3x3": torchvision, Flax examples (v1.5); "1x1": He 2015 Caffe prototxt, resnet-1k-layers.
    bottleneck_stride: str = "3x3"
    # "symmetric": 1/1 as torchvision; "same": SAME (0/1 on even maps), TF official, Flax examples.
    strided_padding: str = "symmetric"
    # "raw": the unit's input (He 2016 eq. 3); "activated": fb.resnet.torch's shared BN-ReLU.
    preact_first_shortcut: str = "raw"
    # Without BatchNorm ("none") each conv gets a zero-initialised bias, except under Fixup,
    # whose scalar biases replace it (Zhang et al. 2019).
    norm: str = "batch"
    # "tat": leaky ReLU transformed by TAT (Zhang et al. 2022) for this net's depth, via dks.
    activation: str = "relu"
    leaky_relu_slope: float = 0.01  # negative slope of activation=leaky_relu
    # TAT's target for the net's C map at 0 (eta); deeper nets reach higher targets.
    tat_target: float = 0.9
    # "delta_orthogonal": Xiao et al. 2018; "suo_delta": DKS/TAT's scaled uniform orthogonal.
    init: str = "he_normal"
    # delta_orthogonal's weight and bias variances, at tanh's critical point (Xiao et al. 2018).
    sigma_w2: float = 1.05
    sigma_b2: float = 2.01e-5
    # Residual branches without BN: "fixup" (Zhang et al. 2019) or "skipinit" (De & Smith 2020,
    # ReZero): a learnable scalar, initialised to 0, multiplies each branch.
    branch: str = "plain"

    def __post_init__(self) -> None:
        resolve(self)  # a spec that exists is valid: SpecError names what is

    def replace(self, **changes) -> ModelSpec:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def variant(self) -> str:
        """The model and its options that differ from He et al.'s: 'plain-nobn-tat-suo_delta'."""
        paper = {f.name: f.default for f in dataclasses.fields(self)}
        parts = [self.model, "nobn" if self.norm == "none" else ""]
        parts += [
            getattr(self, k)
            for k in ("activation", "init", "branch")
            if getattr(self, k) != paper[k]
        ]
        return "-".join(p for p in parts if p)


@dataclass(frozen=True)
class StagePlan:
    """One stage: how many blocks, their inner width, output width and first stride."""

    num_blocks: int
    width: int
    out_width: int
    stride: int


@dataclass(frozen=True)
class Architecture:
    """A validated spec resolved into stem, stages and block kind."""

    spec: ModelSpec
    block: str  # basic | bottleneck
    stem_width: int
    stages: tuple[StagePlan, ...]

    @property
    def convs_per_block(self) -> int:
        """Weighted layers on a block's residual branch."""
        return 2 if self.block == "basic" else 3

    @property
    def num_blocks(self) -> int:
        """Residual units (or plain blocks) in all stages: Fixup's L."""
        return sum(s.num_blocks for s in self.stages)

    @property
    def weighted_layers(self) -> int:
        """Stem conv + branch convs + the classifier, as the paper counts depth."""
        return 1 + self.convs_per_block * self.num_blocks + 1

    @property
    def num_activations(self) -> int:
        """Activations a plain net applies in a chain: after the stem and after each conv."""
        return self.weighted_layers - 1

    def conv_channels(self) -> list[tuple[int, int]]:
        """(c_in, c_out) of the stem and every branch conv, in layer order."""
        pairs, cin = [(self.spec.in_channels, self.stem_width)], self.stem_width
        for plan in self.stages:
            for b in range(plan.num_blocks):
                a = cin if b == 0 else plan.out_width
                inner = [] if self.block == "basic" else [(plan.width, plan.width)]
                pairs += [(a, plan.width), *inner, (plan.width, plan.out_width)]
            cin = plan.out_width
        return pairs


def _cifar_block(depth: int, requested: str) -> str:
    """Pick the CIFAR block kind for a depth, or explain which depths are valid."""
    basic_ok = depth >= 8 and (depth - 2) % 6 == 0
    bottleneck_ok = depth >= 11 and (depth - 2) % 9 == 0
    if requested == "basic":
        if not basic_ok:
            raise SpecError(
                f"CIFAR depth with basic blocks must be 6n+2 (20, 32, 44, 56, 110, 1202, ...); "
                f"got {depth}"
            )
        return "basic"
    if requested == "bottleneck":
        if not bottleneck_ok:
            raise SpecError(
                f"CIFAR depth with bottleneck blocks must be 9n+2 (164, 1001, ...); got {depth}"
            )
        return "bottleneck"
    if bottleneck_ok and depth >= CIFAR_BOTTLENECK_FROM:
        return "bottleneck"
    if basic_ok:
        return "basic"
    if bottleneck_ok:
        return "bottleneck"
    raise SpecError(
        f"CIFAR depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...) or, for bottleneck blocks, "
        f"9n+2 (164, 1001, ...); got {depth}"
    )


def _check_choice(name: str, value, valid) -> None:
    """Raise one clear line when value is not among valid."""
    if value not in valid:
        raise SpecError(f"{name} must be one of {', '.join(map(str, valid))}; got {value!r}")


def check_bn_batch(bn_batch: int | None, batch_size: int) -> None:
    """Raise SpecError unless bn_batch (None: the whole batch) divides the training batch."""
    if bn_batch is not None and batch_size % bn_batch:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise SpecError(
            f"bn_batch {bn_batch} does not divide the batch size {batch_size}: each BatchNorm "
            f"group takes bn_batch images; use one of {', '.join(map(str, divisors))} "
            "or null (the whole batch)"
        )


def resolve(spec: ModelSpec) -> Architecture:
    """Validate a spec and resolve it into stages; raises SpecError with the valid values."""
    arch = _architecture(spec)
    check_options(arch)
    return arch


def _architecture(spec: ModelSpec) -> Architecture:
    """Validate the network's shape fields and resolve it into stem, stages and blocks."""
    _check_choice("model", spec.model, MODELS)
    _check_choice("family", spec.family, FAMILIES)
    _check_choice("shortcut", spec.shortcut, SHORTCUTS)
    _check_choice("block", spec.block, BLOCKS)
    _check_choice("precision", spec.precision, DTYPES)
    _check_choice("conv_impl", spec.conv_impl, ("auto", "xla", "fast"))
    _check_choice("stage_loop", spec.stage_loop, ("auto", "scan", "unroll"))
    _check_choice("bottleneck_stride", spec.bottleneck_stride, BOTTLENECK_STRIDES)
    _check_choice("strided_padding", spec.strided_padding, STRIDED_PADDINGS)
    _check_choice("preact_first_shortcut", spec.preact_first_shortcut, PREACT_FIRST_SHORTCUTS)
    if not isinstance(spec.depth, int) or isinstance(spec.depth, bool):
        raise SpecError(f"depth must be an integer; got {spec.depth!r}")
    if spec.num_classes < 2:
        raise SpecError(f"num_classes must be at least 2; got {spec.num_classes}")
    if spec.in_channels < 1:
        raise SpecError(f"in_channels must be at least 1; got {spec.in_channels}")
    if not 0.0 <= spec.bn_momentum < 1.0:
        raise SpecError(f"bn_momentum must be in [0, 1); got {spec.bn_momentum}")
    if spec.bn_batch is not None and (
        not isinstance(spec.bn_batch, int) or isinstance(spec.bn_batch, bool) or spec.bn_batch < 1
    ):
        raise SpecError(
            f"bn_batch must be a positive integer or null (the whole batch); got {spec.bn_batch!r}"
        )

    if spec.family == "cifar":
        block = _cifar_block(spec.depth, spec.block)
        per_block = 2 if block == "basic" else 3
        n = (spec.depth - 2) // per_block // 3
        expansion = 1 if block == "basic" else BOTTLENECK_EXPANSION
        stages = tuple(
            StagePlan(n, w, w * expansion, 1 if i == 0 else 2) for i, w in enumerate(CIFAR_WIDTHS)
        )
        return Architecture(spec, block, CIFAR_WIDTHS[0], stages)

    if spec.depth not in IMAGENET_DEPTHS:
        valid = ", ".join(map(str, IMAGENET_DEPTHS))
        raise SpecError(f"ImageNet depth must be one of {valid}; got {spec.depth}")
    block, counts = IMAGENET_DEPTHS[spec.depth]
    if spec.block not in ("auto", block):
        raise SpecError(f"ImageNet depth {spec.depth} uses {block} blocks; got block={spec.block}")
    expansion = 1 if block == "basic" else BOTTLENECK_EXPANSION
    stages = tuple(
        StagePlan(c, w, w * expansion, 1 if i == 0 else 2)
        for i, (c, w) in enumerate(zip(counts, IMAGENET_WIDTHS, strict=True))
    )
    return Architecture(spec, block, IMAGENET_WIDTHS[0], stages)


def for_backend(spec: ModelSpec, backend: str) -> ModelSpec:
    """The spec with every "auto" decided for a JAX backend ("cpu", "gpu", "tpu").

    Blocks by depth; the custom-VJP convolution and unrolled stages on CPU (where XLA's
    convolution gradients and scanned stages are slower, docs/performance.md); XLA's
    convolutions and scanned stages elsewhere. A run records this resolved spec.
    """
    cpu = backend == "cpu"
    conv_impl = spec.conv_impl if spec.conv_impl != "auto" else ("fast" if cpu else "xla")
    loop = spec.stage_loop if spec.stage_loop != "auto" else ("unroll" if cpu else "scan")
    return spec.replace(block=resolve(spec).block, conv_impl=conv_impl, stage_loop=loop)


def complete_spec(
    spec: ModelSpec, num_classes: int, in_channels: int, batch_size: int | None = None
) -> ModelSpec:
    """The spec with the dataset's classes and channels, checked (and against the batch)."""
    spec = dataclasses.replace(spec, num_classes=num_classes, in_channels=in_channels)
    resolve(spec)
    if batch_size is not None:
        check_bn_batch(spec.bn_batch, batch_size)
    return spec


def _option_conflicts(arch: Architecture) -> list[tuple[bool, str]]:
    """(broken, why and what to do) for each combination the options' sources do not support."""
    spec = arch.spec
    no_bn, delta = spec.norm == "none", spec.init in ("delta_orthogonal", "suo_delta")
    narrowing = [(a, b) for a, b in arch.conv_channels() if a > b]
    return [
        (
            no_bn and spec.zero_init_residual,
            "zero_init_residual zeroes the last BatchNorm scale of each branch and norm=none "
            "has no BatchNorm; use branch=skipinit or branch=fixup to start branches at zero",
        ),
        (
            spec.activation == "tat" and not no_bn,
            "activation=tat shapes the kernel of a net without normalisation layers (dks "
            "rejects BatchNorm with TAT); set norm=none",
        ),
        (
            spec.activation == "tat" and spec.model != "plain",
            f"activation=tat is built for nets without shortcuts (TAT's vanilla nets); got "
            f"model={spec.model}: set model=plain",
        ),
        (
            spec.activation == "tat" and spec.init != "suo_delta",
            f"activation=tat assumes TAT's scaled uniform orthogonal delta init; got "
            f"init={spec.init}: set init=suo_delta",
        ),
        (
            delta and not no_bn,
            f"init={spec.init} is for nets without normalisation (Xiao et al. 2018, Martens "
            "et al. 2021; with BatchNorm gradients explode at initialisation whatever the "
            "init, Yang et al. 2019); set norm=none",
        ),
        (
            delta and spec.model != "plain",
            f"init={spec.init} is for nets without shortcuts; got model={spec.model}: set "
            "model=plain, or init=he_normal with branch=fixup or skipinit",
        ),
        (
            spec.init == "delta_orthogonal" and spec.activation != "tanh",
            f"init=delta_orthogonal's critical point (sigma_w2, sigma_b2) is tanh's; "
            f"activation={spec.activation} cannot reach dynamical isometry (Pennington et al. "
            "2017): set activation=tanh, or init=suo_delta",
        ),
        (
            spec.init == "delta_orthogonal" and bool(narrowing),
            "init=delta_orthogonal needs c_in <= c_out in every conv (an orthogonal "
            f"c_in x c_out centre tap); this net has {narrowing[0][0]} -> {narrowing[0][1]} "
            f"({arch.block} blocks): use init=suo_delta or basic blocks"
            if narrowing
            else "",
        ),
        (
            spec.branch != "plain" and spec.model != "residual",
            f"branch={spec.branch} rescales residual branches of post-activation units (both "
            f"sources' CIFAR code); got model={spec.model}: set model=residual",
        ),
        (
            spec.branch != "plain" and not no_bn,
            f"branch={spec.branch} replaces BatchNorm in residual nets; set norm=none",
        ),
    ]


def check_options(arch: Architecture) -> None:
    """Raise SpecError (one line) for an option value or combination its source lacks."""
    spec = arch.spec
    _check_choice("norm", spec.norm, NORMS)
    _check_choice("activation", spec.activation, ACTIVATIONS)
    _check_choice("init", spec.init, INITS)
    _check_choice("branch", spec.branch, BRANCHES)
    if not 0.0 <= spec.leaky_relu_slope < 1.0:
        raise SpecError(f"leaky_relu_slope must be in [0, 1); got {spec.leaky_relu_slope}")
    if not 0.0 < spec.tat_target < 1.0:
        raise SpecError(f"tat_target (TAT's c(0) target) must be in (0, 1); got {spec.tat_target}")
    if spec.sigma_w2 <= 0.0 or spec.sigma_b2 < 0.0:
        raise SpecError(
            f"sigma_w2 must be > 0 and sigma_b2 >= 0; got {spec.sigma_w2} and {spec.sigma_b2}"
        )
    for broken, why in _option_conflicts(arch):
        if broken:
            raise SpecError(why)
    if spec.activation == "tat":
        _check_tat_target(arch)


def _check_tat_target(arch: Architecture) -> None:
    """Raise SpecError when dks finds TAT's c(0) target unreachable at this depth."""
    from resnet_flax.models.tat import UnreachableTarget, tat_constants

    spec = arch.spec
    try:
        tat_constants(arch.num_activations, spec.tat_target)
    except UnreachableTarget as err:
        raise SpecError(
            f"activation=tat: depth {spec.depth} chains {err.num_activations} leaky ReLUs, "
            f"which reach c(0) = {err.reachable:.3f} at most, below tat_target={spec.tat_target}"
            f": set tat_target below {err.reachable:.3f}, use a deeper net, or another "
            "activation"
        ) from None
