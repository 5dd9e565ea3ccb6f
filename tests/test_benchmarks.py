"""The benchmarks at a tiny size: they measure, write JSON and Markdown, fail in one line."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks.common import torch_available
from benchmarks.step_time import main

ROOT = Path(__file__).resolve().parent.parent


# Slow: the whole benchmark CLI; its parts are tested fast below.
@pytest.mark.slow
def test_tiny_benchmark_writes_results(tmp_path):
    args = ["--models", "plain", "--depths", "8", "--batch-sizes", "8", "--image-size", "8"]
    args += ["--steps", "2", "--repeats", "1", "--out", str(tmp_path), "--name", "tiny"]
    args += ["--vmap-seeds", "1", "2", "--bn-batches", "batch", "4"]
    assert main(args) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["command"].startswith("python -m benchmarks.step_time")
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
    from benchmarks.step_time import preset_jobs
    from benchmarks.step_timer import preset_estimate_h

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
    from benchmarks.step_timer import BenchCase, run_case

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
    from benchmarks.torch_baseline import TorchStepTimer
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
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_time", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
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
    from benchmarks.torch_baseline import build_torch_model
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
    from benchmarks.torch_baseline import build_torch_model
    from resnet_flax.models.spec import ModelSpec, SpecError

    bn = build_torch_model(ModelSpec(model="residual", depth=8, bn_batch=4))[1]
    with pytest.raises(SpecError, match="bn_batch 4 does not divide the batch size 6"):
        bn(torch.randn(6, 16, 4, 4))


# --- make demo's sweep against its PyTorch eager twin (benchmarks.demo_vs_torch) ------------


def test_twin_learning_rate_is_our_warmup_schedule():
    from benchmarks.demo_vs_torch import demo_recipe
    from benchmarks.twin import twin_lr
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
    from benchmarks.demo_vs_torch import demo_recipe

    recipe = demo_recipe([])
    # deepest first, models inner: the order the demo's Hydra sweep dispatches its jobs
    assert recipe.jobs[:2] == (("plain", 56), ("residual", 56)) and len(recipe.jobs) == 6
    assert (recipe.iterations, recipe.batch_size, recipe.eval_every) == (110, 128, 11)
    assert (recipe.momentum, recipe.weight_decay, recipe.checkpoint_every) == (0.9, 1e-4, 110)
    small = demo_recipe(["hydra.sweeper.params.depth=8", "hydra.sweeper.params.model=plain"])
    assert small.jobs == (("plain", 8),)


def test_twin_refuses_a_recipe_it_does_not_implement():
    from benchmarks.common import UsageError
    from benchmarks.demo_vs_torch import demo_recipe

    with pytest.raises(UsageError, match="augmentation"):
        demo_recipe(["dataset.crop_padding=4"])
    with pytest.raises(UsageError, match="schedule other than constant"):
        demo_recipe(["optim.schedule=multistep"])


def test_twin_training_data_and_normalisation_are_ours():
    torch = pytest.importorskip("torch")
    from benchmarks.twin import normalised_nchw, pixel_mean
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

    from benchmarks.twin import build_twin, decayed_parameters
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

    from benchmarks.twin import build_twin
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
    from benchmarks.twin import TwinRecipe

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
    from benchmarks.twin import train_twin

    result = train_twin(recipe_for_tests(), "residual", 8, str(tmp_path))
    # the untrained net, then every eval_every iterations; the final training error in eval
    # mode over the whole training set
    assert [it for it, _, _ in result["test_curve"]] == [0, 11, 22]
    assert 0.0 <= result["final_train_error"] < 0.9 and (tmp_path / "residual-8.pt").exists()
    assert result["train_s"] > 0 and result["eval_s"] > 0


def test_twin_process_never_imports_jax():
    code = "import sys, benchmarks.torch_sweep; print('jax' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"  # JAX's import would count as PyTorch's start-up


def test_sweep_jobs_follow_hydras_basic_sweeper():
    from benchmarks.twin import sweep_jobs

    jobs = sweep_jobs({"depth": "56,20,8", "model": "plain,residual"}, "residual", 20)
    assert jobs[:3] == [("plain", 56), ("residual", 56), ("plain", 20)] and len(jobs) == 6
    assert sweep_jobs({"depth": 8}, "plain", 20) == [("plain", 8)]
    with pytest.raises(ValueError, match="model and depth only"):
        sweep_jobs({"seed": "0,1"}, "plain", 20)


def run_summary(model: str = "plain", started_at: float = 110.0, **timing_changes) -> dict:
    """A summary.json as the loop writes it: train() called at 110, returning 13 s later."""
    timings = {
        "startup_s": 10.0,
        "reused_process": False,
        "data_s": 0.5,
        "set_up_s": 1.0,
        "train_s": 2.0,
        "eval_s": 0.5,
        "checkpoint_s": 0.5,
        "compile_s": {"data": 0.0, "set_up": 0.5, "train": 6.0, "eval": 1.5, "checkpoint": 0.25},
        "programs": {"memory_train_step": 6.0, "eval_sums": 1.5, "draw": 0.5, "stack": 0.2},
        "total_s": 13.0,
        "started_at": started_at,
        "ended_at": started_at + 13.0,
        **timing_changes,
    }
    cache = {"lookups": 3, "hits": 1, "misses": 2, "not_written": 0}
    return {"model": model, "depth": 8, "status": "completed", "timings": timings} | {
        "compile_cache": cache
    }


def test_breakdown_takes_the_recorded_phases_and_leaves_the_rest_to_other():
    from benchmarks.breakdown import PARTS, job_breakdown

    job = job_breakdown(run_summary(), num=3)
    assert job["num"] == 3 and job["model"] == "plain" and not job["reused_worker"]
    assert job["total_s"] == pytest.approx(23.0)  # start-up, then train() itself
    assert job["set_up_s"] == 1.0 and job["set_up_compile_s"] == 0.5
    assert job["train_compile_s"] == 6.0 and job["eval_compile_s"] == 1.5
    assert job["other_compile_s"] == 0.25  # the checkpoint phase's compilation
    # 23 s less the phases (14.5 s) and their compilations (8.25 s)
    assert job["other_s"] == pytest.approx(0.25) and job["compile_s"] == pytest.approx(8.25)
    summed = [key for key, _ in PARTS if key in job and key != "total_s"]
    assert sum(job[key] for key in summed) == pytest.approx(job["total_s"])
    assert (job["cache_hits"], job["cache_misses"]) == (1, 2)
    assert list(job["programs"]) == ["memory_train_step", "eval_sums", "draw", "stack"]


def test_sweep_breakdown_reads_each_runs_summary_in_start_order(tmp_path):
    from benchmarks.breakdown import sweep_breakdown

    later = run_summary("residual", started_at=120.0, reused_process=True, startup_s=2.0)
    for name, summary in (("a", later), ("b", run_summary())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    sweep = sweep_breakdown(tmp_path, launched=90.0, exited=140.0)
    assert [j["model"] for j in sweep["jobs"]] == ["plain", "residual"]
    assert [j["num"] for j in sweep["jobs"]] == [0, 1] and sweep["jobs"][1]["reused_worker"]
    assert sweep["wall_s"] == 50.0 and sweep["first_train_call_s"] == 20.0
    assert sweep["after_last_job_s"] == 7.0  # the last run ended at 133
    assert sweep["job_seconds"]["startup_s"] == 12.0
    assert sweep["job_seconds"]["train_compile_s"] == pytest.approx(12.0)


def test_results_measured_before_the_loop_recorded_its_phases_still_render():
    from benchmarks.demo_report import markdown

    old = json.loads(
        (ROOT / "results/benchmarks/cpu-2cores/demo_vs_torch_before_compile_once.json").read_text()
    )
    table = markdown(old)
    assert "| ours, warm compilation cache |" in table and "Jobs, PyTorch eager twin" in table
    # the old breakdown's parts, records included, are still shown
    records = next(line for line in table.splitlines() if line.startswith("| metrics records"))
    assert records.count("-") < 3 and "| compile: training step |" in table


@pytest.fixture
def without_torch(tmp_path):
    """An environment in which `import torch` fails, whether or not PyTorch is installed."""
    shim = tmp_path / "no_torch" / "torch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('PyTorch is hidden from this test')\n")
    path = os.pathsep.join([str(shim.parent), str(ROOT)])
    return {**os.environ, "PYTHONPATH": path}


def one_error_line(env: dict, *command: str) -> str:
    """Run `python -m command` from the repository root: its one stderr line, exit status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_demo_vs_torch_with_a_bad_override_prints_one_line(without_torch):
    line = one_error_line(without_torch, "benchmarks.demo_vs_torch", "trainer.iterationz=5")
    assert "trainer.iterationz" in line


