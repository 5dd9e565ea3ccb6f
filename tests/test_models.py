"""Model zoo: published parameter counts, MACs, shapes, shortcut options and the math of blocks."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_flax.models.counts import count_params, summarize
from resnet_flax.models.initializers import RUN_ONCE, stacked_modules
from resnet_flax.models.resnet import (
    Block,
    ResNet,
    Stage,
    abstract_model,
    build_model,
    flatten_responses,
)
from resnet_flax.models.spec import ModelSpec, SpecError, for_backend, resolve

# He et al. 2015 Table 6 (#params): ResNet-20/32/44/56/110/1202 = 0.27/0.46/0.66/0.85/1.7/19.4M
# (option A: no shortcut parameters, so the plain nets have the same counts).
CIFAR_PARAMS = {
    20: 269_722,
    32: 464_154,
    44: 658_586,
    56: 853_018,
    110: 1_727_962,
    1202: 19_421_274,
}
CIFAR_PAPER_MILLIONS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}
# torchvision's ResNet-18/34/50/101/152 (He et al. 2015 Table 1, projections where the shape
# changes): 11.69M, 21.80M, 25.56M, 44.55M, 60.19M; the exact numbers of its model docs.
IMAGENET_PARAMS = {
    18: 11_689_512,
    34: 21_797_672,
    50: 25_557_032,
    101: 44_549_160,
    152: 60_192_808,
}
# Our builder's counts, each also derived by hand in cifar_params below (He et al. 2015
# publish no counts for options B and C on CIFAR). B adds two 1x1 projections + BN at the
# stage changes (16->32, 32->64); C one in every unit.
CIFAR_B_PARAMS = {20: 272_474, 32: 466_906, 44: 661_338, 56: 855_770, 110: 1_730_714}
CIFAR_C_PARAMS = {20: 283_962, 32: 489_594, 44: 695_226, 56: 900_858, 110: 1_826_202}
# He et al. 2016 (Identity Mappings), pre-activation bottleneck nets with projections where the
# shape changes (KaimingHe/resnet-1k-layers): ResNet-164 1.7M, ResNet-1001 10.2M.
PREACT_PARAMS = {164: 1_703_258, 1001: 10_327_706}


def cifar_params(depth: int, model: str, shortcut: str, block: str) -> int:
    """A CIFAR net's parameters counted by hand from the papers' layer lists.

    conv k x k: k*k*cin*cout (no bias); BN: scale and shift per channel; classifier 64x10 + 10.
    Post-activation: a BN after every conv (the stem's included); pre-activation (He et al.
    2016): a BN before every branch conv, none after the stem, projections without BN, and one
    final BN. Bottleneck units: 1x1 (w), 3x3 (w), 1x1 (4w).
    """
    preact, basic = model == "preact", block == "basic"
    n = (depth - 2) // (3 * (2 if basic else 3))
    total = 3 * 3 * 3 * 16 + (0 if preact else 2 * 16)
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
        cout = width if basic else 4 * width
        for unit in range(n):
            c = cin if unit == 0 else cout
            convs = (
                [(3, c, width), (3, width, cout)]
                if basic
                else [(1, c, width), (3, width, width), (1, width, cout)]
            )
            total += sum(k * k * a * b for k, a, b in convs)
            total += sum(2 * (a if preact else b) for _, a, b in convs)
            changes = unit == 0 and (stage > 0 or c != cout)
            if shortcut == "C" or (shortcut == "B" and changes):
                total += c * cout + (0 if preact else 2 * cout)
        cin = cout
    return total + (2 * cin if preact else 0) + cin * 10 + 10


def weights_only(model) -> int:
    """Parameters outside BatchNorm: conv kernels and the classifier."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return sum(
        math.prod(leaf.shape)
        for path, leaf in leaves
        if not any(getattr(k, "key", None) == "bn" for k in path)
    )


@pytest.mark.parametrize("depth,expected", CIFAR_PARAMS.items())
def test_cifar_option_a_counts_match_paper(depth, expected):
    for model in ("residual", "plain"):
        assert count_params(abstract_model(ModelSpec(model=model, depth=depth))) == expected
    assert cifar_params(depth, "residual", "A", "basic") == expected
    assert round(expected / 1e6, 2 if depth < 100 else 1) == CIFAR_PAPER_MILLIONS[depth]
    assert resolve(ModelSpec(depth=depth)).weighted_layers == depth


