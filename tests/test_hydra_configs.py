"""The Hydra config tree: presets compose, match the papers' recipes and map onto the library."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments.cli import train_config as schema
from resnet_flax.data.config import DATASETS, STREAMED, DataConfig, StreamConfig
from resnet_flax.models.spec import ModelSpec, SpecError, resolve
from resnet_flax.training import devices
from resnet_flax.training.config import ConfigError, RunInfo, TrainerConfig
from resnet_flax.training.devices import pin_gpu
from resnet_flax.training.job import completed_summary, remove_if_empty
from resnet_flax.training.run_config import RunConfig

CONF = Path(__file__).resolve().parent.parent / "conf"
DESIGN = CONF.parent / "docs" / "design.md"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
IMAGENET_PRESETS = ("he2015_fig4", "resnet50_imagenet")
CIFAR_PRESETS = [
    p
    for p in PRESETS
    if p.startswith(("he2015", "shortcut", "preact")) and p not in IMAGENET_PRESETS
]
CIFAR10_TRAIN_SIZE = 50_000


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    """One Hydra initialisation for the module (composing is then cheap)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="train"):
        yield


def make_cfg(*overrides: str, hydra_cfg: bool = False):
    """Compose conf/config.yaml with overrides (and the hydra node when asked)."""
    return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def to_library(cfg) -> tuple:
    """(model, dataset, optim, trainer, info) of the RunConfig of a composed config."""
    run = schema.run_config(cfg)
    return run.model, run.dataset, run.optim, run.trainer, run.info


def sweep_jobs(cfg) -> list[list[str]]:
    """The override lists that the basic sweeper makes from a preset's hydra.sweeper.params."""
    params = cfg.hydra.sweeper.params or {}
    axes = [[f"{k}={v.strip()}" for v in str(values).split(",")] for k, values in params.items()]
    return [list(job) for job in itertools.product(*axes)]


def assert_paper_recipe(cfg) -> None:
    """He et al. 2015's CIFAR-10 recipe (sec. 4.2)."""
    assert cfg.optim.lr == 0.1
    assert cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.optim.schedule == "multistep"
    assert list(cfg.optim.boundaries) == [32_000, 48_000]
    assert cfg.optim.decay_factor == 0.1
    assert cfg.trainer.batch_size == 128
    assert cfg.trainer.iterations == 64_000
    assert cfg.dataset.name == "cifar10"
    assert cfg.dataset.crop_padding == 4 and cfg.dataset.flip is True


def test_defaults_are_the_paper_recipe_and_the_library_defaults():
    cfg = make_cfg()
    assert_paper_recipe(cfg)
    assert (cfg.model, cfg.depth, cfg.shortcut, cfg.family) == ("residual", 20, "A", "cifar")
    # Fails when a YAML file restates a default that the dataclass declares differently
    # (trainer.eval_every was 1000 in YAML and 2000 in the dataclass).
    run = schema.run_config(cfg)
    cache = run.info.compilation_cache_dir
    assert run == RunConfig(info=RunInfo(compilation_cache_dir=cache))
    assert run.trainer.eval_every == 1000 and run.trainer.eval_every % run.trainer.log_every == 0


def test_the_schema_is_generated_from_the_dataclasses():
    # Fails when a dataclass field is missing from the Hydra schema, or a group's keys are.
    cfg = make_cfg()
    for part in (ModelSpec, RunInfo):
        for field in schema.command_fields(part):
            assert field.name in cfg, field.name
    assert "num_classes" not in cfg and "in_channels" not in cfg  # taken from the data
    for group, part in schema.GROUPS.items():
        assert set(cfg[group]) == {f.name for f in dataclasses.fields(part)}


@pytest.mark.parametrize(
    "overrides,key",
    [(["no_such_key=1"], "no_such_key"), (["trainer.eval_evry=5"], "trainer.eval_evry")],
)
def test_a_misspelt_key_fails_at_composition(overrides, key):
    with pytest.raises(Exception) as err:
        make_cfg(*overrides)
    cause = err.value
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    assert isinstance(cause, OmegaConfBaseException) and cause.full_key == key


