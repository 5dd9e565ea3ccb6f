"""A trained run directory as the analyses read it: its configuration, data and checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnet_flax.analysis.layer_stats import AnalysisError, load_run_config
from resnet_flax.data import augment as aug
from resnet_flax.data.config import DataConfig
from resnet_flax.data.memory import Dataset, load_dataset
from resnet_flax.models.spec import ModelSpec
from resnet_flax.rundir import CHECKPOINT_DIR, read_summary
from resnet_flax.training.checkpoints import Checkpointer, abstract_like
from resnet_flax.training.config import TrainerConfig
from resnet_flax.training.optim import OptimConfig, make_optimizer
from resnet_flax.training.state import initial_state


@dataclass(frozen=True)
class RunParts:
    """What a run directory says about itself: the net, data, recipe and seed it trained with."""

    run_dir: Path
    spec: ModelSpec
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig
    seed: int
    summary: dict

    @property
    def name(self) -> str:
        """A label such as 'plain-56 seed 0'."""
        return f"{self.spec.model}-{self.spec.depth} seed {self.seed}"


def read_run(run_dir: str | Path) -> RunParts:
    """The run's parts (AnalysisError when run_dir holds no run_config.json); reads no data."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)  # the one reader of run_config.json
    return RunParts(
        run_dir=run_dir,
        spec=cfg.model,
        data=cfg.dataset,
        optim=cfg.optim,
        trainer=cfg.trainer,
        seed=cfg.info.seed,
        summary=read_summary(run_dir),
    )


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The iterations that have a checkpoint, oldest first (none: [], nothing created)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    checkpointer = Checkpointer(directory)
    steps = sorted(checkpointer.steps())
    checkpointer.close()
    return steps


def require_checkpoints(run: RunParts, at_least: int) -> list[int]:
    """The run's checkpoint steps; an AnalysisError naming the fix when it kept fewer."""
    steps = checkpoint_steps(run.run_dir)
    if len(steps) < at_least:
        kept = ", ".join(map(str, steps)) or "none"
        raise AnalysisError(
            f"{run.run_dir} kept {len(steps)} checkpoint(s) (iterations {kept}); the trajectory "
            f"needs at least {at_least}: train it with trainer.checkpoint_every set to a fraction "
            "of trainer.iterations and trainer.keep_checkpoints at least that many "
            "(experiment=why does)"
        )
    return steps


def require_step(run: RunParts, step: int | None) -> int:
    """The checkpoint step to use (None: the newest); an AnalysisError when it is not kept."""
    steps = checkpoint_steps(run.run_dir)
    if not steps:
        raise AnalysisError(f"{run.run_dir} has no checkpoint; train it first")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise AnalysisError(
            f"{run.run_dir} has no checkpoint at iteration {step}; it kept "
            f"{', '.join(map(str, steps))}"
        )
    return step


def load_data(run: RunParts) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """The run's in-memory dataset and its normalisation (mean, std) images."""
    data = load_dataset(run.data)
    mean, std = aug.normalization_stats(data.x_train, run.data.normalization)
    return data, mean, std


def completed_spec(run: RunParts, data: Dataset) -> ModelSpec:
    """The run's spec with the dataset's classes and channels (as training completed it)."""
    return dataclasses.replace(
        run.spec, num_classes=data.num_classes, in_channels=data.image_shape[-1]
    )


class RunStates:
    """The initial state (drawn from the run's seed) and any kept checkpoint of one run."""

    def __init__(self, run: RunParts, data: Dataset):
        spec = completed_spec(run, data)
        tx = make_optimizer(run.optim)
        self.graphdef, self.initial = initial_state(spec, run.seed, tx, len(data.x_train))
        self.run_dir = run.run_dir

    def restore(self, step: int) -> dict:
        """The state saved at `step` (AnalysisError when it cannot be read)."""
        checkpointer = Checkpointer(self.run_dir / CHECKPOINT_DIR)
        state = checkpointer.restore(step, abstract_like(self.initial))
        checkpointer.close()
        if state is None:
            raise AnalysisError(
                f"{self.run_dir}: the checkpoint at iteration {step} cannot be read"
            )
        return state
