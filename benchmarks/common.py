"""What every benchmark shares: usage errors, the results folder, provenance, PyTorch's presence.

A leaf: it imports no other module of benchmarks/, so any entry point may import it.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path

from resnet_flax.rundir import git_commit, library_versions

RESULTS = Path("results") / "benchmarks"


class UsageError(Exception):
    """A request that cannot run: the entry point prints it as one error line and exits 2."""


def exit_code(run: Callable[[], int]) -> int:
    """run()'s exit code; a UsageError becomes one `error: ...` line and 2."""
    try:
        return run()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def torch_available() -> bool:
    """Whether PyTorch can be imported here."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def require_torch(what: str) -> None:
    """UsageError unless PyTorch is installed."""
    if not torch_available():
        raise UsageError(f"{what} needs PyTorch (pip install torch==2.13.0)")


def parser(entry_point: str, doc: str) -> argparse.ArgumentParser:
    """An entry point's argument parser: its `python -m` name, its docstring's first line."""
    return argparse.ArgumentParser(prog=f"python -m {entry_point}", description=doc.split("\n")[0])


def add_output_args(parser: argparse.ArgumentParser, default_name: str) -> None:
    """--out and --name: where the JSON and Markdown results go."""
    parser.add_argument("--out", default=None, help=f"default: {RESULTS}/<device>/")
    parser.add_argument("--name", default=None, help=f"file stem; default: {default_name}")


def device_label() -> str:
    """A folder name for this device, e.g. 'cpu-2cores' or 'nvidia-h100-80gb-hbm3'."""
    import jax

    kind = jax.devices()[0].device_kind
    if jax.default_backend() == "cpu":
        kind = f"cpu-{os.cpu_count()}cores"
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def results_dir(out: str | None) -> Path:
    """--out, or results/benchmarks/<this device>/."""
    return Path(out) if out else RESULTS / device_label()


def provenance(entry_point: str, argv: list[str] | None) -> dict:
    """The command, commit, library versions, machine and cores a result comes from."""
    words = argv if argv is not None else sys.argv[1:]
    return {
        "command": " ".join(["python -m", entry_point, *words]),
        "git_commit": git_commit(),
        "versions": library_versions(),
        "machine": platform.platform(),
        "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
