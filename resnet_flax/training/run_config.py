"""The one run configuration: every key of a run, its type and default, checked when built."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnet_flax.data.config import STREAMED, DataConfig
from resnet_flax.models.spec import ModelSpec, check_bn_batch, for_backend
from resnet_flax.rundir import RUN_CONFIG_FILE, read_json
from resnet_flax.training.config import ConfigError, RunInfo, TrainerConfig
from resnet_flax.training.optim import OptimConfig


@dataclass(frozen=True)
class RunConfig:
    """A run: the network, the data, the recipe, the trainer and what names the run.

    Building one checks it (each part checks its own keys; this class the rules that span
    parts), so a RunConfig that exists can train. run_config.json is `to_dict()`.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    dataset: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    info: RunInfo = field(default_factory=RunInfo)

    def __post_init__(self) -> None:
        check_bn_batch(self.model.bn_batch, self.trainer.batch_size)
        if self.info.init_from is not None:
            check_constructible(self)

    def to_dict(self) -> dict:
        """Plain JSON-ready sections: {"model": {...}, "dataset": {...}, ...}."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, sections: Mapping[str, Any]) -> RunConfig:
        """A RunConfig from to_dict()'s form (run_config.json); unknown keys raise ConfigError."""
        return build(cls, sections, "")

    def replace(self, **parts) -> RunConfig:
        """A copy with whole parts replaced (checked again)."""
        return dataclasses.replace(self, **parts)


def read_run_config(run_dir: str | Path) -> RunConfig | None:
    """The RunConfig a run directory recorded (run_config.json), or None when it has none."""
    raw = read_json(Path(run_dir) / RUN_CONFIG_FILE)
    return RunConfig.from_dict(raw) if raw else None


def check_constructible(cfg: RunConfig) -> None:
    """init_from starts one seed of an in-memory dataset from one trained run."""
    if cfg.trainer.vmap_seeds != 1:
        raise ConfigError(
            f"init_from starts one seed from one trained run; got trainer.vmap_seeds="
            f"{cfg.trainer.vmap_seeds}: set trainer.vmap_seeds=1"
        )
    if cfg.dataset.name in STREAMED:
        raise ConfigError(
            f"init_from needs an in-memory dataset (the construction passes over the whole "
            f"training set); {cfg.dataset.name!r} is streamed"
        )


def resolve_run(
    cfg: RunConfig,
    backend: str,
    local_devices: int,
    data_shape: tuple[int, int],
    eval_batch_size: int,
) -> RunConfig:
    """The config as the run uses it: every "auto" decided, the data's classes and channels.

    `backend` is JAX's ("cpu", "gpu", ...), `local_devices` this process's device count,
    `data_shape` (classes, image channels), `eval_batch_size` the one the data source uses.
    """
    classes, channels = data_shape
    model = for_backend(cfg.model.replace(num_classes=classes, in_channels=channels), backend)
    trainer = dataclasses.replace(
        cfg.trainer.for_backend(backend), eval_batch_size=int(eval_batch_size)
    )
    cpu_devices = local_devices if backend == "cpu" else 1
    info = dataclasses.replace(cfg.info, cpu_devices=cpu_devices)
    return cfg.replace(model=model, trainer=trainer, info=info)


def build(cls: type, fields: Mapping[str, Any] | None, node: str) -> Any:
    """A (nested) config dataclass from plain values, naming unknown keys with the valid ones."""
    fields = dict(fields or {})
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        where = f"{node} " if node else ""
        raise ConfigError(
            f"unknown {where}key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    for name, value in fields.items():
        part = config_class(hints[name])
        if part is not None and isinstance(value, Mapping):
            fields[name] = build(part, value, f"{node}.{name}" if node else name)
    return cls(**fields)


def config_class(hint: Any) -> type | None:
    """The dataclass a field holds (also inside `X | None`), or None for a plain value."""
    options = typing.get_args(hint) or (hint,)
    for option in options:
        if dataclasses.is_dataclass(option):
            return option
    return None
