"""The cures for degradation other than shortcuts change the network as their sources say:
BatchNorm off, delta-orthogonal and SUO-delta inits, TAT's leaky ReLU, Fixup and SkipInit."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from flax import nnx
from jax import lax

from resnet_flax.models.counts import count_params
from resnet_flax.models.layers import option_a_shortcut
from resnet_flax.models.options import net_options, suo_delta
from resnet_flax.models.resnet import ResNet, abstract_model, build_model
from resnet_flax.models.spec import ModelSpec, SpecError, resolve
from resnet_flax.models.tat import tat_constants

ROOT = Path(__file__).resolve().parent.parent
PLAIN_TANH = dict(model="plain", norm="none", init="delta_orthogonal", activation="tanh")
PLAIN_TAT = dict(model="plain", norm="none", init="suo_delta", activation="tat")
FIXUP = dict(model="residual", norm="none", branch="fixup")
SKIPINIT = dict(model="residual", norm="none", branch="skipinit")


def net(depth: int = 8, seed: int = 0, **options) -> ResNet:
    """A digits-shaped net (1 input channel) with the given options."""
    return build_model(ModelSpec(depth=depth, in_channels=1, **options), seed)


def kernels(model: ResNet) -> list[np.ndarray]:
    """Every conv kernel of the stem and the stages, blocks of a stack unstacked."""
    found = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        name = jax.tree_util.keystr(path)
        if "'kernel'" in name and "'head'" not in name:
            array = np.asarray(leaf)
            found += list(array) if array.ndim == 5 else [array]
    return found


def blocks(model: ResNet) -> list:
    """Every block of the net in order (stacked blocks split out)."""
    found = []
    for stage in model.stages:
        found.append(stage.first)
        if stage.rest is not None:
            graphdef, state = nnx.split(stage.rest)
            for i in range(stage.num_rest):
                found.append(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)))
    return found


def images(shape=(6, 8, 8, 1), seed: int = 1) -> jax.Array:
    """Random inputs of the digits' shape."""
    return jax.random.normal(jax.random.key(seed), shape)


# --- delta-orthogonal (Xiao et al. 2018) and SUO-delta (DKS/TAT) --------------------------------


def test_delta_orthogonal_kernels_are_an_orthogonal_centre_tap_scaled_by_sigma_w():
    # Off-centre taps zero; the centre C (c_in x c_out) has orthogonal rows of norm sigma_w:
    # C C^T = sigma_w^2 I. sigma_w^2 = 1.7 tells sigma_w from sigma_w^2 (and from 1).
    model = net(**PLAIN_TANH, sigma_w2=1.7, sigma_b2=0.04)
    found = kernels(model)
    assert len(found) == 7  # stem + 3 blocks x 2 convs
    for kernel in found:
        centre = kernel[1, 1]
        off = kernel.copy()
        off[1, 1] = 0.0
        assert np.abs(off).max() == 0.0
        np.testing.assert_allclose(centre @ centre.T, 1.7 * np.eye(centre.shape[0]), atol=1e-5)
    biases = np.concatenate(
        [np.ravel(b) for b in jax.tree.leaves(nnx.state(model.stages, nnx.Param)) if b.ndim == 1]
    )
    assert len(biases) == 224  # 2 x (16 + 32 + 64) branch-conv biases, N(0, sigma_b^2)
    assert np.std(biases) == pytest.approx(0.2, rel=0.15)


