"""The command that resumes a stopped run: the one that started it, pointed at its directory.

The default run and sweep directories are named by the time, so rerunning the same command
would start afresh in a new directory; the resume command names the directory it wrote.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.types import RunMode
from omegaconf import DictConfig

from experiments.cli.schema import ROOT

ENTRY_POINT = ROOT / "experiments" / "train.py"


def resume_command(hc: DictConfig, argv: Sequence[str] | None = None) -> str:
    """The shell command that resumes the job of HydraConfig `hc` in the directory it wrote.

    Where argv is the user's command line (argv[0] is experiments/train.py: the process the
    user started, or a joblib worker, which inherits it) it is that command, so a sweep resumes
    every job (completed ones are skipped); elsewhere (a submitit job) it is the job's own
    overrides, into the same sweep directory.
    """
    argv = list(sys.argv if argv is None else argv)
    multirun = hc.mode == RunMode.MULTIRUN
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    directory = Path(hc.sweep.dir if multirun else hc.runtime.output_dir).absolute()
    if argv and Path(argv[0]).resolve() == ENTRY_POINT:
        args = argv[1:]
    else:
        given = [o for o in hc.overrides.hydra if not o.startswith("hydra.mode=")]
        args = (["-m"] if multirun else []) + list(hc.overrides.task) + given
    args = [a for a in args if not a.startswith(f"{key}=")] + [f"{key}={directory}"]
    return shlex.join([python(), "-m", "experiments.train", *args])


def python() -> str:
    """This interpreter as the user would type it: relative to the working directory if inside."""
    executable = Path(sys.executable)
    try:
        return str(executable.relative_to(Path.cwd()))
    except ValueError:
        return str(executable)
