"""Hydra schemas generated from the library's config dataclasses (each key declared once).

Hydra checks every YAML file and command-line override against these structured configs, so
a misspelt or unknown key fails at composition, and the YAML tree sets values without
restating defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import MISSING, field, make_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]  # the repository


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


def plain(cfg: DictConfig) -> dict:
    """The resolved config as plain values, without Hydra's own node."""
    keys = [key for key in cfg if key != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)


def compose_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """The composed config of an entry point with `overrides`, Hydra's own node included."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name, overrides, return_hydra_config=True)