def test_run_config_json_round_trips(tmp_path):
    # Fails when a field is lost or comes back with another type (tuple vs list, nested
    # stream node) between RunConfig and run_config.json.
    import json

    streamed = make_cfg("dataset=imagenette", "optim=sgd_imagenet_paper", "seed=4")
    for cfg in (make_cfg("dataset=digits"), streamed):
        run = schema.run_config(cfg)
        back = RunConfig.from_dict(json.loads(json.dumps(run.to_dict())))
        assert back == run
    with pytest.raises(ConfigError, match=r"unknown trainer key\(s\) iteration"):
        RunConfig.from_dict({"trainer": {"iteration": 5}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) data; valid: dataset"):
        RunConfig.from_dict({"data": {}})


def test_to_library_maps_every_override():
    cfg = make_cfg(
        "model=preact",
        "depth=164",
        "shortcut=B",
        "block=bottleneck",
        "precision=bfloat16",
        "remat=true",
        "zero_init_residual=true",
        "conv_impl=xla",
        "stage_loop=unroll",
        "bn_batch=64",
        "trainer.step_loop=scan",
        "seed=3",
        "dataset=svhn_cropped",
        "dataset.validation_size=1000",
        "optim=cosine",
        "trainer.iterations=10",
        "experiment_name=x",
    )
    spec, data_cfg, optim, trainer, info = to_library(cfg)
    assert spec == ModelSpec(
        model="preact",
        depth=164,
        shortcut="B",
        block="bottleneck",
        precision="bfloat16",
        remat=True,
        zero_init_residual=True,
        conv_impl="xla",
        stage_loop="unroll",
        bn_batch=64,
    )
    assert data_cfg == DataConfig(name="svhn_cropped", validation_size=1000, flip=False)
    assert optim.schedule == "cosine" and optim.boundaries == () and optim.lr == 0.1
    assert trainer == TrainerConfig(iterations=10, eval_every=1000, step_loop="scan")
    assert (info.experiment_name, info.seed) == ("x", 3)


@pytest.mark.parametrize(
    "overrides,error",
    [
        (["depth=57"], SpecError),
        (["block=bottleneck", "depth=32"], SpecError),
        (["family=imagenet", "depth=20"], SpecError),
        (["model=dense"], SpecError),
        (["shortcut=D"], SpecError),
        (["precision=float16"], SpecError),
        (["stage_loop=while"], SpecError),
        (["bn_batch=48"], SpecError),  # does not divide the batch of 128
        (["bn_batch=-1"], SpecError),
        (["optim.schedule=linear"], ConfigError),
    ],
)
def test_to_library_rejects_impossible_combinations(overrides, error):
    with pytest.raises(error) as info:
        to_library(make_cfg(*overrides))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "dataset,crop,flip",
    [
        ("cifar10", 4, True),
        ("cifar100", 4, True),
        ("svhn_cropped", 4, False),
        ("mnist", 0, False),
        ("fashion_mnist", 0, False),
        ("digits", 0, False),
        ("npz", 0, False),
    ],
)
def test_dataset_group_maps_onto_data_config(dataset, crop, flip):
    data_cfg = to_library(make_cfg(f"dataset={dataset}"))[1]
    assert data_cfg.name == dataset
    assert (data_cfg.crop_padding, data_cfg.flip, data_cfg.download) == (crop, flip, False)
    assert data_cfg.normalization == "pixel_mean"


def test_each_dataset_file_holds_its_mode_only():
    names = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))  # every one a dataset
    assert sorted(names) == sorted(DATASETS + tuple(STREAMED))
    for name in names:
        cfg = make_cfg(f"dataset={name}")
        data_cfg = to_library(cfg)[1]
        assert data_cfg.name == name
        text = (CONF / "dataset" / f"{name}.yaml").read_text()
        if name in STREAMED:
            assert "crop_padding" not in text and "validation_size" not in text
            assert data_cfg.stream is not None and data_cfg.normalization == "channel_std"
        else:
            assert "stream" not in text and cfg.dataset.stream is None and data_cfg.stream is None


