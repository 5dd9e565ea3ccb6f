"""The demo's sweep command, shared by experiments.demo and the demo-vs-PyTorch benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

EXPERIMENT = "digits_degradation"


def demo_sweep_command(sweep_dir: Path, overrides: list[str]) -> list[str]:
    """`make demo`'s sweep (without the plots) into sweep_dir, with extra Hydra overrides."""
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "-m",
        f"experiment={EXPERIMENT}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
