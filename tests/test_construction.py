"""He et al. 2015's construction: a deeper net with identity blocks computes the shallower one."""

import dataclasses
import json
import re
import shutil
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_flax.data import augment as aug
from resnet_flax.data.memory import DataConfig
from resnet_flax.models.construct import check_construction, extra_layers
from resnet_flax.models.resnet import abstract_model, flatten_responses
from resnet_flax.models.spec import ModelSpec, SpecError
from resnet_flax.rundir import read_metrics
from resnet_flax.training import construction
from resnet_flax.training.config import ConfigError, RunInfo, TrainerConfig
from resnet_flax.training.construction import construct_state
from resnet_flax.training.loop import train
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig

PAIRS = [(8, 14), (8, 20), (14, 20)]
IMAGES = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
MEAN, STD = jnp.float32(0.4), jnp.float32(0.3)


@cache
def random_net(model: str, depth: int, seed: int) -> tuple:
    """(graphdef, params, batch_stats) with random weights and BN statistics, nothing compiled."""
    spec = ModelSpec(model=model, depth=depth, in_channels=1, conv_impl="xla")
    graphdef, params, stats = nnx.split(abstract_model(spec), nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-2].key, leaf.shape  # the last key is the Variable's value
        if name == "kernel":  # He-scaled, so 20 layers neither explode nor vanish
            fan_in = np.prod(shape[-4:-1]) if len(shape) >= 4 else shape[0]
            return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), shape), jnp.float32)
        low, high = {"scale": (0.5, 1.5), "var": (0.5, 2.0)}.get(name, (-0.5, 0.5))
        return jnp.asarray(rng.uniform(low, high, shape), jnp.float32)

    params, stats = (jax.tree_util.tree_map_with_path(draw, s) for s in (params, stats))
    return graphdef, params, stats, spec


@cache
def forward(model: str, depth: int):
    """A compiled eval-mode (params, batch_stats, images) -> (logits, responses) of one net."""
    graphdef = random_net(model, depth, 1)[0]

    @jax.jit
    def run(params, stats, x):
        net = nnx.merge(graphdef, params, stats, copy=True)
        return net(aug.normalize(x, MEAN, STD), train=False, capture=True)

    return run


def build(model: str, depths: tuple[int, int]) -> tuple:
    """(source net, constructed target params and statistics) for one depth pair."""
    src = random_net(model, depths[0], 1)
    graphdef, *fresh, target = random_net(model, depths[1], 2)
    params, stats = construct_state(
        graphdef, tuple(fresh), tuple(src[1:3]), (src[3], target), IMAGES, MEAN, STD, batch=16
    )
    return src, params, stats


@pytest.mark.parametrize("model", ["plain", "residual"])
@pytest.mark.parametrize("depths", PAIRS, ids=lambda d: f"{d[0]}to{d[1]}")
def test_constructed_net_computes_the_source_in_eval_mode(model, depths):
    # Fails for a wrong placement (an identity before a stride change), a missing copy of the
    # stem or classifier, a non-Dirac kernel, or a residual branch that does not add zero.
    src, params, stats = build(model, depths)
    want, _ = forward(model, depths[0])(src[1], src[2], IMAGES)
    got, _ = forward(model, depths[1])(params, stats, IMAGES)
    assert float(jnp.max(jnp.abs(want))) > 0.1  # the logits are not trivially small
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("depths", [(8, 14), (14, 20)], ids=lambda d: f"{d[0]}to{d[1]}")
def test_plain_extra_bns_hold_their_inputs_statistics(depths):
    # Fails when the running statistics are not the per-channel mean/var of each extra BN's
    # input over the images (e.g. padded rows of the last batch counted, std for var).
    src, params, stats = build("plain", depths)
    _, responses = forward("plain", depths[0])(src[1], src[2], IMAGES)
    last = {}  # each stage's output: the ReLU of its last block's second response
    for name, r in flatten_responses(responses):
        last[name.split("/")[0]] = np.maximum(np.asarray(r, np.float64), 0.0)
    pure = stats.to_pure_dict()
    source, target = (ModelSpec(model="plain", depth=d) for d in depths)
    for name in extra_layers(source, target):
        stage, block, conv = map(int, re.findall(r"\d+", name))  # stage<s>/block<b>/conv<c>
        bn = pure["stages"][stage - 1]["rest"]["convs"][conv - 1]["bn"]
        out = last[f"stage{stage}"]
        np.testing.assert_allclose(bn["mean"][block - 1], out.mean((0, 1, 2)), atol=1e-5)
        np.testing.assert_allclose(bn["var"][block - 1], out.var((0, 1, 2)), atol=1e-4)