def test_deep_orthogonal_nets_finish_drawing_their_parameters():
    # jaxlib's CPU QR waits on XLA's thread pool: two at once (stacked blocks, depth >= 44)
    # hung forever on 2 cores. A subprocess with a timeout fails instead of hanging.
    code = (
        "import jax; from flax import nnx; from resnet_flax.models.resnet import build_model;"
        "from resnet_flax.models.spec import ModelSpec;"
        "m = build_model(ModelSpec(model='plain', norm='none', init='delta_orthogonal',"
        "activation='tanh', depth=56, in_channels=1));"
        "jax.block_until_ready(nnx.state(m)); print('drawn')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert done.stdout.strip() == "drawn", done.stderr[-2000:]


def mean_square_per_location(x: jax.Array) -> np.ndarray:
    """The mean over channels of x^2 at each image and position."""
    return np.asarray(jnp.mean(jnp.square(x), axis=-1))


@pytest.mark.parametrize("layer", ["stem 1->16", "16->16", "16->32 stride 2"])
def test_suo_delta_keeps_the_per_channel_second_moment(layer):
    # SUO-delta scales the orthogonal centre by sqrt(c_out / c_in) when widening, so a
    # layer maps the per-channel second moment q to q exactly, at every position.
    model = net(depth=20, **PLAIN_TAT)
    conv, cin, stride = {
        "stem 1->16": (model.stem.conv, 1, 1),
        "16->16": (model.stages[0].first.convs[1].conv, 16, 1),
        "16->32 stride 2": (model.stages[1].first.convs[0].conv, 16, 2),
    }[layer]
    x = 1.5 * images((4, 8, 8, cin))
    y = conv(x) - conv.bias[...]  # biases start at zero anyway
    np.testing.assert_allclose(
        mean_square_per_location(y), mean_square_per_location(x)[:, ::stride, ::stride], rtol=1e-5
    )
    # Plain delta-orthogonal keeps the norm instead: 1 -> 16 channels divides q by 16.
    if cin == 1:
        plain = jax.nn.initializers.delta_orthogonal()(jax.random.key(0), (3, 3, 1, 16))
        ratio = np.mean(np.square(np.asarray(x) @ np.asarray(plain[1, 1]))) / np.mean(x**2)
        assert ratio == pytest.approx(1 / 16, rel=1e-5)


def test_suo_delta_narrowing_keeps_the_second_moment_on_average():
    # c_in > c_out: scale 1 and orthonormal columns keep q in expectation over inputs.
    kernel = suo_delta(jax.random.key(3), (1, 1, 64, 16))
    x = images((4096, 64), seed=4)
    ratio = float(jnp.mean(jnp.square(x @ kernel[0, 0])) / jnp.mean(jnp.square(x)))
    assert ratio == pytest.approx(1.0, rel=0.03)
    np.testing.assert_allclose(kernel[0, 0].T @ kernel[0, 0], np.eye(16), atol=1e-5)


# --- TAT (Zhang et al. 2022) through dks --------------------------------------------------------


def leaky_relu_cmap(c: float, slope: float, scale: float) -> float:
    """E[f(u) f(v)] for f = scale * leaky_relu, unit Gaussians of correlation c.

    f = scale * (slope * x + (1 - slope) * relu(x)); E[relu relu] is the degree-1 arc-cosine
    kernel (Cho & Saul 2009), E[u relu(v)] = c / 2.
    """
    relu_relu = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / (2 * math.pi)
    return scale**2 * (slope * c + (1 - slope) ** 2 * relu_relu)


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_tat_slope_is_dks_and_the_nets_c_map_meets_the_target(depth):
    from dks.base import activation_transform

    spec = ModelSpec(depth=depth, in_channels=1, **PLAIN_TAT, tat_target=0.9)
    arch = resolve(spec)
    assert arch.num_activations == depth - 1
    ours = tat_constants(depth - 1, 0.9)
    chain = lambda x, r: __import__("functools").reduce(lambda c, _: r(c), range(depth - 1), x)
    dks = activation_transform._get_activations_params(
        ["leaky_relu"], method="TAT", tat_params={"c_val_0_target": 0.9}, subnet_max_func=chain
    )["leaky_relu"]
    assert ours.negative_slope == pytest.approx(dks["negative_slope"], rel=1e-12)
    assert ours.output_scale == pytest.approx(dks["output_scale"], rel=1e-12)
    # The net's activation (JAX) is that leaky ReLU, and its Q map keeps q = 1.
    act = net_options(arch).activation
    grid = np.linspace(-3, 3, 61, dtype=np.float32)
    expected = ours.output_scale * np.where(grid >= 0, grid, ours.negative_slope * grid)
    np.testing.assert_allclose(np.asarray(act(jnp.asarray(grid))), expected, rtol=1e-6)
    density = lambda u: math.exp(-u * u / 2) / math.sqrt(2 * math.pi)
    q = sum(
        scipy.integrate.quad(lambda u: float(act(jnp.float32(u))) ** 2 * density(u), a, b)[0]
        for a, b in ((-np.inf, 0), (0, np.inf))
    )
    assert q == pytest.approx(1.0, abs=1e-5)
    # The chain's C map at 0 (independent closed form) meets the target eta = 0.9.
    c = 0.0
    for _ in range(depth - 1):
        c = leaky_relu_cmap(c, ours.negative_slope, ours.output_scale)
    assert c == pytest.approx(0.9, abs=1e-6)


def test_deeper_nets_get_a_more_linear_tat_relu():
    slopes = [tat_constants(d - 1, 0.9).negative_slope for d in (20, 56, 110)]
    assert 0 < slopes[0] < slopes[1] < slopes[2] < 1


# --- Fixup (Zhang et al. 2019) -----------------------------------------------------------------


def test_fixup_zeroes_last_convs_and_classifier_and_scales_the_first_by_l_to_minus_half():
    model = net(depth=20, **FIXUP)  # L = 9 residual units of m = 2 convs: L^(-1/2) = 1/3
    units = blocks(model)
    assert len(units) == 9
    for unit in units:
        assert float(jnp.abs(unit.convs[-1].conv.kernel[...]).max()) == 0.0
        np.testing.assert_array_equal(unit.branch.bias_in[...], 0.0)
        np.testing.assert_array_equal(unit.branch.bias_out[...], 0.0)
        assert float(unit.branch.scale[...]) == 1.0
    assert float(jnp.abs(model.head.kernel[...]).max()) == 0.0
    assert float(jnp.abs(model.head.bias[...]).max()) == 0.0
    assert float(model.scalars.stem_bias[...]) == float(model.scalars.head_bias[...]) == 0.0
    # He's std on the fan-out (out channels x 3 x 3, as the Fixup code) times 1/3. The
    # stage-2 first unit (16 -> 32) tells fan-out from fan-in (a factor sqrt(2)).
    same = np.concatenate([np.ravel(u.convs[0].conv.kernel[...]) for u in units[:3]])
    assert np.std(same) == pytest.approx(math.sqrt(2 / (9 * 16)) / 3, rel=0.03)
    widening = np.ravel(units[3].convs[0].conv.kernel[...])
    assert np.std(widening) == pytest.approx(math.sqrt(2 / (9 * 32)) / 3, rel=0.04)
    # The stem is not in a branch: He's plain init.
    assert np.std(model.stem.conv.kernel[...]) == pytest.approx(math.sqrt(2 / 9), rel=0.25)


def conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """PyTorch's Conv2d(kernel_size=3, padding=1, bias=False) in NHWC."""
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def fixup_reference(model: ResNet, x: jax.Array) -> jax.Array:
    """FixupResNet.forward of hongyi-zhang/Fixup cifar/models/fixup_resnet_cifar.py, line by
    line, on our model's weights (one unit per stage: depth 8)."""
    relu = jax.nn.relu
    h = relu(conv3x3(x, model.stem.conv.kernel[...], 1) + model.scalars.stem_bias[...])
    for unit in blocks(model):
        b = unit.branch
        stride = unit.stride
        out = conv3x3(h + b.bias_in[0], unit.convs[0].conv.kernel[...], stride)
        out = relu(out + b.bias_out[0])
        out = conv3x3(out + b.bias_in[1], unit.convs[1].conv.kernel[...], 1)
        out = out * b.scale[...] + b.bias_out[1]
        identity = h
        if stride != 1:  # AvgPool2d(1, stride) of x + bias1a, then zero channels appended
            identity = (h + b.bias_in[0])[:, ::stride, ::stride, :]
            identity = jnp.concatenate([identity, jnp.zeros_like(identity)], axis=-1)
        h = relu(out + identity)
    features = jnp.mean(h, axis=(1, 2)) + model.scalars.head_bias[...]
    return features @ model.head.kernel[...] + model.head.bias[...]


def randomise(model: ResNet, seed: int = 7) -> None:
    """Give every parameter a random value (scalars around their init, kernels He-sized)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    drawn = []
    for key, leaf in zip(keys, leaves, strict=True):
        fan_in = math.prod(leaf.shape[-4:-1]) if leaf.ndim >= 4 else max(leaf.shape[:1] or (1,))
        std = math.sqrt(1.0 / fan_in) if leaf.ndim >= 2 else 0.3
        drawn.append(std * jax.random.normal(key, leaf.shape) + (1.0 if leaf.ndim == 0 else 0.0))
    nnx.update(model, jax.tree.unflatten(treedef, drawn))


def test_fixup_forward_is_the_reference_codes():
    model = net(depth=8, **FIXUP)
    randomise(model)
    assert float(jnp.abs(model.stages[1].first.branch.bias_in[...]).min()) > 0
    x = images()
    np.testing.assert_allclose(model(x), fixup_reference(model, x), rtol=1e-5, atol=1e-5)


# --- SkipInit / ReZero (De & Smith 2020; Bachlechner et al. 2020) ----------------------------


def shortcut_path(model: ResNet, x: jax.Array) -> jax.Array:
    """Logits of the net's shortcuts alone: stem, option-A shortcuts, pooling, classifier."""
    h = jax.nn.relu(model.stem.conv(x))
    for unit in blocks(model):
        h = option_a_shortcut(h, unit.cout, unit.stride)
    return model.head(jnp.mean(h, axis=(1, 2)))


@pytest.mark.parametrize("options", [SKIPINIT, FIXUP], ids=["skipinit", "fixup"])
def test_a_residual_net_without_bn_starts_as_its_shortcut_path(options):
    model = net(depth=20, **options)
    if options is FIXUP:  # its classifier starts at zero: give it weights to see through
        model.head.kernel[...] = jax.random.normal(jax.random.key(2), model.head.kernel.shape)
    x = images()
    expected = shortcut_path(model, x)
    assert float(jnp.std(expected)) > 0.1
    for train in (False, True):
        np.testing.assert_allclose(model(x, train=train), expected, rtol=1e-5, atol=1e-6)
    if options is SKIPINIT:  # alpha = 0 is what makes it so
        assert {float(u.branch.alpha[...]) for u in blocks(model)} == {0.0}
        first = model.stages[0].first
        first.branch.alpha[...] = jnp.ones(())
        assert float(jnp.abs(model(x) - expected).max()) > 1e-3


# --- parameter counts ---------------------------------------------------------------------------

# He et al. 2015 Table 6: ResNet-20 (option A) has 269,722 parameters, of which BatchNorm's
# scale and shift are 2 x 688 (688 = 16 + 2 x 3 x (16 + 32 + 64) channels after the convs).
BN_CHANNELS = 16 + 2 * 3 * (16 + 32 + 64)
WEIGHTS_20 = 269_722 - 2 * BN_CHANNELS


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"model": "plain", "norm": "none"}, WEIGHTS_20 + BN_CHANNELS),  # a bias per channel
        (PLAIN_TANH, WEIGHTS_20 + BN_CHANNELS),
        (PLAIN_TAT, WEIGHTS_20 + BN_CHANNELS),
        (SKIPINIT, WEIGHTS_20 + BN_CHANNELS + 9),  # + one alpha per unit
        (FIXUP, WEIGHTS_20 + 9 * 5 + 2),  # 4 biases + 1 scale per unit, 2 around the net
    ],
    ids=["plain-nobn", "delta-tanh", "tat", "skipinit", "fixup"],
)
def test_parameter_counts_of_resnet20_without_bn(options, expected):
    assert count_params(abstract_model(ModelSpec(depth=20, **options))) == expected  # 3 channels


