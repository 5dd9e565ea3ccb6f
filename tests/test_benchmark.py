"""The benchmark command at a tiny size: it measures and writes JSON and Markdown."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.benchmark import main
from resnet_flax.bench.torch_baseline import torch_available


def test_tiny_benchmark_writes_results(tmp_path):
    args = ["--models", "plain", "--depths", "8", "--batch-sizes", "8", "--image-size", "8"]
    args += ["--steps", "2", "--repeats", "1", "--out", str(tmp_path), "--name", "tiny"]
    args += ["--vmap-seeds", "1", "2", "--bn-batches", "batch", "4"]
    assert main(args) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["command"].startswith("python -m experiments.benchmark")
    row, grouped, two_seeds, _ = result["rows"]
    assert (row["vmap_seeds"], two_seeds["vmap_seeds"]) == (1, 2)
    assert (row["bn_batch"], grouped["bn_batch"]) == (None, 4) and grouped["step_s"] > 0
    assert two_seeds["params"] == row["params"] and two_seeds["train_images_per_sec"] > 0
    assert row["model"] == "plain" and row["depth"] == 8 and row["params"] > 0
    assert row["compile_s"] > 0 and row["train_images_per_sec"] > 0
    assert row["eval_images_per_sec"] > 0 and row["host_peak_rss_bytes"] > 0
    table = (tmp_path / "tiny.md").read_text()
    assert "| jax | plain | 8 | 8 | float32 |" in table and "| auto | 2 |" in table


def test_benchmark_rejects_bad_depth_before_compiling(tmp_path, capsys):
    assert main(["--depths", "57", "--out", str(tmp_path)]) == 2
    assert "6n+2" in capsys.readouterr().err


def test_benchmark_rejects_a_bn_batch_that_does_not_divide_the_batch(tmp_path, capsys):
    assert main(["--depths", "20", "--bn-batches", "48", "--out", str(tmp_path)]) == 2
    assert "bn_batch 48 does not divide the batch size 128" in capsys.readouterr().err


def test_input_pipeline_throughput_next_to_training(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from resnet_flax.data.generated import build_fake_imagenette

    data_dir = build_fake_imagenette(tmp_path / "tfds", 4, 1, size=(40, 48), classes=4)
    args = ["--models", "plain", "--depths", "8", "--batch-sizes", "8", "--image-size", "16"]
    args += ["--steps", "1", "--repeats", "1", "--out", str(tmp_path), "--name", "io"]
    args += ["--input", "imagenette", "--data-dir", str(data_dir), "--input-batches", "2"]
    assert main(args) == 0
    pipeline, step = json.loads((tmp_path / "io.json").read_text())["rows"]
    assert pipeline["framework"].startswith("input pipeline") and pipeline["model"] == "imagenette"
    assert pipeline["input_images_per_sec"] > 0 and step["train_images_per_sec"] > 0
    assert "input img/s" in (tmp_path / "io.md").read_text()


def test_input_benchmark_without_the_dataset_fails_in_one_line(tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    args = ["--input", "imagenette", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path)]
    assert main(args) == 2
    assert "tfds build imagenette" in capsys.readouterr().err


def test_preset_jobs_and_wall_time_estimate():
    from experiments.benchmark import preset_jobs
    from resnet_flax.bench.step_timer import preset_estimate_h

    jobs, batch, iterations, bn_batch = preset_jobs("he2015_fig6")
    assert batch == 128 and iterations == 64_000 and bn_batch == 64
    assert sorted(jobs) == [(m, d) for m in ("plain", "residual") for d in (20, 32, 44, 56)]
    rows = [
        {"model": m, "depth": d, "step_s": d / 1000, "compile_s": 10.0, "precision": "float32"}
        for m, d in jobs
    ]
    # 64k steps of (20+32+44+56)/1000 s for each model, plus 8 compiles of 10 s
    want = (2 * 64_000 * 0.152 + 80) / 3600
    assert preset_estimate_h(rows, jobs, iterations) == pytest.approx(want)


def test_unknown_preset_fails_in_one_line(capsys):
    assert main(["--preset", "he2099"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --preset he2099")


def test_rounds_alternate_with_another_timer():
    from resnet_flax.bench.step_timer import BenchCase, run_case

    calls = []
    case = BenchCase(model="plain", depth=8, batch_size=8, image_size=8)
    row = run_case(case, steps=1, repeats=2, rounds=3, after_round=lambda: calls.append(1))
    assert len(calls) == 3 and row["step_s"] > 0


def test_pytorch_rounds_run_in_their_own_process(tmp_path):
    pytest.importorskip("torch")
    args = ["--models", "residual", "--depths", "8", "--batch-sizes", "8", "--image-size", "8"]
    args += ["--steps", "1", "--repeats", "2", "--rounds", "2", "--torch"]
    assert main(args + ["--out", str(tmp_path), "--name", "t"]) == 0
    jax_row, torch_row = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert jax_row["framework"] == "jax" and torch_row["framework"].startswith("pytorch")
    assert torch_row["step_s"] > 0 and torch_row["threads"] >= 1


def test_pytorch_timer_reports_an_unsupported_net(tmp_path, capsys):
    pytest.importorskip("torch")
    from resnet_flax.bench.torch_baseline import TorchStepTimer
    from resnet_flax.models.spec import ModelSpec

    with pytest.raises(ValueError, match="plain/residual nets with basic blocks"):
        TorchStepTimer(ModelSpec(model="preact", depth=20), 8, 8)
    # the command says so before anything compiles
    assert main(["--models", "preact", "--depths", "20", "--torch", "--out", str(tmp_path)]) == 2
    assert "got preact-20" in capsys.readouterr().err


def test_benchmark_rejects_more_cores_than_the_machine_has(tmp_path, capsys):
    assert main(["--depths", "20", "--cores", "4096", "--out", str(tmp_path)]) == 2
    assert "between 1 and the" in capsys.readouterr().err


def test_per_core_benchmark_pins_jax_and_pytorch_to_one_core(tmp_path):
    # In a subprocess: pinning would otherwise narrow the pytest process itself.
    args = ["--models", "residual", "--depths", "8", "--batch-sizes", "8", "--image-size", "8"]
    args += ["--steps", "1", "--repeats", "1", "--cores", "1", "--out", str(tmp_path)]
    args += ["--name", "core"] + (["--torch"] if torch_available() else [])
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "core.json").read_text())
    assert (
        len(result["cores"]) == 1 and "Cores used: 1 (pinned" in (tmp_path / "core.md").read_text()
    )
    assert result["rows"][0]["device_count"] == 1
    if torch_available():
        assert result["rows"][1]["threads"] == 1


def test_pytorch_baseline_normalises_groups_of_bn_batch_images():
    torch = pytest.importorskip("torch")
    from resnet_flax.bench.torch_baseline import build_torch_model
    from resnet_flax.models.spec import ModelSpec

    torch.manual_seed(0)
    x = torch.randn(8, 16, 4, 4) * 3 + 1
    whole = build_torch_model(ModelSpec(model="residual", depth=8))[1]
    same = build_torch_model(ModelSpec(model="residual", depth=8, bn_batch=8))[1]
    grouped = build_torch_model(ModelSpec(model="residual", depth=8, bn_batch=4))[1]
    assert type(whole) is torch.nn.BatchNorm2d and type(grouped).__name__ == "GroupBatchNorm2d"
    # one group of the whole batch: nn.BatchNorm2d exactly, running statistics included
    assert torch.equal(same(x), whole(x))
    assert torch.equal(same.running_mean, whole.running_mean)
    assert torch.equal(same.running_var, whole.running_var)
    # two groups: each normalised as nn.BatchNorm2d would normalise it alone
    halves = [torch.nn.BatchNorm2d(16) for _ in range(2)]
    expected = torch.cat([bn(x[4 * i : 4 * i + 4]) for i, bn in enumerate(halves)])
    torch.testing.assert_close(grouped(x), expected)
    # running statistics move towards the mean over groups of each statistic
    mean = torch.stack([bn.running_mean for bn in halves]).mean(0)
    var = torch.stack([bn.running_var for bn in halves]).mean(0)
    torch.testing.assert_close(grouped.running_mean, mean)
    torch.testing.assert_close(grouped.running_var, var)
    grouped.eval()  # evaluation uses the running averages, as nn.BatchNorm2d
    torch.testing.assert_close(grouped(x), torch.nn.functional.batch_norm(x, mean, var))


def test_pytorch_rows_follow_the_bn_batch_of_each_case(tmp_path):
    pytest.importorskip("torch")
    args = ["--models", "residual", "--depths", "8", "--batch-sizes", "8", "--image-size", "8"]
    args += ["--steps", "1", "--repeats", "1", "--torch", "--bn-batches", "batch", "4"]
    assert main(args + ["--out", str(tmp_path), "--name", "g"]) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [(r["framework"][:3], r["bn_batch"]) for r in rows] == [
        ("jax", None),
        ("pyt", None),
        ("jax", 4),
        ("pyt", 4),
    ]


def test_pytorch_group_batchnorm_rejects_a_batch_its_groups_do_not_divide():
    torch = pytest.importorskip("torch")
    from resnet_flax.bench.torch_baseline import build_torch_model
    from resnet_flax.models.spec import ModelSpec, SpecError

    bn = build_torch_model(ModelSpec(model="residual", depth=8, bn_batch=4))[1]
    with pytest.raises(SpecError, match="bn_batch 4 does not divide the batch size 6"):
        bn(torch.randn(6, 16, 4, 4))