@pytest.mark.parametrize("depth", CIFAR_B_PARAMS)
def test_cifar_option_b_and_c_counts(depth):
    for shortcut, pinned in (("B", CIFAR_B_PARAMS), ("C", CIFAR_C_PARAMS)):
        count = count_params(abstract_model(ModelSpec(depth=depth, shortcut=shortcut)))
        assert count == pinned[depth] == cifar_params(depth, "residual", shortcut, "basic")
    # B: two projections + BN, 16*32 + 2*32 + 32*64 + 2*64 = 2752 over option A at any depth
    assert CIFAR_B_PARAMS[depth] - CIFAR_PARAMS[depth] == 2_752


@pytest.mark.parametrize("depth,expected", PREACT_PARAMS.items())
def test_preact_bottleneck_counts_match_identity_mappings(depth, expected):
    model = abstract_model(ModelSpec(model="preact", depth=depth, shortcut="B"))
    assert count_params(model) == expected == cifar_params(depth, "preact", "B", "bottleneck")
    # The paper's 10.2M for ResNet-1001 is its conv and classifier weights (10.18M); with
    # BN's scales and shifts (149,216 more) resnet-1k-layers' net has 10.33M. 164: 1.7M both.
    paper = {164: 1.7, 1001: 10.2}[depth]
    assert round(weights_only(model) / 1e6, 1) == paper
    assert round(expected / 1e6, 1) == (1.7 if depth == 164 else 10.3)


def test_preact_basic_counts_by_hand():
    for depth in (20, 110):
        for shortcut in ("A", "B"):
            spec = ModelSpec(model="preact", depth=depth, shortcut=shortcut)
            expected = cifar_params(depth, "preact", shortcut, "basic")
            assert count_params(abstract_model(spec)) == expected
    # A pre-activation net has as many BNs as the original (one moves from stem to head).
    assert cifar_params(110, "preact", "A", "basic") == CIFAR_PARAMS[110]


@pytest.mark.parametrize("depth,expected", IMAGENET_PARAMS.items())
def test_imagenet_option_b_counts_match_torchvision(depth, expected):
    spec = ModelSpec(depth=depth, family="imagenet", shortcut="B", num_classes=1000)
    assert count_params(abstract_model(spec)) == expected
    assert resolve(spec).weighted_layers == depth


def test_imagenet_option_a_drops_the_three_projections():
    # ResNet-18/34 with option A (He et al. 2015 Table 2): the B count less the 1x1 projections
    # + BN at the three stage changes (64->128, 128->256, 256->512).
    projections = sum(a * b + 2 * b for a, b in ((64, 128), (128, 256), (256, 512)))
    for depth in (18, 34):
        spec = ModelSpec(depth=depth, family="imagenet", shortcut="A", num_classes=1000)
        assert count_params(abstract_model(spec)) == IMAGENET_PARAMS[depth] - projections


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(depth=50, family="imagenet", shortcut="B", num_classes=1000),
        ModelSpec(model="preact", depth=164, shortcut="B"),
    ],
)
def test_conventions_keep_the_parameter_count(spec):
    # Where the stride sits, how strided convs pad and what a shortcut takes: no new weights.
    base = count_params(abstract_model(spec))
    for change in (
        {"bottleneck_stride": "1x1"},
        {"strided_padding": "same"},
        {"preact_first_shortcut": "activated"},
    ):
        assert count_params(abstract_model(spec.replace(**change))) == base, change


@pytest.mark.parametrize("depth,macs", [(20, 40.55e6), (56, 125.49e6), (110, 252.89e6)])
def test_cifar_macs(depth, macs):
    summary = summarize(ModelSpec(depth=depth))
    assert summary.macs == pytest.approx(macs, rel=0.01)
    assert summary.weighted_layers == depth


def test_resnet50_macs():
    spec = ModelSpec(depth=50, family="imagenet", shortcut="B", num_classes=1000)
    assert summarize(spec).macs == pytest.approx(4.09e9, rel=0.02)


