"""The Hydra schema of each entry point, generated from the library's config dataclasses.

A key is declared once, in its dataclass (type and default); Hydra checks every YAML file
and command-line override against these structured configs, so a misspelt or unknown key
fails at composition, and the YAML tree sets values without restating defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import MISSING, field, make_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from resnet_flax.data.config import STREAMED, DataConfig
from resnet_flax.models.spec import ModelSpec
from resnet_flax.training.config import ConfigError, RunInfo, TrainerConfig
from resnet_flax.training.devices import cpu_sweep_jobs, visible_gpu_count
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
# The config groups of experiments.train and the part of RunConfig each fills.
GROUPS = {"dataset": DataConfig, "optim": OptimConfig, "trainer": TrainerConfig}
# Parts whose keys sit at the top level of the command (depth=56, seed=1).
FLAT = {"model": ModelSpec, "info": RunInfo}


def command_fields(cls: type, with_data_fields: bool = False) -> list[dataclasses.Field]:
    """The fields of a config dataclass that a command sets (not those taken from the data)."""
    return [
        f
        for f in dataclasses.fields(cls)
        if with_data_fields or not f.metadata.get("from_data", False)
    ]


def schema_type(hint: Any) -> Any:
    """The OmegaConf annotation for a dataclass field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return list[args[0]]
    if dataclasses.is_dataclass(hint):
        return schema_of(hint)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return Optional[schema_type(rest[0])] if len(rest) == 1 else Any  # noqa: UP045
    if args:  # a union of plain types (int | str): checked by the dataclass
        return Any
    return hint


def schema_entry(f: dataclasses.Field, hint: Any) -> tuple:
    """(name, type, field(...)) of one schema field with the dataclass field's default."""
    typ = schema_type(hint)
    default = f.default if f.default is not MISSING else f.default_factory()
    if dataclasses.is_dataclass(default):
        return f.name, typ, field(default_factory=schema_of(type(default)))
    if isinstance(default, tuple):
        return f.name, typ, field(default_factory=lambda d=default: list(d))
    return f.name, typ, field(default=default)


@functools.cache
def schema_of(cls: type) -> type:
    """A mutable structured-config dataclass mirroring a frozen config dataclass (one per class)."""
    hints = typing.get_type_hints(cls)
    entries = [schema_entry(f, hints[f.name]) for f in dataclasses.fields(cls)]
    return make_dataclass(f"{cls.__name__}Schema", entries)


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


def model_info_schema() -> type:
    """The root schema of experiments.model_info: every ModelSpec key and the input size."""
    hints = typing.get_type_hints(ModelSpec)
    entries = [schema_entry(f, hints[f.name]) for f in command_fields(ModelSpec, True)]
    entries.append(("input_size", Optional[int], field(default=None)))  # noqa: UP045
    return make_dataclass("ModelInfoSchema", entries)


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
    """Store the schemas and resolvers the YAML tree names (idempotent; before composing)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=train_schema())
    store.store(name="model_info_schema", node=model_info_schema())


def plain(cfg: DictConfig) -> dict:
    """The resolved config as plain values, without Hydra's own node."""
    keys = [key for key in cfg if key != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)


def run_config(cfg: DictConfig) -> RunConfig:
    """The RunConfig of a composed experiments.train config (checked as it is built).

    A relative compilation_cache_dir is taken from the repository root, as recorded.
    """
    values = plain(cfg)
    sections = {name: values.pop(name) for name in GROUPS}
    for part, cls in FLAT.items():
        names = [f.name for f in command_fields(cls)]
        sections[part] = {name: values.pop(name) for name in names if name in values}
    cache = sections["info"].get("compilation_cache_dir")
    if cache:
        path = Path(cache).expanduser()
        sections["info"]["compilation_cache_dir"] = str(path if path.is_absolute() else ROOT / path)
    return RunConfig.from_dict(sections)


def model_spec(cfg: DictConfig) -> tuple[ModelSpec, int | None]:
    """(ModelSpec, input size) of a composed experiments.model_info config."""
    values = plain(cfg)
    input_size = values.pop("input_size")
    return ModelSpec(**values), input_size


register()


def compose_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """The composed config of an entry point with `overrides`, Hydra's own node included."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name, overrides, return_hydra_config=True)
