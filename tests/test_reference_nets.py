"""Our networks equal other frameworks' builds of the published ones, given the same weights.

Each reference is written here in Keras from its published description (TF official
ResNet-50, He et al. 2015's Caffe prototxt, the CIFAR nets of He et al. 2015, fb.resnet.torch's
preresnet.lua, KaimingHe/resnet-1k-layers); every weight and every BatchNorm running statistic
is random and copied across, and logits agree in evaluation (running statistics) and in
training (batch statistics), as do the updated running statistics. Each convention option is
shown to matter: with our defaults the same reference differs.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest
from flax import nnx

from resnet_flax.models.resnet import ResNet, abstract_model
from resnet_flax.models.spec import ModelSpec

try:
    import keras
    from keras import layers
except ImportError:  # the PyTorch comparison below does not need it
    keras = layers = None
needs_keras = pytest.mark.skipif(keras is None, reason="Keras (tensorflow) is not installed")

# float32 through 50 layers in other summation orders (oneDNN vs XLA): ~3e-5 of the logits'
# scale, so the absolute tolerance is 1e-4 of the largest logit (logits are O(10) here).
RTOL = ATOL = 1e-4


# --- our side: random weights and statistics, named per layer -------------------------------


@functools.cache
def _graphdef(spec: ModelSpec) -> nnx.GraphDef:
    """Our net's structure (abstract: ResNet-50's takes ~1 s)."""
    return nnx.split(abstract_model(spec))[0]


@functools.cache
def _forward(spec: ModelSpec, train: bool):
    """(state, x) -> (logits, state after the pass); ImageNet nets compiled for x's shape.

    CIFAR nets run op by op: the ops' kernels are cached across these tests' nets (ResNet-14
    on 16x16: ~0.1 s a pass once warm; compiled, ~1.5 s a net). ResNet-50 op by op took 9-14 s
    a pass; compiled without XLA's optimisations, which only cost time here, ~3 s.
    """
    graphdef = _graphdef(spec)

    def forward(state, x):
        model = nnx.merge(graphdef, state)
        return model(x, train=train), nnx.state(model)

    if spec.family == "cifar":
        return forward
    compiled = {}

    def run(state, x):
        if x.shape not in compiled:
            lowered = jax.jit(forward).lower(state, x)
            compiled[x.shape] = lowered.compile({"xla_backend_optimization_level": 0})
        return compiled[x.shape](state, x)

    return run


def random_state(spec: ModelSpec, x: np.ndarray, seed: int = 0) -> nnx.State:
    """Random weights and BN scales/shifts; running statistics near those of images like x.

    The statistics are each BN's batch statistics on other random images, randomly perturbed:
    fully random ones let eval-mode activations grow unit by unit (ResNet-50 logits ~1e4).
    """
    _, state = nnx.split(abstract_model(spec))  # ShapeDtypeStructs to draw values for
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-2].key, leaf.shape
        if name == "kernel":  # He init (fan-in) keeps activations O(1) through depth
            fan_in = math.prod(shape[-4:-1]) if len(shape) >= 4 else shape[-2]
            value = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif name == "mean":
            value = np.zeros(shape)
        elif name == "var":
            value = np.ones(shape)
        else:  # BN shift, classifier bias
            value = rng.normal(0.0, 0.2, shape)
        return np.asarray(value, np.float32)

    state = jax.tree_util.tree_map_with_path(draw, state)
    _, moved = _forward(spec, True)(state, images(x.shape, seed=seed + 100))
    m = spec.bn_momentum  # from mean 0, var 1: running = m * initial + (1 - m) * batch

    def perturb(path, leaf, after):
        name = path[-2].key
        if name == "mean":
            leaf = (after - 0.0) / (1 - m) + rng.normal(0.0, 0.1, leaf.shape)
        elif name == "var":
            leaf = np.maximum((after - m) / (1 - m), 1e-2) * rng.uniform(0.6, 1.6, leaf.shape)
        return np.asarray(leaf, np.float32)

    return jax.tree_util.tree_map_with_path(perturb, state, moved)


def _bn(bn) -> list[np.ndarray]:
    """Keras BatchNormalization's weight order: gamma, beta, moving mean, moving variance."""
    return [np.asarray(v[...]) for v in (bn.scale, bn.bias, bn.mean, bn.var)]