# --- one line, before anything compiles --------------------------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        ({"model": "plain", "activation": "tat", "init": "suo_delta"}, "set norm=none"),
        ({**PLAIN_TAT, "model": "residual"}, "set model=plain"),
        ({**PLAIN_TAT, "init": "he_normal"}, "set init=suo_delta"),
        ({**PLAIN_TANH, "norm": "batch"}, "Yang et al. 2019"),
        ({**PLAIN_TANH, "activation": "relu"}, "set activation=tanh"),
        (
            {**PLAIN_TANH, "family": "imagenet", "depth": 50},
            "c_in <= c_out in every conv (an orthogonal c_in x c_out centre tap); this net has "
            "256 -> 64",
        ),
        ({"model": "residual", "branch": "fixup"}, "replaces BatchNorm"),
        ({"model": "plain", "norm": "none", "branch": "skipinit"}, "set model=residual"),
        ({"norm": "none", "zero_init_residual": True}, "use branch=skipinit or branch=fixup"),
        ({"norm": "layer"}, "norm must be one of batch, none"),
        ({**PLAIN_TAT, "depth": 20, "tat_target": 1.0}, "tat_target (TAT's c(0) target)"),
        (
            {**PLAIN_TAT, "depth": 8},
            "depth 8 chains 7 leaky ReLUs, which reach c(0) = 0.809 at most, below "
            "tat_target=0.9: set tat_target below 0.809",
        ),
        (
            {**PLAIN_TAT, "depth": 14, "tat_target": 0.95},
            "depth 14 chains 13 leaky ReLUs, which reach c(0) = 0.907",
        ),
    ],
)
def test_unsupported_combinations_fail_in_one_line(options, message):
    with pytest.raises(SpecError, match=re.escape(message)) as info:
        resolve(ModelSpec(**{"depth": 8, **options}))
    assert "\n" not in str(info.value)