def test_streamed_datasets_map_their_stream_node():
    imagenette = to_library(make_cfg("dataset=imagenette", "dataset.stream.image_size=128"))[1]
    assert imagenette.stream == StreamConfig(
        image_size=128, tfds_config="320px-v2", shuffle_buffer=10_000, cache=True
    )
    assert to_library(make_cfg("dataset=imagenet2012"))[1].stream == StreamConfig()
    npz = to_library(make_cfg("dataset=npz", "dataset.path=x.npz", "dataset.num_classes=7"))[1]
    assert (npz.path, npz.num_classes) == ("x.npz", 7)


def test_every_group_option_exists():
    assert {p.stem for p in (CONF / "optim").glob("*.yaml")} >= {"sgd_paper", "cosine"}
    assert {p.stem for p in (CONF / "trainer").glob("*.yaml")} >= {"paper"}
    assert set(PRESETS) >= {
        "digits_degradation",
        "he2015_fig1",
        "he2015_fig6",
        "he2015_table6",
        "shortcut_options",
        "preact_identity",
    }


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_documents_its_command_and_every_job_is_valid(preset):
    text = (CONF / "experiment" / f"{preset}.yaml").read_text()
    lines = text.splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith(f"# python -m experiments.train -m experiment={preset}")
    cfg = make_cfg(f"experiment={preset}", hydra_cfg=True)
    assert cfg.experiment_name == preset
    jobs = sweep_jobs(cfg)
    assert jobs and cfg.hydra.sweeper.params, "each preset defines its sweep"
    for job in jobs:
        spec = to_library(make_cfg(f"experiment={preset}", *job))[0]
        resolve(spec)