def _blocks(stage) -> list:
    """A stage's blocks as modules (the stacked ones unstacked; numpy slices, no dispatch)."""
    blocks = [stage.first]
    if stage.rest is not None:
        graphdef, stacked = nnx.split(stage.rest)
        for i in range(stage.num_rest):
            part = jax.tree.map(lambda a, i=i: np.asarray(a)[i], stacked)
            blocks.append(nnx.merge(graphdef, part))
    return blocks


def named_weights(model: ResNet) -> dict[str, list[np.ndarray]]:
    """Every layer's weights under the Keras layer name the reference builders use."""
    out = {"stem_conv": [np.asarray(model.stem.conv.kernel[...])]}
    if model.stem.bn is not None:
        out["stem_bn"] = _bn(model.stem.bn)
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(_blocks(stage)):
            for k, conv in enumerate(block.convs):
                out[f"s{s}b{b}c{k}_conv"] = [np.asarray(conv.conv.kernel[...])]
                if conv.bn is not None:
                    out[f"s{s}b{b}c{k}_bn"] = _bn(conv.bn)
            for k, pre in enumerate(block.preacts or []):
                out[f"s{s}b{b}a{k}_bn"] = _bn(pre.bn)
            if block.projection is not None:
                out[f"s{s}b{b}p_conv"] = [np.asarray(block.projection.conv.kernel[...])]
                if block.projection.bn is not None:
                    out[f"s{s}b{b}p_bn"] = _bn(block.projection.bn)
    if model.final_preact is not None:
        out["final_bn"] = _bn(model.final_preact.bn)
    out["head"] = [np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...])]
    return out


def run_ours(spec: ModelSpec, state: nnx.State, x: np.ndarray, train: bool):
    """Logits and the net after one forward pass (training updates the running statistics)."""
    logits, new_state = _forward(spec, train)(state, x)
    return np.asarray(logits), nnx.merge(_graphdef(spec), jax.tree.map(np.asarray, new_state))


def _copy_weights(spec: ModelSpec, state: nnx.State, reference) -> None:
    """Set every weighted Keras layer from our state; fail if one would stay random."""
    weights = named_weights(nnx.merge(_graphdef(spec), state))
    with_weights = {layer.name for layer in reference.layers if layer.weights}
    assert with_weights == set(weights), with_weights ^ set(weights)
    for name, values in weights.items():
        reference.get_layer(name).set_weights(values)


def compare(spec: ModelSpec, reference, x: np.ndarray, seed: int = 0):
    """Copy random weights into the Keras reference, assert equal outputs.

    Returns the max |differences| and the state (weights and statistics) that was copied.
    """
    state = random_state(spec, x, seed)
    _copy_weights(spec, state, reference)
    diffs = {}
    for train in (False, True):
        ours, updated = run_ours(spec, state, x, train)
        theirs = np.asarray(reference(x, training=train))
        scale = max(1.0, float(np.abs(theirs).max()))
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL * scale)
        diffs["train" if train else "eval"] = float(np.abs(ours - theirs).max())
        diffs["max |logit|"] = max(diffs.get("max |logit|", 0.0), float(np.abs(theirs).max()))
    # Running statistics after the training pass: the same momentum and (biased) variance.
    for name, values in named_weights(updated).items():
        layer = reference.get_layer(name)
        if isinstance(layer, layers.BatchNormalization):
            for ours_stat, theirs_stat in zip(values[2:], layer.get_weights()[2:], strict=True):
                np.testing.assert_allclose(ours_stat, theirs_stat, rtol=RTOL, atol=ATOL)
    return diffs, state