def test_a_lower_target_makes_tat_reachable_at_depth_8():
    ours = tat_constants(7, 0.8)
    assert 0 < ours.negative_slope < 0.05  # nearly ReLU: the most nonlinear a chain this short
    resolve(ModelSpec(depth=8, **PLAIN_TAT, tat_target=0.8))


def test_the_entry_point_rejects_an_unreachable_target_before_compiling(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.train", "dataset=digits", "model=plain"]
        + ["norm=none", "activation=tat", "init=suo_delta", "depth=8", f"results_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert not list(tmp_path.rglob("metrics.jsonl"))
    assert errors == [
        "error: activation=tat: depth 8 chains 7 leaky ReLUs, which reach c(0) = 0.809 at "
        "most, below tat_target=0.9: set tat_target below 0.809, use a deeper net, or another "
        "activation"
    ]


def run_of(*overrides: str):
    """The RunConfig that experiments.train makes of these overrides (composed, validated)."""
    from experiments.cli.train_config import compose_train, run_config

    return run_config(compose_train(list(overrides)))


def spec_of(*overrides: str) -> ModelSpec:
    """The ModelSpec that experiments.train makes of these overrides."""
    return run_of(*overrides).model


def test_every_option_is_a_config_key():
    assert spec_of() == ModelSpec()  # defaults unchanged
    spec = spec_of(
        "model=plain", "norm=none", "activation=tanh", "init=delta_orthogonal", "sigma_w2=1.2",
        "sigma_b2=0.001", "leaky_relu_slope=0.2", "tat_target=0.7",
    )  # fmt: skip
    assert spec == ModelSpec(
        model="plain", norm="none", activation="tanh", init="delta_orthogonal", sigma_w2=1.2,
        sigma_b2=0.001, leaky_relu_slope=0.2, tat_target=0.7,
    )  # fmt: skip
    assert spec_of("norm=none", "branch=skipinit").branch == "skipinit"


ARMS = {
    "plain_bn": ModelSpec(model="plain"),
    "plain_nobn": ModelSpec(model="plain", norm="none"),
    "plain_delta_tanh": ModelSpec(**PLAIN_TANH),
    "plain_tat": ModelSpec(**PLAIN_TAT, tat_target=0.8),
    "residual_bn": ModelSpec(model="residual"),
    "residual_fixup": ModelSpec(**FIXUP),
    "residual_skipinit": ModelSpec(**SKIPINIT),
}


def test_each_arm_has_its_own_net_name():
    # Fails when two arms share a name: their probe files overwrite each other and their
    # curves merge into one line of the probe figures.
    assert {arm: spec.variant for arm, spec in ARMS.items()} == {
        "plain_bn": "plain",
        "plain_nobn": "plain-nobn",
        "plain_delta_tanh": "plain-nobn-tanh-delta_orthogonal",
        "plain_tat": "plain-nobn-tat-suo_delta",
        "residual_bn": "residual",
        "residual_fixup": "residual-nobn-fixup",
        "residual_skipinit": "residual-nobn-skipinit",
    }


def test_the_trainability_preset_sweeps_seven_arms_three_depths_four_lrs():
    from experiments.cli.train_config import compose_train

    params = compose_train(["experiment=trainability"]).hydra.sweeper.params
    assert params["arm"].split(",") == list(ARMS)
    assert params["depth"] == "56,20,8"
    assert params["optim.lr"] == "0.003,0.01,0.03,0.1"
    dataset = run_of("experiment=trainability").dataset
    assert dataset.normalization == "channel_std"
    for arm, expected in ARMS.items():
        for depth in (8, 56):  # TAT's 0.8 is reachable at depth 8 (0.809 at most)
            spec = spec_of("experiment=trainability", f"arm={arm}", f"depth={depth}")
            assert spec == expected.replace(depth=depth, in_channels=3), arm


PROBE_FIGURES = (
    "probes_vs_depth",
    "shattered_gradients",
    "signal_propagation_init",
    "signal_propagation_trained",
)


@pytest.mark.slow
def test_trainability_entry_point_sweeps_reports_and_publishes(tmp_path):
    tiny = ["trainer.iterations=4", "trainer.log_every=2", "trainer.eval_every=4"]
    tiny += ["trainer.checkpoint_every=4", "trainer.progress=false"]
    args = ["--sweep-dir", str(tmp_path / "sweep"), "--publish", str(tmp_path / "pub")]
    args += ["arm=plain_bn,residual_fixup", "depth=8", "optim.lr=0.05,0.1", *tiny]
    done = subprocess.run(
        [sys.executable, "-m", "experiments.trainability", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    published = sorted(p.name for p in (tmp_path / "pub").iterdir())
    assert published == sorted(
        [
            "PROVENANCE.md",
            "best_error_vs_depth.pdf",
            "best_error_vs_depth.png",
            "error_vs_lr.pdf",
            "error_vs_lr.png",
            *(f"{name}.{ext}" for name in PROBE_FIGURES for ext in ("pdf", "png")),
            "report.md",
        ]
    )
    report = (tmp_path / "pub" / "report.md").read_text()
    assert "| group | depth 8 |" in report and "| residual_fixup |" in report
    # the probes of each group's best run: both arms, at init and trained
    probes = report.split("## Probes of each net at its best learning rate")[1]
    for net in ("plain-8 | init", "plain-8 | trained", "residual-nobn-fixup-8 | trained"):
        assert f"| {net} |" in probes, probes
    assert (
        "python -m experiments.trainability --sweep-dir"
        in (tmp_path / "pub" / "PROVENANCE.md").read_text()
    )