@pytest.mark.parametrize("depth,gmacs", [(50, 3.8), (152, 11.3)])
def test_stride_on_the_first_1x1_gives_the_papers_flops(depth, gmacs):
    # He et al. 2015 Table 1 "FLOPs" (multiply-adds): 3.8e9 / 11.3e9, with the stride on the
    # first 1x1 as in its Caffe prototxt (3.86 / 11.28 here); on the 3x3 (torchvision) 4.09 / 11.51.
    spec = ModelSpec(depth=depth, family="imagenet", shortcut="B", num_classes=1000)
    assert summarize(spec.replace(bottleneck_stride="1x1")).macs == pytest.approx(
        gmacs * 1e9, rel=0.02
    )
    assert summarize(spec).macs > 1.015 * gmacs * 1e9


def test_preact_block_kinds_by_depth():
    assert resolve(ModelSpec(model="preact", depth=1001)).block == "bottleneck"
    assert resolve(ModelSpec(model="preact", depth=110)).block == "basic"


def test_option_c_projects_every_block_and_b_only_at_changes():
    def projections(shortcut):
        model = abstract_model(ModelSpec(depth=20, shortcut=shortcut))
        n = 0
        for stage in model.stages:
            n += stage.first.projection is not None
            if stage.rest is not None and stage.rest.projection is not None:
                n += stage.num_rest
        return n

    assert projections("A") == 0
    assert projections("B") == 2  # the two stage changes of the CIFAR net
    assert projections("C") == 9
    a = count_params(abstract_model(ModelSpec(depth=20, shortcut="A")))
    c = count_params(abstract_model(ModelSpec(depth=20, shortcut="C")))
    assert c > a


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(depth=57), "CIFAR depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...)"),
        (dict(depth=57), "got 57"),
        (dict(depth=20, family="imagenet"), "18, 34, 50, 101, 152; got 20"),
        (dict(model="dense"), "model must be one of plain, residual, preact"),
        (dict(shortcut="D"), "shortcut must be one of A, B, C"),
        (dict(depth=32, block="bottleneck"), "9n+2 (164, 1001, ...); got 32"),
        (dict(bn_batch=0), "bn_batch must be a positive integer or null"),
        (
            dict(bottleneck_stride="2x2"),
            "bottleneck_stride must be one of 3x3, 1x1; got '2x2'",
        ),
        (
            dict(strided_padding="SAME"),
            "strided_padding must be one of symmetric, same; got 'SAME'",
        ),
        (
            dict(preact_first_shortcut="identity"),
            "preact_first_shortcut must be one of raw, activated; got 'identity'",
        ),
    ],
)
def test_invalid_specs_name_the_valid_values(fields, message):
    # A spec is checked when built: an invalid one never exists.
    with pytest.raises(SpecError, match=re.escape(message)):
        ModelSpec(**fields)


@pytest.mark.parametrize("model", ["plain", "residual", "preact"])
def test_output_shapes_and_responses(model):
    net = build_model(ModelSpec(model=model, depth=8, in_channels=1, num_classes=7))
    x = jnp.ones((2, 8, 8, 1))
    logits, responses = net(x, train=True, capture=True)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    named = flatten_responses(responses)
    assert len(named) == 6  # 3 stages x 1 block x 2 convs
    assert named[-1][1].shape == (2, 2, 2, 64)


def test_imagenet_output_shape():
    net = build_model(ModelSpec(depth=18, family="imagenet", num_classes=5))
    assert net(jnp.ones((1, 64, 64, 3))).shape == (1, 5)


def test_bfloat16_compute_keeps_float32_params():
    net = build_model(ModelSpec(depth=8, precision="bfloat16"))
    logits, responses = net(jnp.ones((2, 8, 8, 3)), train=True, capture=True)
    assert logits.dtype == jnp.float32
    assert flatten_responses(responses)[0][1].dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(nnx.state(net, nnx.Param))} == {jnp.dtype("float32")}


def _zero_branch(block: Block) -> None:
    """Make the residual branch output exactly zero (last BN scale and shift set to 0)."""
    bn = block.convs[-1].bn
    bn.scale.value = jnp.zeros_like(bn.scale.value)
    bn.bias.value = jnp.zeros_like(bn.bias.value)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_zeroed_branch_is_identity_on_nonnegative_inputs(kind):
    spec = ModelSpec(depth=20)
    block = Block(spec, kind, 16, 4 if kind == "bottleneck" else 16, 16, 1, nnx.Rngs(0))
    _zero_branch(block)
    x = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 6, 6, 16)))
    for train in (True, False):
        y, _ = block(x, train)
        np.testing.assert_allclose(y, x, atol=1e-6)


