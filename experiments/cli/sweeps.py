"""The sweeps the study commands run through experiments.train (a leaf: no entry point)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

DEMO_EXPERIMENT = "digits_degradation"  # the preset `make demo` sweeps


def train_sweep_command(experiment: str, sweep_dir: Path, overrides: Sequence[str]) -> list[str]:
    """`python -m experiments.train -m experiment=<preset>` into sweep_dir, with overrides."""
    return [
        sys.executable, "-m", "experiments.train", "-m", f"experiment={experiment}",
        f"hydra.sweep.dir={sweep_dir}", *overrides,
    ]  # fmt: skip


def demo_sweep_command(sweep_dir: Path, overrides: Sequence[str]) -> list[str]:
    """`make demo`'s sweep (without the plots) into sweep_dir, as experiments.demo runs it."""
    return train_sweep_command(DEMO_EXPERIMENT, sweep_dir, overrides)


def new_sweep_dir(experiment: str) -> Path:
    """A fresh results/sweeps/<experiment>/<time> directory name."""
    return Path("results", "sweeps", experiment, datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


def run_sweep(command: list[str], sweep_dir: Path) -> bool:
    """Run a sweep command, echoing it; whether it succeeded (else one error line)."""
    print("$", " ".join(command[1:]), flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        print(f"error: the sweep failed; see the logs under {sweep_dir}", file=sys.stderr)
        return False
    return True
