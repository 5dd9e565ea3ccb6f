"""Loss landscapes: filter normalisation, exact slices, PCA, a real run, bad inputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_flax.analysis.landscape import (
    LandscapeConfig,
    SurfaceEvaluator,
    axis,
    filter_axes,
    filter_normalized_direction,
    is_filtered,
    pca_plane,
    plane_coords,
    random_directions,
)


def train_run(run_dir, iterations=12, every=4):
    """A tiny digits run (plain-8) with a checkpoint every `every` iterations, all kept."""
    from resnet_flax.data.memory import DataConfig
    from resnet_flax.models.spec import ModelSpec
    from resnet_flax.training.config import RunInfo, TrainerConfig
    from resnet_flax.training.loop import train
    from resnet_flax.training.optim import OptimConfig
    from resnet_flax.training.run_config import RunConfig

    trainer = TrainerConfig(
        iterations=iterations, batch_size=64, log_every=every, eval_every=iterations,
        checkpoint_every=every, keep_checkpoints=10, progress=False, xla_cpu_preset="fast_compile",
    )  # fmt: skip
    optim = OptimConfig(lr=0.05, schedule="constant", boundaries=())
    spec = ModelSpec(model="plain", depth=8)
    cfg = RunConfig(spec, DataConfig(name="digits"), optim, trainer, RunInfo("t", 0))
    return train(run_dir, cfg)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("landscape") / "plain-8"
    train_run(run)
    return run


@pytest.fixture(scope="module")
def resnet20_params():
    from resnet_flax.models.resnet import build_model
    from resnet_flax.models.spec import ModelSpec

    model = build_model(ModelSpec(model="residual", depth=20, in_channels=1), seed=0)
    return nnx.split(model, nnx.Param, nnx.BatchStat)[1]


def test_every_filter_direction_has_its_weights_norm_and_biases_and_bn_get_zero(resnet20_params):
    # ResNet-20's stages stack their later blocks (leading axis 2): each stacked block's
    # filters are their own. Bugs caught: filters along PyTorch's axis 0 (the kernel's height
    # in Flax), norms pooled over stacked blocks, BN scale/shift or biases given a direction.
    params = resnet20_params
    d = filter_normalized_direction(np.random.default_rng(0), params)
    kernels = stacked = zeroed = 0
    for (path, w), (_, v) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_flatten_with_path(d)[0],
        strict=True,
    ):
        w, v = np.asarray(w), np.asarray(v)
        if not is_filtered(path):
            assert not v.any(), jax.tree_util.keystr(path)
            zeroed += 1
            continue
        kernels += 1
        stacked += w.ndim == 5
        axes = filter_axes(w.ndim)
        assert axes == {2: (0,), 4: (0, 1, 2), 5: (1, 2, 3)}[w.ndim]  # C_in; H, W, C_in
        norm_v, norm_w = (np.sqrt(np.sum(a * a, axis=axes)) for a in (v, w))
        np.testing.assert_allclose(norm_v, norm_w, rtol=1e-5)
        assert not np.allclose(v, w)
    assert (kernels, stacked) == (1 + 3 * 2 * 2 + 1, 6)  # stem, first blocks, head; rests
    assert zeroed == 2 * 1 + 2 * 3 * 2 * 2 + 1  # stem BN, branch BNs, head bias


def test_directions_are_reproduced_by_their_seed(resnet20_params):
    # Bug caught: directions that depend on anything but the seed (a figure then could not
    # be redrawn or extended with the same directions).
    a, b = random_directions(3, resnet20_params), random_directions(3, resnet20_params)
    c = random_directions(4, resnet20_params)
    flat = [jax.flatten_util.ravel_pytree(x)[0] for x in (a[0], a[1], b[0], b[1], c[0])]
    assert np.array_equal(flat[0], flat[2]) and np.array_equal(flat[1], flat[3])
    assert not np.allclose(flat[0], flat[1]) and not np.allclose(flat[0], flat[4])


def squared_loss(params, x, y):
    """Mean squared error of a linear model, and a second value the evaluator expects."""
    residual = x @ params["dense"]["kernel"] + params["dense"]["bias"] - y
    return jnp.mean(jnp.sum(residual**2, axis=1)), jnp.float32(0.0)


def test_one_dimensional_slice_of_a_linear_model_with_squared_loss_is_its_parabola():
    # L(w + a d) = L(w) + 2a mean<r, x d> + a^2 mean|x d|^2, exactly. Bugs caught: grid points
    # out of order or lost in the padded chunks (51 points, chunks of 8), a scaled wrongly.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.standard_normal((40, 3)).astype(np.float32)
    kernel, bias = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((6, 3), 3))
    params = {"dense": {"kernel": kernel, "bias": bias}}
    d = filter_normalized_direction(np.random.default_rng(1), params)
    assert not np.asarray(d["dense"]["bias"]).any()
    zero = jax.tree.map(jnp.zeros_like, d)
    cfg = LandscapeConfig(chunk=8)
    alphas = axis(cfg.points_1d, -1.0, 1.0)
    loss, _ = SurfaceEvaluator(squared_loss, (x, y), cfg)(
        params, d, zero, plane_coords(alphas, [0.0])
    )
    r = np.asarray(x @ params["dense"]["kernel"] + params["dense"]["bias"] - y, np.float64)
    xd = x.astype(np.float64) @ np.asarray(d["dense"]["kernel"], np.float64)
    c0, c1, c2 = (
        np.mean(np.sum(r * r, 1)),
        2 * np.mean(np.sum(r * xd, 1)),
        np.mean(np.sum(xd * xd, 1)),
    )
    np.testing.assert_allclose(loss, c0 + c1 * alphas + c2 * alphas**2, rtol=2e-5)


def test_pca_of_a_trajectory_along_a_line_recovers_the_line():
    # Bugs caught: components of the transposed matrix, rows not projected onto them, the
    # explained variance of the wrong component.
    rng = np.random.default_rng(0)
    line = rng.standard_normal(500)
    line /= np.linalg.norm(line)
    t = np.array([5.0, 4.0, 3.1, 2.0, 1.2, 0.5, 0.0])
    rows = t[:, None] * line[None] + 1e-3 * rng.standard_normal((len(t), 500))
    components, explained, coords = pca_plane(rows)
    assert components.shape == (2, 500)
    assert abs(components[0] @ line) > 0.9999
    assert explained[0] > 0.999 and explained.sum() <= 1.0 + 1e-9
    np.testing.assert_allclose(np.abs(coords[:, 0]), t, atol=0.01)


def test_slice_at_zero_is_the_runs_evaluated_training_loss(run_dir, tmp_path):
    # The surface at alpha = 0 on the whole training set is the training loss and error the
    # run recorded (eval-mode BN with its statistics). Bugs caught: BN in training mode,
    # another checkpoint, another subset, the direction applied at alpha = 0.
    from resnet_flax.analysis.landscape_run import (
        LANDSCAPE_FILE,
        SURFACE_FILE,
        landscape_run,
        plan_landscape,
    )

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = LandscapeConfig(subset=0, points_1d=3, points_2d=3, trajectory_points=5)
    record = landscape_run(plan_landscape(run_dir, cfg), cfg, tmp_path / "out")
    assert record["step"] == 12 and record["subset_size"] == 1437
    assert record["loss_1d"][1] == pytest.approx(summary["final_train_loss"], rel=1e-5)
    assert record["error_1d"][1] == pytest.approx(summary["final_train_error"], abs=1e-6)
    assert record["loss_2d"][1][1] == pytest.approx(record["loss_1d"][1], rel=1e-6)
    assert record["trajectory_steps"] == [0, 4, 8, 12]
    np.testing.assert_allclose(record["trajectory"][-1], [0.0, 0.0], atol=1e-4)  # the centre
    assert 0.5 < sum(record["explained_variance"]) <= 1.0 + 1e-6
    saved = np.load(tmp_path / "out" / SURFACE_FILE)
    assert saved["direction_1"].shape == saved["direction_2"].shape
    assert json.loads((tmp_path / "out" / LANDSCAPE_FILE).read_text())["step"] == 12


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--points-2d", "0"], "points_2d must be an odd number >= 3"),
        (["--points-1d", "50"], "points_1d must be an odd number >= 3"),
        (["--min-checkpoints", "4"], "kept 3 checkpoint(s) (iterations 4, 8, 12); the trajectory"),
        (["--step", "5"], "has no checkpoint at iteration 5; it kept 4, 8, 12"),
    ],
)
def test_landscape_command_refuses_bad_input_in_one_line_before_compiling(
    run_dir, tmp_path, capsys, monkeypatch, options, message
):
    import experiments.landscape as landscape

    def compiles(*_, **__):
        raise AssertionError("the landscape started before the input was checked")

    monkeypatch.setattr(landscape, "landscape_run", compiles)
    assert landscape.main([str(run_dir), *options, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_landscape_command_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    from experiments.landscape import main

    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no run_config.json" in err[0]


@pytest.mark.slow
def test_why_study_on_a_small_sweep_publishes_figures_data_and_report(tmp_path, capsys):
    # The whole command at depth 8: a sweep that keeps too few checkpoints is refused in one
    # line; one that keeps enough gives every figure, its JSON, report.md and PROVENANCE.md.
    from experiments.why import main

    few = ["depth=8", "trainer.iterations=22", "trainer.progress=false"]
    assert main(["--sweep-dir", str(tmp_path / "few"), "--depth", "8", *few]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kept 2 checkpoint(s) (iterations 11, 22)" in err[0]

    enough = ["depth=8", "trainer.iterations=33", "trainer.progress=false"]
    args = ["--sweep-dir", str(tmp_path / "sweep"), "--depth", "8", "--init-seeds", "1"]
    out = tmp_path / "published"
    assert main([*args, "--points-2d", "5", "--publish", str(out), *enough]) == 0
    names = {p.name for p in out.iterdir()}
    for stem in ("probes_vs_depth", "shattered_gradients", "signal_propagation_init",
                 "signal_propagation_trained", "landscape_contours", "landscape_surfaces",
                 "landscape_slices", "trajectory"):  # fmt: skip
        assert f"{stem}.png" in names, stem
    assert {"probes.json", "landscapes.json", "report.md", "PROVENANCE.md"} <= names
    landscapes = json.loads((out / "landscapes.json").read_text())
    assert [(r["model"], r["trajectory_steps"]) for r in landscapes] == [
        ("plain", [0, 11, 22, 33]),
        ("residual", [0, 11, 22, 33]),
    ]
    probes = json.loads((out / "probes.json").read_text())
    assert sorted((r["model"], r["seed"], r["state"]) for r in probes) == [
        (m, s, state) for m in ("plain", "residual") for s, state in
        ((0, "init"), (0, "trained"), (1, "init"))
    ]  # fmt: skip
    report = (out / "report.md").read_text()
    assert "plain-8" in report and "5x5 points in" in report


def test_grid_minima_counts_one_for_a_bowl_and_each_dip_of_a_rough_surface():
    # Bug caught: edges compared with wrapped-around neighbours, ties counted as minima.
    from resnet_flax.analysis.why_report import grid_minima

    a, b = np.meshgrid(np.linspace(-1, 1, 21), np.linspace(-1, 1, 21), indexing="ij")
    assert grid_minima(a**2 + b**2) == 1
    assert grid_minima(np.ones((5, 5))) == 0  # a plateau has no strict minimum
    # cos(3 pi a) cos(3 pi b) is -1 where one factor is 1 (a in {0, +-2/3}) and the other -1
    # (b in {+-1/3, +-1}; +-1/3 falls nearest to +-0.3 on this grid): 2 * 3 * 4 minima, half
    # of them on the edges (b = +-1 or a = +-1).
    assert grid_minima(np.cos(3 * np.pi * a) * np.cos(3 * np.pi * b)) == 24