def test_zero_init_residual_option_makes_blocks_identity_at_init():
    net = build_model(ModelSpec(depth=8, zero_init_residual=True))
    scale = net.stages[0].first.convs[-1].bn.scale.value
    assert float(jnp.abs(scale).max()) == 0.0
    assert float(net.stages[0].first.convs[0].bn.scale.value.min()) == 1.0


def test_scanned_stage_equals_sequential_blocks():
    from resnet_flax.models.spec import StagePlan

    spec = ModelSpec(depth=20)
    stage = Stage(spec, "basic", 16, StagePlan(3, 16, 16, 1), nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16))
    expected, _ = stage.first(x, False)
    graphdef, state = nnx.split(stage.rest)
    for i in range(stage.num_rest):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
        expected, _ = block(expected, False)
    got, _ = stage(x, False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", [2, 3])  # 2: one block after the first (no scan at all)
def test_unrolled_stage_equals_scanned_stage_in_training(blocks):
    from resnet_flax.models.spec import StagePlan

    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 16))
    results = {}
    for loop in ("scan", "unroll"):
        spec = ModelSpec(depth=20, stage_loop=loop)
        stage = Stage(spec, "basic", 16, StagePlan(blocks, 16, 16, 1), nnx.Rngs(3))
        graphdef, params, rest = nnx.split(stage, nnx.Param, ...)

        def loss(p, graphdef=graphdef, rest=rest):
            model = nnx.merge(graphdef, p, rest, copy=True)
            out, responses = model(x, True)
            return jnp.sum(out**2), (nnx.state(model, nnx.BatchStat), responses)

        (value, (stats, responses)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[loop] = (value, stats, responses, grads)
    for a, b in zip(
        jax.tree.leaves(results["scan"]), jax.tree.leaves(results["unroll"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_remat_gives_the_same_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))

    def grads(remat):
        net = build_model(ModelSpec(depth=8, remat=remat), seed=1)
        graphdef, params, rest = nnx.split(net, nnx.Param, ...)

        def loss(p):
            return jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x, train=True) ** 2)

        return jax.jit(jax.grad(loss))(params)

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_stacked_blocks_draw_what_nnx_vmap_draws_over_split_rngs():
    # Fails when a stacked block gets another key than nnx.split_rngs + nnx.vmap give it (a
    # split of another key, counts not restarting at 0), the stream is not advanced once,
    # or the host stacking reorders blocks.
    spec = for_backend(ModelSpec(depth=20), jax.default_backend())
    make = functools.partial(Block, spec, "basic", 16, 16, 16, 1)

    def vmapped(seed: jax.Array) -> tuple:
        """Flax's way, in one program as build_model drew before: stack and the next key."""
        rngs = nnx.Rngs(jax.random.key(seed))
        create = nnx.split_rngs(splits=5)(nnx.vmap(make, in_axes=(0,), out_axes=0))
        return nnx.state(create(rngs)), jax.random.key_data(rngs.default())

    want, want_next = jax.jit(vmapped).lower(7).compile(compiler_options=RUN_ONCE)(7)
    rngs = nnx.Rngs(jax.random.key(7))
    got = nnx.state(stacked_modules(make, rngs, 5))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape[0] == 5 and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.random.key_data(rngs.default()), want_next)


