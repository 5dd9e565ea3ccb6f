"""The documented commands as a newcomer meets them: --help, --info, a missing extra."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments.cli.model_config import model_spec
from experiments.cli.preflight import problems
from experiments.cli.resume import resume_command
from experiments.cli.train_config import run_config
from resnet_flax.data.config import DATASETS, STREAMED

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
ARGPARSE_COMMANDS = ("demo", "plot", "analyze", "construction")


def command(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m <args>`` (or ``python -c code args``) from the repository root, finished."""
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def examples(text: str, module: str) -> list[list[str]]:
    """The arguments of each ``python -m <module> ...`` line below a help text's "Examples:"."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().lower() == "examples:")
    found = [line.split("#")[0].strip() for line in lines[start + 1 :]]
    return [shlex.split(line)[3:] for line in found if line.split()[:3] == ["python", "-m", module]]


def group_options(text: str, group: str) -> list[str]:
    """The options a help text lists on its ``group: a, b, c`` line."""
    match = re.search(rf"^{re.escape(group)}: (.*)$", text, re.MULTILINE)
    assert match, f"no {group} line in:\n{text}"
    return [option.strip() for option in match.group(1).split(",")]


@pytest.fixture(scope="module")
def train_help() -> str:
    proc = command("experiments.train", "--help")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return proc.stdout


def test_train_help_says_what_it_does_and_offers_only_choosable_options(train_help):
    # Fails on Hydra's generic help ("train is powered by Hydra" and a config dump), or when
    # a dataset's base config is offered as a dataset (choosing it fails with '???').
    assert train_help.startswith("python -m experiments.train [-m] [key=value ...]\n\nTrains one")
    assert "powered by Hydra" not in train_help and "bn_momentum:" not in train_help
    assert sorted(group_options(train_help, "dataset")) == sorted(DATASETS + tuple(STREAMED))
    presets = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    assert group_options(train_help, "experiment") == presets
    for group in ("optim", "trainer"):
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert group_options(train_help, group) == options
    launchers = [o.split(" ")[0] for o in group_options(train_help, "hydra/launcher")]
    local = {p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")}
    assert local <= set(launchers) and "basic" in launchers
    assert "docs/usage.md" in train_help and "hydra.run.dir=" in train_help


def test_train_help_examples_are_valid_commands(train_help):
    # Fails when an example names a key, option or value that the command refuses.
    found = examples(train_help, "experiments.train")
    assert len(found) == 3
    for args in found:
        assert problems(args, "config", run_config) == [], args


def test_model_info_help_lists_its_keys_not_the_training_groups():
    # Fails on Hydra's generic help, which lists dataset/optim/trainer groups that
    # model_info then refuses ("Could not override"), or on an example it cannot run.
    proc = command("experiments.model_info", "--help")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    text = proc.stdout
    assert text.startswith("python -m experiments.model_info [key=value ...]\n\nPrints")
    for group in ("dataset:", "optim:", "trainer:", "experiment:", "hydra/launcher"):
        assert group not in text
    assert "num_classes=1000" in text and "docs/usage.md" in text
    found = examples(text, "experiments.model_info")
    assert len(found) == 3
    for args in found:
        assert problems(args, "model_info", model_spec) == [], args


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_argparse_commands_describe_themselves_with_examples(name):
    # Fails when a command's --help has no description, no examples, or none of its own.
    proc = command(f"experiments.{name}", "--help")
    assert proc.returncode == 0, proc.stderr
    usage, description = proc.stdout.split("\n\n")[:2]
    assert usage.startswith(f"usage: python -m experiments.{name}")
    assert len(description.split()) >= 10, description
    assert len(examples(proc.stdout, f"experiments.{name}")) >= 3
    assert "docs/usage.md" in proc.stdout


def test_info_prints_each_line_once():
    # Fails when a library's import adds a root log handler (absl calls logging.basicConfig
    # while Orbax imports): --info then prints every line again on stderr as DEBUG:hydra...
    proc = command("experiments.train", "--info")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert (proc.stdout + proc.stderr).count("Installed Hydra Plugins") == 1


# A Python without TensorFlow and TFDS (a None entry in sys.modules: `import` finds no module).
WITHOUT_TFDS = """
import runpy, sys

sys.modules.update(tensorflow=None, tensorflow_datasets=None)
sys.argv = ["generated", *sys.argv[1:]]
runpy.run_module("resnet_flax.data.generated", run_name="__main__")
"""


def test_generated_imagenette_without_the_extra_says_how_to_install_it(tmp_path):
    # Fails when the command ends in a ModuleNotFoundError traceback.
    proc = command("--data-dir", str(tmp_path), code=WITHOUT_TFDS)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert ".venv/bin/pip install -e '.[tfds]'" in proc.stderr
    assert not any(tmp_path.iterdir())


def hydra_node(mode: RunMode, task: list[str], hydra: list[str]) -> DictConfig:
    """The parts of HydraConfig that resume_command reads."""
    return OmegaConf.create(
        {
            "mode": mode,
            "sweep": {"dir": "/sweeps/s"},
            "runtime": {"output_dir": "/runs/r"},
            "overrides": {"task": task, "hydra": hydra},
        }
    )


def test_resume_command_names_the_directory_the_job_wrote():
    # Fails when the printed command keeps a directory it was given (or none: a timestamped
    # default starts afresh), or drops the launcher or the sweep flag of a worker's job.
    entry = str(ROOT / "experiments" / "train.py")
    run = hydra_node(RunMode.RUN, ["depth=8"], ["hydra.run.dir=/old", "hydra.mode=RUN"])
    args = shlex.split(resume_command(run, [entry, "depth=8", "hydra.run.dir=/old"]))
    assert args[1:] == ["-m", "experiments.train", "depth=8", "hydra.run.dir=/runs/r"]
    hydra = ["hydra/launcher=slurm", "hydra.mode=MULTIRUN", "hydra.sweep.dir=/old"]
    job = hydra_node(RunMode.MULTIRUN, ["depth=8", "model=plain"], hydra)
    args = shlex.split(resume_command(job, ["-m", "submitit.core._submit", "/tmp/x"]))
    assert args[1:] == [
        "-m", "experiments.train", "-m", "depth=8", "model=plain", "hydra/launcher=slurm",
        "hydra.sweep.dir=/sweeps/s",
    ]  # fmt: skip