BAD_PAIRS = {
    "deeper source": (dict(depth=20), dict(depth=14), "deeper than the target"),
    "family": (dict(depth=18, family="imagenet"), dict(depth=20), "CIFAR-family"),
    "bottleneck target": (dict(depth=20), dict(depth=164), "basic blocks"),
    "kind": (dict(model="plain"), dict(model="residual", depth=56), "model='plain'"),
    "preact": (dict(model="preact"), dict(model="preact", depth=56), "plain and residual"),
    "shortcut": (dict(shortcut="A"), dict(shortcut="B", depth=56), "shortcut='A'"),
    "shortcut C": (dict(shortcut="C"), dict(shortcut="C", depth=56), "shortcut C"),
    "classes": (dict(num_classes=100), dict(depth=56), "num_classes=100"),
    "input": (dict(in_channels=1), dict(depth=56), "in_channels=1"),
    "depth": (dict(depth=20), dict(depth=21), "6n\\+2"),
}


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_impossible_constructions_fail_in_one_line(case):
    source, target, message = BAD_PAIRS[case]
    with pytest.raises(SpecError, match=message) as err:
        check_construction(ModelSpec(**source), ModelSpec(**target))
    assert "\n" not in str(err.value)


DIGITS = DataConfig(name="digits", crop_padding=0, flip=False)
RECIPE = OptimConfig(lr=0.05, boundaries=())
SOURCE_TRAINER = TrainerConfig(
    iterations=10, batch_size=32, log_every=5, eval_every=5, checkpoint_every=10, progress=False
)
TARGET_TRAINER = dataclasses.replace(SOURCE_TRAINER, iterations=5, checkpoint_every=5)


@pytest.fixture(scope="module")
def plain_8(tmp_path_factory):
    """A plain-8 run directory trained for 10 iterations on digits."""
    run_dir = tmp_path_factory.mktemp("plain_8")
    spec = ModelSpec(model="plain", depth=8)
    summary = train(run_dir, RunConfig(spec, DIGITS, RECIPE, SOURCE_TRAINER, RunInfo("t", 0)))
    return run_dir, summary


def test_constructed_run_starts_at_its_sources_training_error(tmp_path, plain_8, monkeypatch):
    # Fails when the constructed state does not replace the fresh one, when the BN pass or
    # the restore of the source goes wrong, or when a resumed run builds it again.
    source_dir, source = plain_8
    target = ModelSpec(model="plain", depth=14)
    info = RunInfo("t", 1, init_from=str(source_dir))
    summary = train(tmp_path, RunConfig(target, DIGITS, RECIPE, TARGET_TRAINER, info))
    assert summary["status"] == "completed"
    assert summary["init_from"] == str(source_dir) and summary["init_from_depth"] == 8
    assert summary["init_from_iteration"] == 10
    assert summary["initial_train_error"] == source["final_train_error"]
    first = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert first["iteration"] == 0 and first["test_error"] == source["final_test_error"]
    saved = json.loads((tmp_path / "run_config.json").read_text())
    assert saved["info"]["init_from"] == str(source_dir)

    def fail(*_args, **_kwargs):
        raise AssertionError("a resumed run must restore its own checkpoint")

    monkeypatch.setattr(construction, "construct_state", fail)
    again = train(tmp_path, RunConfig(target, DIGITS, RECIPE, TARGET_TRAINER, info))
    assert again["initial_train_error"] == summary["initial_train_error"]