def differs(spec: ModelSpec, state: nnx.State, reference, x: np.ndarray) -> float:
    """Max difference of eval logits of our spec and the reference over the reference's max.

    The conventions do not change the parameters' structure, so one state fits either spec.
    """
    _copy_weights(spec, state, reference)
    ours, _ = run_ours(spec, state, x, train=False)
    theirs = np.asarray(reference(x, training=False))
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def images(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """Random float32 images."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- Keras references, written from the published descriptions --------------------------------


def _conv(x, filters, kernel, stride, padding, name):
    """Conv without bias (every reference here); padding 'same', 'valid' or explicit (pad)."""
    if isinstance(padding, int):
        x = layers.ZeroPadding2D(padding)(x) if padding else x
        padding = "valid"
    return layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False, name=name)(x)


def _bn_layer(x, name):
    """BatchNorm with our spec's momentum 0.9 and epsilon 1e-5 (TF official's defaults too)."""
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x)


def _relu(x):
    """ReLU as a layer."""
    return layers.ReLU()(x)


def keras_resnet50(size: int, num_classes: int, variant: str):
    """ResNet-50: variant "tf_official" or "caffe".

    tf_official (tensorflow/models official/legacy/image_classification/resnet/resnet_model.py,
    "v1.5"): stem ZeroPadding2D(3) + 7x7/2 valid conv, max pool 3x3/2 padding='same'; a stage's
    first bottleneck strides its 3x3 conv (padding='same') and its 1x1 projection + BN; no conv
    biases; BN momentum 0.9, epsilon 1e-5.
    caffe (He et al. 2015, KaimingHe/deep-residual-networks ResNet-50-deploy.prototxt): conv1
    pad 3 stride 2; pool1 3x3/2 without padding in Caffe's ceil mode (a last window that
    overhangs by one: on even maps the same as padding 0 before and 1 after); a stage's first
    unit strides its first 1x1 conv (res3a_branch2a) and the 1x1 projection; 3x3 convs pad 1.
    """
    tf_official = variant == "tf_official"
    inputs = keras.Input((size, size, 3))
    x = _conv(inputs, 64, 7, 2, 3, "stem_conv")
    x = _relu(_bn_layer(x, "stem_bn"))
    if tf_official:
        x = layers.MaxPooling2D(3, 2, padding="same")(x)
    else:  # Caffe's ceil-mode window over a non-negative (post-ReLU) map
        x = layers.MaxPooling2D(3, 2)(layers.ZeroPadding2D(((0, 1), (0, 1)))(x))
    for s, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for b in range(blocks):
            stride = 2 if s > 0 and b == 0 else 1
            s1, s3 = (1, stride) if tf_official else (stride, 1)
            pad3 = "same" if tf_official else 1
            name = f"s{s}b{b}"
            h = _relu(_bn_layer(_conv(x, width, 1, s1, 0, f"{name}c0_conv"), f"{name}c0_bn"))
            h = _relu(_bn_layer(_conv(h, width, 3, s3, pad3, f"{name}c1_conv"), f"{name}c1_bn"))
            h = _bn_layer(_conv(h, 4 * width, 1, 1, 0, f"{name}c2_conv"), f"{name}c2_bn")
            if b == 0:
                x = _bn_layer(_conv(x, 4 * width, 1, stride, 0, f"{name}p_conv"), f"{name}p_bn")
            x = _relu(layers.Add()([h, x]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="head")(x))


def _option_a(x, cout: int, stride: int):
    """He et al. 2015 option A: subsample by stride-2 slicing, append zero channels after."""
    cin = x.shape[-1]

    def shortcut(t):
        t = t[:, ::stride, ::stride, :] if stride > 1 else t
        return keras.ops.pad(t, [[0, 0], [0, 0], [0, 0], [0, cout - cin]])

    h, w = (-(-d // stride) for d in x.shape[1:3])
    return layers.Lambda(shortcut, output_shape=(h, w, cout))(x)


def keras_cifar_resnet(depth: int, size: int, plain: bool, padding: str):
    """He et al. 2015 sec. 4.2 CIFAR net: 3x3 conv 16, 3 stages of n basic units (16, 32, 64),
    option A shortcuts, global average pool, 10-way classifier. padding: "symmetric" (1 each
    side, as Caffe/Torch) or "same" (a Keras net's padding='same' on its strided convs).
    """
    n = (depth - 2) // 6
    inputs = keras.Input((size, size, 3))
    x = _relu(_bn_layer(_conv(inputs, 16, 3, 1, 1, "stem_conv"), "stem_bn"))
    for s, width in enumerate((16, 32, 64)):
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            pad = "same" if padding == "same" else 1
            name = f"s{s}b{b}"
            h = _relu(_bn_layer(_conv(x, width, 3, stride, pad, f"{name}c0_conv"), f"{name}c0_bn"))
            h = _bn_layer(_conv(h, width, 3, 1, 1, f"{name}c1_conv"), f"{name}c1_bn")
            x = _relu(h if plain else layers.Add()([h, _option_a(x, width, stride)]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10, name="head")(x))


def keras_preact_cifar(depth: int, size: int, block: str, shortcut: str):
    """Pre-activation CIFAR net as the 2016 reference code builds it.

    fb.resnet.torch models/preresnet.lua (basic units) and KaimingHe/resnet-1k-layers
    resnet-pre-act.lua (bottleneck units): a lone 3x3 conv; the first unit of each stage applies
    BN-ReLU before splitting, so branch and shortcut (identity, option A, or a 1x1 projection
    without BN) both take the activated input; the other units put BN-ReLU before each conv of
    the branch and add their raw input. Bottleneck units stride their first 1x1 conv
    (resnet-1k-layers); stage widths 16/32/64 (x4 at a bottleneck's output). Final BN-ReLU.
    """
    per_unit = 2 if block == "basic" else 3
    n = (depth - 2) // (3 * per_unit)
    inputs = keras.Input((size, size, 3))
    x = _conv(inputs, 16, 3, 1, 1, "stem_conv")
    cin = 16
    for s, width in enumerate((16, 32, 64)):
        cout = width if block == "basic" else 4 * width
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            name = f"s{s}b{b}"
            if block == "basic":
                shapes = [(width, 3, stride), (cout, 3, 1)]
            else:
                shapes = [(width, 1, stride), (width, 3, 1), (cout, 1, 1)]
            shared = _relu(_bn_layer(x, f"{name}a0_bn")) if b == 0 else None
            h = x
            for k, (filters, kernel, st) in enumerate(shapes):
                h = shared if k == 0 and b == 0 else _relu(_bn_layer(h, f"{name}a{k}_bn"))
                h = _conv(h, filters, kernel, st, kernel // 2, f"{name}c{k}_conv")
            if b > 0:
                short = x
            elif shortcut == "B" and (stride > 1 or cin != cout):
                short = _conv(shared, cout, 1, stride, 0, f"{name}p_conv")
            else:
                short = _option_a(shared, cout, stride)
            x = layers.Add()([h, short])
            cin = cout
    x = layers.GlobalAveragePooling2D()(_relu(_bn_layer(x, "final_bn")))
    return keras.Model(inputs, layers.Dense(10, name="head")(x))


# --- the comparisons ---------------------------------------------------------------------------

# Stages scanned: compile time flat in depth (the net is the same; see test_models).
IMAGENET50 = ModelSpec(depth=50, family="imagenet", shortcut="B", num_classes=7, stage_loop="scan")


@needs_keras
def test_tf_official_resnet50_is_ours_with_same_padding():
    # 64x64 images: every strided map is even (32, 16, 8, 4, 2), where SAME pads 0/1.
    x = images((2, 64, 64, 3))
    reference = keras_resnet50(64, 7, "tf_official")
    diffs, state = compare(IMAGENET50.replace(strided_padding="same"), reference, x)
    print("tf_official resnet50", diffs)
    # torchvision's 1/1 padding (our default) is another network for these weights.
    assert differs(IMAGENET50, state, reference, x) > 1e-2


@needs_keras
@pytest.mark.slow
def test_caffe_resnet50_is_ours_with_stride_on_the_first_1x1():
    x = images((2, 64, 64, 3))
    reference = keras_resnet50(64, 7, "caffe")
    spec = IMAGENET50.replace(bottleneck_stride="1x1", strided_padding="same")
    diffs, state = compare(spec, reference, x)
    print("caffe resnet50", diffs)
    assert differs(spec.replace(bottleneck_stride="3x3"), state, reference, x) > 1e-2


@needs_keras
@pytest.mark.parametrize(
    "model,padding", [("residual", "symmetric"), ("plain", "symmetric"), ("residual", "same")]
)
def test_cifar_resnet_with_option_a_is_ours(model, padding):
    x = images((4, 16, 16, 3))
    reference = keras_cifar_resnet(14, 16, plain=model == "plain", padding=padding)
    spec = ModelSpec(model=model, depth=14, strided_padding=padding)
    diffs, state = compare(spec, reference, x)
    print(model, padding, diffs)
    other = "same" if padding == "symmetric" else "symmetric"
    assert differs(spec.replace(strided_padding=other), state, reference, x) > 1e-2


@needs_keras
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_fb_resnet_torch_preact_net_is_ours_with_activated_first_shortcut(shortcut):
    x = images((4, 16, 16, 3))
    reference = keras_preact_cifar(14, 16, "basic", shortcut)
    spec = ModelSpec(model="preact", depth=14, shortcut=shortcut, preact_first_shortcut="activated")
    diffs, state = compare(spec, reference, x)
    print("fb.resnet.torch preact", shortcut, diffs)
    # Our default feeds the first unit's identity shortcut the raw stem output.
    assert differs(spec.replace(preact_first_shortcut="raw"), state, reference, x) > 1e-2


@needs_keras
def test_resnet_1k_layers_bottleneck_net_is_ours_with_stride_on_the_first_1x1():
    x = images((4, 16, 16, 3))
    reference = keras_preact_cifar(20, 16, "bottleneck", "B")
    spec = ModelSpec(model="preact", depth=20, block="bottleneck", shortcut="B")
    diffs, state = compare(spec.replace(bottleneck_stride="1x1"), reference, x)
    print("resnet-1k-layers bottleneck", diffs)
    assert differs(spec, state, reference, x) > 1e-2


@pytest.mark.parametrize("model", ["residual", "plain"])
def test_pytorch_baseline_is_ours(model):
    # benchmarks.torch_baseline: CIFAR plain/residual nets, basic units, option A.
    torch = pytest.importorskip("torch")
    from benchmarks.torch_baseline import build_torch_model

    spec = ModelSpec(model=model, depth=14)
    x = images((4, 16, 16, 3))
    state = random_state(spec, x)
    weights = named_weights(nnx.merge(_graphdef(spec), state))
    net = build_torch_model(spec)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    (linear,) = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    ours_convs = [v for k, v in weights.items() if k.endswith("_conv")]
    ours_bns = [v for k, v in weights.items() if k.endswith("_bn")]
    assert len(convs) == len(ours_convs) and len(bns) == len(ours_bns)
    with torch.no_grad():
        for conv, (kernel,) in zip(convs, ours_convs, strict=True):
            conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))  # HWIO->OIHW
        for bn, (scale, shift, mean, var) in zip(bns, ours_bns, strict=True):
            for tensor, value in zip(
                (bn.weight, bn.bias, bn.running_mean, bn.running_var),
                (scale, shift, mean, var),
                strict=True,
            ):
                tensor.copy_(torch.from_numpy(value))
        linear.weight.copy_(torch.from_numpy(weights["head"][0].T.copy()))
        linear.bias.copy_(torch.from_numpy(weights["head"][1]))
    for train in (False, True):
        net.train(train)
        with torch.no_grad():
            theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        ours, updated = run_ours(spec, state, x, train)
        scale = max(1.0, float(np.abs(theirs).max()))
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL * scale)
        print(model, "train" if train else "eval", "max |diff|", np.abs(ours - theirs).max())
    # The running means moved alike (PyTorch's running variance takes the unbiased estimate).
    moved = [v[2] for k, v in named_weights(updated).items() if k.endswith("_bn")]
    for bn, mean in zip(bns, moved, strict=True):
        np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=RTOL, atol=ATOL)
