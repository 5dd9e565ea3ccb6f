"""The benchmark command at a tiny size: it measures and writes JSON and Markdown."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.benchmark import main
from resnet_flax.bench.torch_baseline import torch_available


# Slow: the whole benchmark CLI; its parts are tested fast below.
@pytest.mark.slow
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


# Slow: a benchmark subprocess pinned to one core; pinning itself is tested in test_cpu_devices.
@pytest.mark.slow
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


# --- make demo's sweep against its PyTorch eager twin (--demo-vs-torch) ---------------------


def test_twin_learning_rate_is_our_warmup_schedule():
    from experiments.demo_vs_torch import demo_recipe
    from resnet_flax.bench.torch_sweep import twin_lr
    from resnet_flax.training.optim import OptimConfig, make_schedule

    recipe = demo_recipe([])
    ours = make_schedule(
        OptimConfig(schedule="constant", boundaries=(), linear_warmup_iterations=22), 110
    )
    assert recipe.warmup_iterations == 22 and recipe.lr == 0.1
    for step in (0, 1, 21, 22, 50):
        assert twin_lr(recipe, step) == pytest.approx(float(ours(step)), rel=1e-6, abs=1e-9)
    assert twin_lr(recipe, 0) == 0.0 and twin_lr(recipe, 21) < 0.1


def test_twin_recipe_is_the_demo_preset_in_hydras_job_order():
    from experiments.demo_vs_torch import demo_recipe

    recipe = demo_recipe([])
    # deepest first, models inner: the order the demo's Hydra sweep dispatches its jobs
    assert recipe.jobs[:2] == (("plain", 56), ("residual", 56)) and len(recipe.jobs) == 6
    assert (recipe.iterations, recipe.batch_size, recipe.eval_every) == (110, 128, 11)
    assert (recipe.momentum, recipe.weight_decay, recipe.checkpoint_every) == (0.9, 1e-4, 110)
    small = demo_recipe(["hydra.sweeper.params.depth=8", "hydra.sweeper.params.model=plain"])
    assert small.jobs == (("plain", 8),)


def test_twin_refuses_a_recipe_it_does_not_implement():
    from experiments.benchmark import UsageError
    from experiments.demo_vs_torch import demo_recipe

    with pytest.raises(UsageError, match="augmentation"):
        demo_recipe(["dataset.crop_padding=4"])
    with pytest.raises(UsageError, match="schedule other than constant"):
        demo_recipe(["optim.schedule=multistep"])


def test_twin_training_data_and_normalisation_are_ours():
    torch = pytest.importorskip("torch")
    from resnet_flax.bench.torch_sweep import normalised_nchw, pixel_mean
    from resnet_flax.data import augment as aug
    from resnet_flax.data.memory import DataConfig, load_dataset, load_digits

    ours = load_dataset(DataConfig(name="digits", crop_padding=0, flip=False))
    twin = load_digits()
    assert np.array_equal(ours.x_train, twin.x_train) and np.array_equal(ours.y_test, twin.y_test)
    mean, std = aug.normalization_stats(ours.x_train, "pixel_mean")
    expected = np.asarray(aug.normalize(ours.x_train, mean, std)).transpose(0, 3, 1, 2)
    got = normalised_nchw(twin.x_train, pixel_mean(twin.x_train))
    assert isinstance(got, torch.Tensor) and got.shape == (len(ours.x_train), 1, 8, 8)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_twin_decays_the_tensors_ours_decays():
    pytest.importorskip("torch")
    from flax import nnx

    from resnet_flax.bench.torch_sweep import build_twin, decayed_parameters
    from resnet_flax.models.resnet import abstract_model
    from resnet_flax.models.spec import ModelSpec
    from resnet_flax.training.optim import weight_decay_mask

    params = nnx.state(abstract_model(ModelSpec(depth=8, in_channels=1)), nnx.Param)
    mask = jax.tree.leaves(weight_decay_mask(params))
    sizes = [int(np.prod(p.shape)) for p in jax.tree.leaves(params)]
    ours = sorted(s for s, m in zip(sizes, mask, strict=True) if m)
    ours_rest = sorted(s for s, m in zip(sizes, mask, strict=True) if not m)
    decay, rest = decayed_parameters(build_twin(recipe_for_tests(), "residual", 8, 1, 10))
    assert sorted(p.numel() for p in decay) == ours  # conv and linear weights
    assert sorted(p.numel() for p in rest) == ours_rest  # BatchNorm scale/shift, linear bias


def test_twin_is_initialised_as_ours():
    pytest.importorskip("torch")
    from flax import nnx

    from resnet_flax.bench.torch_sweep import build_twin
    from resnet_flax.models.resnet import build_model
    from resnet_flax.models.spec import ModelSpec

    params = nnx.state(build_model(ModelSpec(depth=8, in_channels=1)), nnx.Param)
    net = build_twin(recipe_for_tests(), "residual", 8, 1, 10)
    # the last stage's second 3x3 64->64 conv: 36,864 draws each
    ours = next(p for p in jax.tree.leaves(params) if p.shape == (3, 3, 64, 64))
    theirs_std = float(net[5].conv2.weight.detach().std())
    ours_std = float(np.std(np.asarray(ours)))
    assert theirs_std == pytest.approx(ours_std, rel=0.05)  # He normal, not PyTorch's default
    assert float(net[-1].bias.detach().abs().max()) == 0.0
    assert net[1].momentum == pytest.approx(0.1)  # Flax's 0.9 in PyTorch's convention


def recipe_for_tests(**changes):
    """A small twin recipe: residual-8, 22 iterations in intervals of 11."""
    from resnet_flax.bench.torch_sweep import TwinRecipe

    fields = dict(
        jobs=(("residual", 8),),
        n_jobs=1,
        iterations=22,
        batch_size=128,
        log_every=11,
        eval_every=11,
        checkpoint_every=22,
        eval_batch_size=1000,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        warmup_iterations=22,
    )
    return TwinRecipe(**{**fields, **changes})


def test_twin_evaluates_on_our_schedule(tmp_path):
    pytest.importorskip("torch")
    from resnet_flax.bench.torch_sweep import train_twin

    result = train_twin(recipe_for_tests(), "residual", 8, str(tmp_path))
    # the untrained net, then every eval_every iterations; the final training error in eval
    # mode over the whole training set
    assert [it for it, _, _ in result["test_curve"]] == [0, 11, 22]
    assert 0.0 <= result["final_train_error"] < 0.9 and (tmp_path / "residual-8.pt").exists()
    assert result["train_s"] > 0 and result["eval_s"] > 0


def test_twin_process_never_imports_jax():
    code = "import sys, resnet_flax.bench.torch_sweep; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # JAX's import would count as PyTorch's start-up


def test_sweep_jobs_follow_hydras_basic_sweeper():
    from resnet_flax.bench.torch_sweep import sweep_jobs

    jobs = sweep_jobs({"depth": "56,20,8", "model": "plain,residual"}, "residual", 20)
    assert jobs[:3] == [("plain", 56), ("residual", 56), ("plain", 20)] and len(jobs) == 6
    assert sweep_jobs({"depth": 8}, "plain", 20) == [("plain", 8)]
    with pytest.raises(ValueError, match="model and depth only"):
        sweep_jobs({"seed": "0,1"}, "plain", 20)


TRACE, LOWER, COMPILE = (
    f"/jax/core/compile/{e}_duration"
    for e in ("jaxpr_trace", "jaxpr_to_mlir_module", "backend_compile")
)


def synthetic_record(**changes) -> dict:
    """A job_timer record: process start 100, first phase 110, end 123 (seconds)."""
    record = {
        "num": 3,
        "pid": 7,
        "process_start": 100.0,
        "previous_job_end": None,
        "job_start": 109.0,
        "job_end": 123.0,
        "summary": {"model": "plain", "depth": 8},
        "phases": [
            ["data", 110.0, 110.5],
            ["set_up", 110.5, 112.0],
            ["train", 112.0, 120.0],
            ["records", 120.0, 120.0],
            ["eval", 120.0, 122.0],
            ["checkpoint", 122.0, 122.5],
            ["summary", 122.5, 122.6],
        ],
        "spans": [
            [COMPILE, 111.0, 111.5, "jit(draw)"],
            [TRACE, 112.0, 113.0, "memory_train_step"],
            [TRACE, 112.2, 112.5, "inner"],  # a nested jit traced inside the step's trace
            [LOWER, 113.0, 114.0, "jit(memory_train_step)"],
            [COMPILE, 114.0, 118.0, "jit(memory_train_step)"],
            [COMPILE, 120.0, 121.5, "jit(eval_sums)"],
        ],
        "events": [
            ["/jax/compilation_cache/cache_misses", 117.0],
            ["/jax/compilation_cache/cache_hits", 121.0],
        ],
    }
    return {**record, **changes}


def test_breakdown_separates_compilation_from_each_phase():
    from resnet_flax.bench.breakdown import job_breakdown

    job = job_breakdown(synthetic_record())
    assert job["startup_s"] == pytest.approx(10.0)  # process start to the first phase
    assert job["set_up_s"] == pytest.approx(1.0) and job["set_up_compile_s"] == pytest.approx(0.5)
    # the nested trace is not counted twice; the step's compilation is not training time
    assert job["train_compile_s"] == pytest.approx(6.0) and job["train_s"] == pytest.approx(2.0)
    assert job["eval_compile_s"] == pytest.approx(1.5) and job["eval_s"] == pytest.approx(0.5)
    assert job["checkpoint_s"] == pytest.approx(0.5) and job["records_s"] == pytest.approx(0.1)
    assert job["other_s"] == pytest.approx(0.4) and job["total_s"] == pytest.approx(23.0)
    parts = ("startup", "data", "set_up", "set_up_compile", "train", "train_compile", "eval")
    parts += ("eval_compile", "checkpoint", "records", "other")
    assert sum(job[f"{p}_s"] for p in parts) == pytest.approx(job["total_s"])
    assert (job["cache_hits"], job["cache_misses"]) == (1, 1) and not job["reused_worker"]
    assert next(iter(job["programs"])) == "memory_train_step"


def test_breakdown_starts_a_reused_workers_job_at_its_previous_job():
    from resnet_flax.bench.breakdown import job_breakdown

    job = job_breakdown(synthetic_record(previous_job_end=108.0))
    assert job["reused_worker"] and job["startup_s"] == pytest.approx(2.0)
    assert job["total_s"] == pytest.approx(15.0)


def test_sweep_breakdown_reads_the_timer_files(tmp_path):
    from resnet_flax.bench.breakdown import sweep_breakdown

    (tmp_path / "sweep.json").write_text(json.dumps({"multirun_start": 95.0}))
    for num in (1, 0):
        record = synthetic_record(num=num)
        (tmp_path / f"job_{num}.json").write_text(json.dumps(record))
    sweep = sweep_breakdown(tmp_path, launched=90.0, exited=124.0)
    assert [j["num"] for j in sweep["jobs"]] == [0, 1]
    assert sweep["wall_s"] == 34.0 and sweep["main_startup_s"] == 5.0
    assert sweep["first_job_entry_s"] == 19.0 and sweep["after_last_job_s"] == 1.0
    assert sweep["job_seconds"]["train_compile_s"] == pytest.approx(12.0)


def test_job_timer_hooks_every_phase_it_names(monkeypatch):
    import importlib

    from experiments import job_timer

    for module, owner, name, _ in job_timer.HOOKS:  # restored after the test
        target = importlib.import_module(module)
        target = getattr(target, owner) if owner else target
        monkeypatch.setattr(target, name, getattr(target, name))
    assert job_timer.install_hooks() == []  # a renamed library function shows up here
    from resnet_flax.training import loop

    wrapped = loop.set_up
    job_timer.install_hooks()
    assert loop.set_up is wrapped and wrapped.timed_phase == "set_up"  # wrapped once
    monkeypatch.setattr(job_timer, "_job", {"phases": []})
    assert job_timer.timed_phase("eval", lambda x: x + 1)(1) == 2
    assert [p for p, _, _ in job_timer._job["phases"]] == ["eval"]


def test_job_timer_writes_a_record_for_completed_and_failed_jobs(tmp_path, monkeypatch):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from experiments import job_timer

    monkeypatch.setattr(job_timer, "install_hooks", lambda: [])
    monkeypatch.setattr(job_timer, "listen_to_jax", lambda: None)
    monkeypatch.setattr(job_timer, "_process", {"hooked": True, "last_end": None})
    timer = job_timer.JobTimer(str(tmp_path))
    config = OmegaConf.create({"hydra": {"job": {"num": 0}, "overrides": {"task": ["depth=8"]}}})
    timer.on_job_start(config)
    summary = {"model": "plain", "depth": 8, "final_train_error": 0.5, "extra": 1}
    timer.on_job_end(config, JobReturn(status=JobStatus.COMPLETED, _return_value=summary))
    record = json.loads((tmp_path / "job_0.json").read_text())
    assert record["summary"]["final_train_error"] == 0.5 and "extra" not in record["summary"]
    assert record["overrides"] == ["depth=8"] and record["job_end"] >= record["job_start"]
    config.hydra.job.num = 1
    timer.on_job_start(config)  # the same worker's next job, which fails
    failed = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom"))
    timer.on_job_end(config, failed)
    record = json.loads((tmp_path / "job_1.json").read_text())
    assert "boom" in record["error"] and record["previous_job_end"] is not None


@pytest.mark.slow
def test_demo_vs_torch_writes_cold_warm_and_torch_results(tmp_path):
    pytest.importorskip("torch")
    overrides = ["trainer.iterations=11", "trainer.checkpoint_every=11"]
    overrides += ["hydra.sweeper.params.depth=8", "hydra.sweeper.params.model=residual"]
    args = ["--demo-vs-torch", "--demo-overrides", *overrides, "--out", str(tmp_path)]
    assert main(args + ["--name", "tiny"]) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["command"].startswith("python -m experiments.benchmark --demo-vs-torch")
    assert result["git_commit"] and set(result["ratio_to_torch"]) == {"cold", "warm"}
    (cold,), (warm,) = result["ours"]["cold"]["jobs"], result["ours"]["warm"]["jobs"]
    assert cold["unhooked"] == [] and cold["train_compile_s"] > 0 and cold["eval_compile_s"] > 0
    assert cold["train_s"] > 0 and cold["cache_misses"] > 0 and cold["startup_s"] > 0
    assert warm["cache_hits"] > 0  # the warm sweep reads the cache the cold one wrote
    assert warm["final_train_error"] == cold["final_train_error"]  # the same runs again
    assert "plot_s" in result["ours"]["cold"]
    (twin,) = result["torch"]["jobs"]
    assert (twin["model"], twin["depth"]) == ("residual", 8) and twin["train_s"] > 0
    table = (tmp_path / "tiny.md").read_text()
    assert "| ours, warm compilation cache |" in table and "Jobs, PyTorch eager twin" in table
