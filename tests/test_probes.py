"""Signal-propagation probes: analytic cases of each quantity, a real net, bad inputs."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.analysis.layer_stats import AnalysisError
from resnet_flax.analysis.probes import (
    ProbeConfig,
    autocorrelation,
    compiled,
    directional_derivatives,
    jacobian_singular_values,
    layer_signal,
    line_points,
    net_line_gradients,
    shattering_summary,
    spectrum_summary,
)

IMAGE = (8, 8, 1)


def linear_apply(weights, bias):
    """A linear model of flattened images: its gradient is the same everywhere."""

    def apply(x):
        return x.reshape(x.shape[0], -1) @ weights + bias

    return apply


def test_linear_net_gradient_is_constant_along_each_line_and_perfectly_correlated():
    # Bug caught: a mean-centred autocorrelation (0/0 -> NaN for a constant gradient), a
    # tangent other than u (g would not equal u . w_y), or the wrong logit picked.
    rng = np.random.default_rng(0)
    cfg = ProbeConfig(lines=4, points=64, max_lag=16)
    w = rng.standard_normal((64, 10)).astype(np.float32)
    x0 = rng.standard_normal((cfg.lines, *IMAGE)).astype(np.float32)
    labels = np.array([3, 0, 9, 5])
    pts, dirs, t = line_points(x0, 2.0, cfg, rng)
    per_point = np.repeat(labels, cfg.points)
    g = directional_derivatives(linear_apply(w, 0.5), pts, dirs, per_point)
    g = np.asarray(g).reshape(cfg.lines, cfg.points)
    u = dirs.reshape(cfg.lines, cfg.points, -1)[:, 0]
    np.testing.assert_allclose(g, np.repeat((u @ w)[np.arange(4), labels][:, None], 64, 1), 1e-5)
    assert np.allclose(np.linalg.norm(u, axis=1), 2.0)  # each direction has the asked norm
    assert t[0] == -cfg.span and t[-1] == cfg.span and len(t) == cfg.points
    summary = shattering_summary(g, cfg.max_lag)
    assert summary["lag1"] == pytest.approx(1.0, abs=1e-6)
    assert summary["correlation_length"] == cfg.max_lag
    assert summary["correlation_length_capped"] == 1.0
    assert not np.isnan(summary["autocorrelation"]).any()


def test_white_noise_has_lag1_autocorrelation_near_zero():
    # Bug caught: r(k) normalised by the series' own length or read at lag 0 (both near 1).
    g = np.random.default_rng(1).standard_normal((64, 256))
    r = autocorrelation(g, 4)
    assert np.all(np.abs(r[:, 1]) < 0.3)  # one line: ~N(0, 1/16)
    assert abs(shattering_summary(g, 4)["lag1"]) < 0.03  # 64 lines: ~N(0, 1/128)
    np.testing.assert_allclose(r[:, 0], 1.0)


def test_correlation_length_of_a_cosine_is_its_first_lag_below_one_half():
    # r(k) of cos(w t) over many periods is cos(w k): below 0.5 first at k > pi/3/w = 6.5.
    # Bug caught: an off-by-one between lags and indices, or '<=' for '<'.
    w = np.pi / 3 / 6.5
    g = np.cos(w * np.arange(200_000))[None]
    r = autocorrelation(g, 10)
    np.testing.assert_allclose(r[0], np.cos(w * np.arange(11)), atol=1e-4)
    summary = shattering_summary(g, 10)
    assert summary["correlation_length"] == 7 and summary["correlation_length_capped"] == 0.0


def test_orthogonal_linear_net_has_every_jacobian_singular_value_one():
    # Bug caught: the Jacobian of the summed logits (rank 1), batch and class axes mixed in
    # the reshape, or singular values of the wrong matrix.
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((64, 10)))
    x = np.random.default_rng(3).standard_normal((5, *IMAGE)).astype(np.float32)
    sigma = np.asarray(jacobian_singular_values(linear_apply(q.astype(np.float32), 0.0), x))
    assert sigma.shape == (5, 10)
    np.testing.assert_allclose(sigma, 1.0, atol=1e-5)
    summary = spectrum_summary(sigma)
    assert summary["log10_condition"] == pytest.approx(0.0, abs=1e-5)
    assert summary["std_log_sigma"] == pytest.approx(0.0, abs=1e-5)
    scales = np.linspace(0.5, 5.0, 10).astype(np.float32)  # known singular values
    sigma = np.asarray(jacobian_singular_values(linear_apply(q.astype(np.float32) * scales, 0), x))
    np.testing.assert_allclose(sigma, np.broadcast_to(scales[::-1], (5, 10)), rtol=1e-5)
    assert spectrum_summary(sigma)["log10_condition"] == pytest.approx(1.0, abs=1e-5)


def test_layer_signal_second_moment_and_cosine_of_different_inputs():
    # Bug caught: the diagonal (an input with itself, cosine 1) counted in the mean.
    h = jnp.asarray(np.eye(4, dtype=np.float32).reshape(4, 2, 2, 1) * 3.0)  # orthogonal rows
    moment, cosine = layer_signal(h)
    assert float(moment) == pytest.approx(9.0 / 4) and float(cosine) == pytest.approx(0.0)
    same = jnp.ones((3, 2, 2, 2))
    assert float(layer_signal(same)[1]) == pytest.approx(1.0)
    assert float(layer_signal(jnp.concatenate([same, -same]))[1]) == pytest.approx(-0.2)


def test_forward_mode_line_gradient_of_a_net_equals_finite_differences():
    # An independent derivative of the real net (plain-8 at init, eval-mode BN): central
    # differences of logit_y along each line. Bug caught: a tangent in other units than the
    # line's, the wrong logit, rows coupled through batch statistics.
    from flax import nnx

    from resnet_flax.analysis.probe_study import graphdefs
    from resnet_flax.models.resnet import build_model
    from resnet_flax.models.spec import ModelSpec

    spec = ModelSpec(model="plain", depth=8, in_channels=1, conv_impl="xla")
    _, params, stats = nnx.split(build_model(spec, 0), nnx.Param, nnx.BatchStat)
    graphdef = graphdefs(spec)[1]
    rng = np.random.default_rng(4)
    cfg = ProbeConfig(lines=2, points=16, max_lag=4)
    pts, dirs, _ = line_points(rng.standard_normal((2, *IMAGE)).astype(np.float32), 3.0, cfg, rng)
    labels = np.repeat([1, 7], cfg.points)
    g = np.asarray(compiled(net_line_gradients)(graphdef, params, stats, pts, dirs, labels))
    model = nnx.merge(graphdef, params, stats)
    h = 1e-3
    logits = jax.jit(lambda x: model(x, train=False))
    plus, minus = logits(pts + h * dirs), logits(pts - h * dirs)
    fd = (np.asarray(plus) - np.asarray(minus))[np.arange(len(labels)), labels] / (2 * h)
    assert np.median(np.abs(g - fd) / (np.abs(fd) + 1e-3)) < 1e-2


@pytest.mark.slow
def test_probe_command_writes_json_and_figures_for_fresh_nets(tmp_path):
    from experiments.probe import main

    out = tmp_path / "out"
    args = ["--models", "plain", "residual", "--depths", "8", "--lines", "2", "--points", "16"]
    args += ["--max-lag", "4", "--batch", "4", "--out", str(out), "dataset=digits"]
    assert main(args) == 0
    files = sorted(p.name for p in (out / "probes").glob("*.json"))
    assert files == ["plain-8_seed0_init.json", "residual-8_seed0_init.json"]
    record = json.loads((out / "probes" / files[0]).read_text())
    assert len(record["shattered"]["example"]) == 16
    assert [layer["name"] for layer in record["signal"]["train"]][:2] == [
        "stage1/block0/conv1",
        "stage1/block0/conv2",
    ]
    assert len(record["gradient_norms"]) == 6 and -1 <= record["summary"]["lag1"] <= 1
    assert (out / "figures" / "probes_vs_depth.png").stat().st_size > 0


def test_a_fixup_net_at_init_is_probed_with_its_zero_gradients(tmp_path):
    # Fails when a probe crashes on a net that starts with zero-initialised layers (Fixup's
    # classifier and branch ends: the earlier layers have no gradient at init), or when its
    # file is named like the BN ResNet's and would overwrite it.
    from experiments.probe import main

    out = tmp_path / "out"
    args = ["--depths", "8", "--lines", "2", "--points", "16", "--max-lag", "4", "--batch", "4"]
    args += ["--out", str(out), "dataset=digits", "arm=residual_fixup"]
    assert main(args) == 0
    path = out / "probes" / "residual-nobn-fixup-8_seed0_init.json"
    record = json.loads(path.read_text())
    # The zero classifier leaves no gradient: the gradient probes are undefined, written as
    # null (strict JSON, no NaN); the input's own signal is still measured.
    assert {layer["norm"] for layer in record["gradient_norms"]} == {0.0}
    summary = record["summary"]
    assert summary["gradient_norm_ratio"] is None and summary["lag1"] is None
    assert summary["correlation_length"] is None  # not the longest lag: there is no series
    assert "NaN" not in path.read_text()
    assert math.isfinite(record["signal"]["input_cosine"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "dense"], "model must be one of plain, residual, preact; got 'dense'"),
        (["--depths", "9"], "CIFAR depth must be 6n+2"),
        (["--points", "2"], "probe max_lag must be in [1, points - 2]"),
        (["dataset.name=nope"], "dataset must be one of"),
        (["dataset=nope"], "Could not find 'dataset/nope'; available: cifar10, cifar100"),
    ],
)
def test_probe_command_refuses_bad_input_in_one_line_before_compiling(
    tmp_path, capsys, monkeypatch, args, message
):
    import experiments.probe as probe

    def compiles(*_, **__):
        raise AssertionError("a probe started before the input was checked")

    monkeypatch.setattr(probe, "probe_fresh", compiles)
    assert probe.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_probe_command_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    from experiments.probe import main

    (tmp_path / "summary.json").write_text("{}")  # looks like a run, has no run_config.json
    assert main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no run_config.json" in err[0]


def test_probe_config_rejects_impossible_settings():
    with pytest.raises(AnalysisError, match="batch >= 2"):
        ProbeConfig(batch=1).check()
    with pytest.raises(AnalysisError, match="span must be positive"):
        ProbeConfig(span=0.0).check()