def test_drawn_network_equals_the_network_drawn_in_one_program():
    # Fails when drawing parameter by parameter changes a value (a key, a scale, the order
    # of the stacked blocks) against the single program of the whole network (the traced
    # path: nnx.vmap over split keys, every initializer inline), or seeds give one network.
    spec = ModelSpec(model="preact", depth=14, in_channels=1)
    arch = resolve(for_backend(spec, jax.default_backend()))
    whole = jax.jit(lambda seed: nnx.state(ResNet(arch, rngs=nnx.Rngs(jax.random.key(seed)))))
    one_program = whole.lower(3).compile(compiler_options=RUN_ONCE)(3)
    drawn = nnx.state(build_model(spec, seed=3))
    assert jax.tree.structure(drawn) == jax.tree.structure(one_program)
    for got, want in zip(jax.tree.leaves(drawn), jax.tree.leaves(one_program), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    other = nnx.state(build_model(spec, seed=4))
    pairs = zip(jax.tree.leaves(other), jax.tree.leaves(drawn), strict=True)
    assert not all(np.array_equal(a, b) for a, b in pairs)


def test_networks_of_one_family_share_every_initialisation_program():
    # Fails when a depth, a model or a seed makes initialisation lower a program of its own
    # (a program the size of the network, or of a stage's stack of blocks).
    build_model(ModelSpec(model="plain", depth=20, in_channels=1), seed=0)  # the family's
    lowered = []

    def count(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        for model, depth, seed in (("residual", 56, 1), ("plain", 14, 2), ("residual", 8, 3)):
            build_model(ModelSpec(model=model, depth=depth, in_channels=1), seed=seed)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert lowered == []


def test_group_batchnorm_normalises_each_group_on_its_own():
    from resnet_flax.models.batchnorm import GroupBatchNorm

    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 3 + 1
    whole = GroupBatchNorm(3, group=8, momentum=0.9, rngs=nnx.Rngs(0))
    reference = nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(
        whole(x, use_running_average=False), reference(x, use_running_average=False)
    )
    grouped = GroupBatchNorm(3, group=4, momentum=0.9, rngs=nnx.Rngs(0))
    halves = [nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0)) for _ in range(2)]
    expected = jnp.concatenate(
        [bn(x[i * 4 : i * 4 + 4], use_running_average=False) for i, bn in enumerate(halves)]
    )
    got = grouped(x, use_running_average=False)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, reference(x, use_running_average=False), atol=1e-3)
    # the running statistics move towards the mean over groups
    for name in ("mean", "var"):
        average = (getattr(halves[0], name)[...] + getattr(halves[1], name)[...]) / 2
        np.testing.assert_allclose(getattr(grouped, name)[...], average, rtol=1e-6, atol=1e-7)
    # inference uses the running averages, as nnx.BatchNorm
    np.testing.assert_allclose(
        grouped(x, use_running_average=True),
        (x - grouped.mean[...]) / jnp.sqrt(grouped.var[...] + 1e-5),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="bn_batch 4 does not divide the batch size 6"):
        grouped(x[:6], use_running_average=False)


def test_bn_batch_trains_each_group_as_its_own_batch():
    # The paper's batch 128 on two GPUs: one step on the whole batch with bn_batch=half equals
    # the net applied to each half alone (BN statistics and all).
    spec = ModelSpec(depth=8, in_channels=1)
    x = jax.random.normal(jax.random.key(2), (8, 8, 8, 1))
    grouped = build_model(spec.replace(bn_batch=4), seed=1)
    logits = grouped(x, train=True)
    halves = [build_model(spec, seed=1)(x[i : i + 4], train=True) for i in (0, 4)]
    np.testing.assert_allclose(logits, jnp.concatenate(halves), rtol=1e-5, atol=1e-5)
    whole = build_model(spec.replace(bn_batch=8), seed=1)(x, train=True)
    np.testing.assert_array_equal(whole, build_model(spec, seed=1)(x, train=True))


SHARDED_BN = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from resnet_flax.models.spec import ModelSpec
from resnet_flax.models.resnet import build_model
x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
mesh = Mesh(np.array(jax.devices()), ("data",))
for bn_batch in (None, 4, 2):
    graphdef, state = nnx.split(build_model(ModelSpec(depth=8, bn_batch=bn_batch), seed=0))
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=True))
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    got = forward(state, sharded)
    text = forward.lower(state, sharded).compile().as_text()
    np.testing.assert_allclose(got, forward(state, jax.device_put(x, jax.devices()[0])), atol=1e-5)
    print(bn_batch, text.count(" all-reduce("))
"""


def test_bn_batch_on_devices_matches_one_device_and_skips_all_reduces():
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run(
        [sys.executable, "-c", SHARDED_BN], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    counts = dict(line.split() for line in out.stdout.split("\n") if line)
    # 8 images on 4 devices: whole-batch BN all-reduces its statistics; groups of 4 span two
    # devices (still all-reduced, within pairs); groups of 2 lie on one device: no all-reduce.
    assert int(counts["None"]) > 0 and int(counts["4"]) > 0
    assert int(counts["2"]) == 0
