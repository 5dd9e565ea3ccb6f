"""experiments.train's config: its schema, resolvers and the RunConfig it becomes."""

from __future__ import annotations

import typing
from dataclasses import field, make_dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from experiments.cli.schema import (
    ROOT,
    command_fields,
    compose_config,
    plain,
    schema_entry,
    schema_of,
)
from resnet_flax.data.config import STREAMED, DataConfig
from resnet_flax.models.spec import ModelSpec
from resnet_flax.training.config import ConfigError, RunInfo, TrainerConfig
from resnet_flax.training.devices import cpu_sweep_jobs, visible_gpu_count
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig

# The config groups of experiments.train and the part of RunConfig each fills.
GROUPS = {"dataset": DataConfig, "optim": OptimConfig, "trainer": TrainerConfig}
# Parts whose keys sit at the top level of the command (depth=56, seed=1).
FLAT = {"model": ModelSpec, "info": RunInfo}


def train_schema() -> type:
    """The root schema of experiments.train: flat model and run keys, then the groups."""
    entries = []
    for part in FLAT.values():
        hints = typing.get_type_hints(part)
        entries += [schema_entry(f, hints[f.name]) for f in command_fields(part)]
    entries += [
        (name, schema_of(cls), field(default_factory=schema_of(cls)))
        for name, cls in GROUPS.items()
    ]
    return make_dataclass("TrainSchema", entries)


def epochs_to_iterations(epochs: float, dataset: str, batch_size: int) -> int:
    """Iterations in `epochs` passes over a streamed dataset's training split.

    The in-memory sets are counted in iterations, as the paper's CIFAR recipe is.
    """
    if dataset not in STREAMED:
        raise ConfigError(
            f"epoch-based recipes know the sizes of {', '.join(STREAMED)}; got {dataset!r}: "
            "set trainer.iterations and optim.linear_warmup_iterations directly"
        )
    return max(1, round(float(epochs) * STREAMED[dataset].train_images / int(batch_size)))


def linear_scaled_lr(base_lr: float, batch_size: int) -> float:
    """Goyal et al.'s linear scaling rule: base_lr per 256 images of the global batch."""
    return float(base_lr) * int(batch_size) / 256


RESOLVERS = {
    "visible_gpu_count": visible_gpu_count,
    "cpu_sweep_jobs": cpu_sweep_jobs,
    "epochs_to_iterations": epochs_to_iterations,
    "linear_scaled_lr": linear_scaled_lr,
}


def register() -> None:
    """Store the schema and resolvers the YAML tree names (idempotent; before composing)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    ConfigStore.instance().store(name="train_schema", node=train_schema())


def run_config(cfg: DictConfig) -> RunConfig:
    """The RunConfig of a composed experiments.train config (checked as it is built).

    A relative compilation_cache_dir is taken from the repository root, as recorded.
    """
    values = plain(cfg)
    sections = {name: values.pop(name) for name in GROUPS}
    for part, cls in FLAT.items():
        names = [f.name for f in command_fields(cls)]
        sections[part] = {name: values.pop(name) for name in names if name in values}
    if values:  # added with +key: Hydra lets a + override add a key the schema lacks
        valid = sorted([f.name for cls in FLAT.values() for f in command_fields(cls)] + [*GROUPS])
        raise ConfigError(f"unknown key(s) {', '.join(sorted(values))}; valid: {', '.join(valid)}")
    cache = sections["info"].get("compilation_cache_dir")
    if cache:
        path = Path(cache).expanduser()
        sections["info"]["compilation_cache_dir"] = str(path if path.is_absolute() else ROOT / path)
    return RunConfig.from_dict(sections)


register()


def compose_train(overrides: list[str]) -> DictConfig:
    """experiments.train's composed config with `overrides`, Hydra's own node included."""
    return compose_config(overrides, "config")