def test_imagenet_presets_follow_their_recipes():
    fig4 = make_cfg("experiment=he2015_fig4", hydra_cfg=True)
    assert sorted(sweep_jobs(fig4)) == sorted(
        [f"model={m}", f"depth={d}"] for m in ("plain", "residual") for d in (18, 34)
    )
    spec, data_cfg, optim, trainer, _ = to_library(make_cfg("experiment=he2015_fig4"))
    assert (spec.family, spec.shortcut, data_cfg.name) == ("imagenet", "A", "imagenet2012")
    assert data_cfg.stream == StreamConfig(augmentation="scale")
    assert (trainer.batch_size, trainer.iterations) == (256, 600_000)
    assert (optim.lr, optim.momentum, optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert optim.boundaries == (150_000, 300_000, 450_000)

    spec, data_cfg, optim, trainer, _ = to_library(make_cfg("experiment=resnet50_imagenet"))
    assert (spec.depth, spec.shortcut, spec.precision) == (50, "B", "bfloat16")
    assert trainer.iterations == round(100 * 1_281_167 / 256)  # 100 epochs
    assert optim.schedule == "cosine" and optim.lr == pytest.approx(0.1)
    assert optim.linear_warmup_iterations == round(5 * 1_281_167 / 256)
    # linear scaling: the lr follows the global batch
    bigger = to_library(make_cfg("experiment=resnet50_imagenet", "trainer.batch_size=1024"))
    assert bigger[2].lr == pytest.approx(0.4)
    assert bigger[3].iterations == round(100 * 1_281_167 / 1024)


@pytest.mark.parametrize("preset", CIFAR_PRESETS)
def test_cifar_presets_use_the_paper_recipe(preset):
    cfg = make_cfg(f"experiment={preset}")
    assert_paper_recipe(cfg)
    if preset.startswith("he2015"):  # batch 128 on two GPUs: BN over each GPU's 64 images
        assert to_library(cfg)[0].bn_batch == 64


def test_fig1_and_fig6_sweep_the_papers_nets():
    fig1 = make_cfg("experiment=he2015_fig1", hydra_cfg=True)
    assert sweep_jobs(fig1) == [["model=plain", "depth=20"], ["model=plain", "depth=56"]]
    fig6 = make_cfg("experiment=he2015_fig6", hydra_cfg=True)
    nets = {tuple(job) for job in sweep_jobs(fig6)}
    assert nets == {
        (f"model={m}", f"depth={d}") for m in ("plain", "residual") for d in (20, 32, 44, 56)
    }
    assert fig6.shortcut == "A" and fig6.optim.warmup_lr is None


def test_fig6_validation_split_is_45k_5k():
    data_cfg = to_library(make_cfg("experiment=he2015_fig6", "dataset.validation_size=5000"))[1]
    assert data_cfg.validation_size == 5_000
    assert CIFAR10_TRAIN_SIZE - data_cfg.validation_size == 45_000


def test_resnet110_commands_use_the_warmup():
    # The second command for he2015_table6 / he2015_fig6 (docs/design.md).
    for preset in ("he2015_table6", "he2015_fig6"):
        cfg = make_cfg(f"experiment={preset}", "depth=110", "optim=sgd_paper_warmup")
        assert_paper_recipe(cfg)
        optim = to_library(cfg)[2]
        assert (optim.warmup_lr, optim.warmup_until_error) == (0.01, 0.8)
        assert optim.lr == 0.1 and optim.boundaries == (32_000, 48_000)
    table6 = make_cfg("experiment=he2015_table6", hydra_cfg=True)
    depths = {job[1] for job in sweep_jobs(table6)}
    assert depths == {f"depth={d}" for d in (20, 32, 44, 56, 1202)}
    assert "experiment=he2015_table6 depth=110 seed=0,1,2,3,4" in DESIGN.read_text()


def test_preact_identity_is_he2016():
    cfg = make_cfg("experiment=preact_identity", hydra_cfg=True)
    assert {tuple(j) for j in sweep_jobs(cfg)} == {
        (f"model={m}", f"depth={d}") for m in ("residual", "preact") for d in (164, 1001)
    }
    assert cfg.shortcut == "B" and cfg.optim.warmup_lr == 0.01
    for depth in (164, 1001):
        assert (
            resolve(to_library(make_cfg("experiment=preact_identity", f"depth={depth}"))[0]).block
            == "bottleneck"
        )
    spec = to_library(make_cfg("experiment=preact_identity", "depth=110", "shortcut=A"))[0]
    assert resolve(spec).block == "basic"


def test_shortcut_options_sweeps_a_b_c():
    cfg = make_cfg("experiment=shortcut_options", hydra_cfg=True)
    shortcuts = {job[0] for job in sweep_jobs(cfg)}
    assert shortcuts == {"shortcut=A", "shortcut=B", "shortcut=C"}


def test_digits_demo_is_small_and_deep_enough():
    cfg = make_cfg("experiment=digits_degradation", hydra_cfg=True)
    jobs = [dict(o.split("=") for o in job) for job in sweep_jobs(cfg)]
    depths = [int(job["depth"]) for job in jobs]
    assert min(depths) == 8 and max(depths) >= 56
    assert depths == sorted(depths, reverse=True), "deepest first: parallel jobs end together"
    assert {job["model"] for job in jobs} == {"plain", "residual"}
    assert cfg.dataset.name == "digits"
    trainer = to_library(cfg)[3]
    assert trainer.iterations <= 200 and trainer.eval_every % trainer.log_every == 0
    assert all(b < trainer.iterations for b in cfg.optim.boundaries)


def test_run_and_sweep_directories():
    cfg = make_cfg("experiment=he2015_fig1", hydra_cfg=True)
    assert cfg.hydra.run.dir.startswith("results/runs/he2015_fig1/")
    assert cfg.hydra.sweep.dir.startswith("results/sweeps/he2015_fig1/")
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.override_dirname}"
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert {"experiment", "trainer.progress", "compilation_cache_dir"} <= excluded