def _source_copy(tmp_path, plain_8, checkpoints: bool, **data_changes) -> str:
    """A copy of the plain-8 run directory, its data config changed, maybe without checkpoints."""
    copy = tmp_path / "source"
    shutil.copytree(
        plain_8[0], copy, ignore=None if checkpoints else shutil.ignore_patterns("checkpoints")
    )
    config = json.loads((copy / "run_config.json").read_text())
    config["dataset"].update(data_changes)
    (copy / "run_config.json").write_text(json.dumps(config))
    return str(copy)


@pytest.mark.parametrize(
    "case",
    ["not a run", "no checkpoint", "other data", "seed group", "other kind"],
)
def test_bad_init_from_fails_before_the_run_starts(tmp_path, plain_8, case):
    # Fails when a check is missing (the run would train from a wrong or missing source)
    # or comes after the run directory is written.
    spec, trainer, error = ModelSpec(model="plain", depth=14), TARGET_TRAINER, ConfigError
    if case == "not a run":
        init_from, message = str(tmp_path), "not a training run directory"
    elif case == "no checkpoint":
        init_from, message = _source_copy(tmp_path, plain_8, False), "has no checkpoint"
    elif case == "other data":
        init_from = _source_copy(tmp_path, plain_8, True, normalization="channel_std")
        message = "dataset.normalization='channel_std'"
    elif case == "seed group":
        init_from, message = str(plain_8[0]), "vmap_seeds=1"
        trainer = dataclasses.replace(trainer, vmap_seeds=2)
    else:
        init_from, message, error = str(plain_8[0]), "model='plain'", SpecError
        spec = ModelSpec(model="residual", depth=14)
    run_dir = tmp_path / "target"
    with pytest.raises(error, match=message) as err:
        train(
            run_dir, RunConfig(spec, DIGITS, RECIPE, trainer, RunInfo("t", 0, init_from=init_from))
        )
    assert "\n" not in str(err.value)
    assert not run_dir.exists()


def _fake_run(root, name: str, model: str, depth: int, errors: tuple, **fields) -> None:
    """A run directory with a summary and a two-point training curve."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    final, start = errors
    summary = {"model": model, "depth": depth, "iterations": 10, "final_train_error": final}
    summary.update(fields)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = [{"iteration": i, "epoch": i, "train_error": e} for i, e in ((5, start), (10, final))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_report_states_the_three_numbers_per_kind(tmp_path):
    # Fails when the source, the scratch twin or the constructed run is mismatched (e.g. the
    # scratch run taken for the source) or a number is read from the wrong field.
    from resnet_flax.analysis.construction import write_construction

    for model, (src, scratch, built, start) in {
        "plain": (0.02, 0.70, 0.05, 0.03),
        "residual": (0.01, 0.04, 0.06, 0.02),
    }.items():
        _fake_run(tmp_path / "trained", f"{model}-20", model, 20, (src, 0.5))
        _fake_run(tmp_path / "trained", f"{model}-56", model, 56, (scratch, 0.9))
        origin = {"init_from": f"trained/{model}-20", "init_from_depth": 20}
        built_fields = {"initial_train_error": start, **origin}
        _fake_run(tmp_path / "constructed", f"{model}-56", model, 56, (built, 0.4), **built_fields)
    trios = write_construction([tmp_path], tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert list(trios) == ["plain", "residual"]
    assert (
        "A 56-layer plain net with plain-20's training error (2.00%) exists (constructed: "
        "3.00%); trained from scratch it reaches 70.00%; trained from the construction it "
        "reaches 5.00%." in report
    )
    assert "A 56-layer ResNet with ResNet-20's training error (1.00%)" in report
    assert (tmp_path / "figures" / "construction.png").is_file()