@pytest.mark.parametrize("command", ["demo_vs_torch", "step_time --torch", "conv --torch"])
def test_a_benchmark_without_torch_prints_one_line(without_torch, command):
    line = one_error_line(without_torch, *f"benchmarks.{command}".split())
    assert "needs PyTorch" in line


def imported_modules(path: Path) -> set[str]:
    """The modules a source file imports (absolute imports, every level of the file)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_benchmarks_layout_entry_points_import_no_entry_point():
    modules = {p.stem: p for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"}
    entry_points = {n for n, p in modules.items() if "__main__" in p.read_text()}
    assert {"step_time", "demo_vs_torch", "conv", "torch_sweep"} <= entry_points
    for name, path in modules.items():
        imported = {m.removeprefix("benchmarks.") for m in imported_modules(path)}
        if name in entry_points:
            assert not imported & entry_points, f"{name} imports an entry point"
        if name == "common":  # the leaf
            assert not imported & set(modules), "benchmarks.common imports benchmarks"
    for path in (ROOT / "resnet_flax").rglob("*.py"):
        tops = {m.split(".")[0] for m in imported_modules(path)}
        assert not tops & {"benchmarks", "experiments"}, f"{path} imports outside the library"


@pytest.mark.slow
def test_demo_vs_torch_writes_cold_warm_and_torch_results(tmp_path):
    pytest.importorskip("torch")
    from benchmarks.demo_vs_torch import main as demo_vs_torch

    overrides = ["trainer.iterations=11", "trainer.checkpoint_every=11"]
    overrides += ["hydra.sweeper.params.depth=8", "hydra.sweeper.params.model=residual"]
    assert demo_vs_torch([*overrides, "--out", str(tmp_path), "--name", "tiny"]) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["command"].startswith("python -m benchmarks.demo_vs_torch trainer.iterations")
    assert result["git_commit"] and set(result["ratio_to_torch"]) == {"cold", "warm"}
    (cold,), (warm,) = result["ours"]["cold"]["jobs"], result["ours"]["warm"]["jobs"]
    assert cold["train_compile_s"] > 0 and cold["eval_compile_s"] > 0
    assert cold["train_s"] > 0 and cold["cache_misses"] > 0 and cold["startup_s"] > 0
    assert warm["cache_hits"] > 0  # the warm sweep reads the cache the cold one wrote
    assert warm["final_train_error"] == cold["final_train_error"]  # the same runs again
    assert "plot_s" in result["ours"]["cold"]
    (twin,) = result["torch"]["jobs"]
    assert (twin["model"], twin["depth"]) == ("residual", 8) and twin["train_s"] > 0
    table = (tmp_path / "tiny.md").read_text()
    assert "| ours, warm compilation cache |" in table and "Jobs, PyTorch eager twin" in table


def test_a_benchmark_run_in_process_leaves_the_compilation_cache_on(tmp_path):
    # Fails when the benchmark's cold compiles switch the persistent cache off for the rest of
    # the process: every later run in it (a test, a notebook) then compiles again and
    # records no cache events in its summary.
    from benchmarks.step_time import cold_compiles

    with cold_compiles():
        assert not jax.config.jax_enable_compilation_cache
    assert jax.config.jax_enable_compilation_cache
    lookups = []

    def count(event: str, **_) -> None:
        lookups.append(event == "/jax/compilation_cache/compile_requests_use_cache")

    jax.monitoring.register_event_listener(count)
    try:
        jax.block_until_ready(jax.jit(lambda x: x * 3.5 - 1.25)(np.arange(7.0)))
    finally:
        jax.monitoring.unregister_event_listener(count)
    assert any(lookups)