def test_launchers_compose(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    multi = make_cfg("hydra/launcher=multi_gpu", hydra_cfg=True).hydra.launcher
    assert "JoblibLauncher" in multi._target_ and multi.backend == "loky"
    assert multi.n_jobs == 3
    slurm = make_cfg(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.gpus_per_node=2",
        hydra_cfg=True,
    ).hydra.launcher
    assert "SlurmLauncher" in slurm._target_
    assert (slurm.partition, slurm.timeout_min, slurm.gpus_per_node) == ("gpu", 30, 2)
    assert slurm.max_num_timeout > 0, "preempted jobs must be requeued"
    local = make_cfg("hydra/launcher=submitit_local", hydra_cfg=True).hydra.launcher
    assert "LocalLauncher" in local._target_
    # cpu_parallel: one job per usable core on a CPU-only host, one where a GPU is visible
    cpu = make_cfg("hydra/launcher=cpu_parallel", hydra_cfg=True).hydra.launcher
    assert "JoblibLauncher" in cpu._target_ and cpu.n_jobs == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(devices, "usable_cores", lambda: 6)
    assert make_cfg("hydra/launcher=cpu_parallel", hydra_cfg=True).hydra.launcher.n_jobs == 6
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert make_cfg("hydra/launcher=cpu_parallel", hydra_cfg=True).hydra.launcher.n_jobs == 6
    preset = make_cfg("experiment=digits_degradation", hydra_cfg=True)
    assert "JoblibLauncher" in preset.hydra.launcher._target_ and preset.cpu_devices == 1


def test_compilation_cache_dir_is_a_config_key(monkeypatch):
    def cache_dir(cfg):
        return schema.run_config(cfg).info.compilation_cache_dir

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert cache_dir(make_cfg()) == str(schema.ROOT / ".jax_cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/somewhere")
    assert cache_dir(make_cfg()) == "/tmp/somewhere"
    assert cache_dir(make_cfg("compilation_cache_dir=null")) is None


def test_pin_gpu_gives_each_worker_its_own_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.setattr(devices, "_gpu_lock", None)
    assert pin_gpu(2, tmp_path) == 0  # job 2 of 2 GPUs -> GPU index 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert pin_gpu(7, tmp_path) == 0, "a worker keeps its GPU for later jobs"
    first_fd = devices._gpu_lock[1]
    # Another worker (a second lock holder) asking for the same GPU gets the free one.
    monkeypatch.setattr(devices, "_gpu_lock", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert pin_gpu(0, tmp_path) == 1
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    os.close(devices._gpu_lock[1])
    os.close(first_fd)


def test_completed_summary_and_cleanup(tmp_path):
    def job(iterations=10, seeds=1, seed=0):
        return RunConfig(
            trainer=TrainerConfig(iterations=iterations, vmap_seeds=seeds), info=RunInfo(seed=seed)
        )

    assert completed_summary(tmp_path, job()) is None
    (tmp_path / "summary.json").write_text('{"status": "completed", "iterations": 10}')
    assert completed_summary(tmp_path, job())["iterations"] == 10
    (tmp_path / "summary.json").write_text('{"status": "running", "iterations": 10}')
    assert completed_summary(tmp_path, job()) is None
    # seeds trained together: done when every seed_<s> directory is
    for seed in (3, 4):
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "summary.json").write_text(
            '{"status": "completed", "iterations": 10}'
        )
    assert completed_summary(tmp_path, job(seeds=2, seed=3))["status"] == "completed"
    assert completed_summary(tmp_path, job(seeds=2, seed=2)) is None

    rejected = tmp_path / "job"
    (rejected / ".hydra").mkdir(parents=True)
    (rejected / "train.log").write_text("")
    remove_if_empty(rejected)
    assert not rejected.exists()
    remove_if_empty(tmp_path)  # holds summary.json: a real run, kept
    assert (tmp_path / "summary.json").exists()
