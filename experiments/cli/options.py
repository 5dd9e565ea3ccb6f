"""Command-line options generated from a frozen config dataclass: each key declared once."""

from __future__ import annotations

import argparse
import dataclasses

# The annotation strings of the config fields the commands expose, and how to parse them.
PARSERS = {"int": int, "float": float, "int | None": int, "str": str}


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """An option --<field-name> per field of `cls`, typed and defaulted as the field is."""
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            help_text = f"{cls.__name__}.{field.name} (default: %(default)s)"
            parser.add_argument(
                flag, type=PARSERS[field.type], default=field.default, help=help_text
            )


def config_from_options(cls: type, args: argparse.Namespace):
    """The `cls` instance the parsed options describe."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def one_line(err: Exception) -> str:
    """An error as one line: its message's first line, and Hydra's options where it lists them."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    options = getattr(err, "options", None)
    return f"{text}; available: {', '.join(options)}" if options else text
