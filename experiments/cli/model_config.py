"""experiments.model_info's config: every ModelSpec key and the input size."""

from __future__ import annotations

import typing
from dataclasses import field, make_dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from experiments.cli.schema import command_fields, plain, schema_entry
from resnet_flax.models.spec import ModelSpec, SpecError


def model_info_schema() -> type:
    """The root schema of experiments.model_info: every ModelSpec key and the input size."""
    hints = typing.get_type_hints(ModelSpec)
    entries = [schema_entry(f, hints[f.name]) for f in command_fields(ModelSpec, True)]
    entries.append(("input_size", Optional[int], field(default=None)))  # noqa: UP045
    return make_dataclass("ModelInfoSchema", entries)


def model_spec(cfg: DictConfig) -> tuple[ModelSpec, int | None]:
    """(ModelSpec, input size) of a composed experiments.model_info config."""
    values = plain(cfg)
    input_size = values.pop("input_size")
    valid = [f.name for f in command_fields(ModelSpec, True)]
    unknown = sorted(set(values) - set(valid))  # added with +key, which the schema cannot stop
    if unknown:
        valid_keys = ", ".join(sorted([*valid, "input_size"]))
        raise SpecError(f"unknown key(s) {', '.join(unknown)}; valid: {valid_keys}")
    return ModelSpec(**values), input_size


ConfigStore.instance().store(name="model_info_schema", node=model_info_schema())
