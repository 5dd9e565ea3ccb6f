"""The seed axis of a program: one seed as is, or k seeds stacked and vmapped, one interface."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from resnet_flax.rundir import SEED_GROUP_MARKER, RunStatus, write_json
from resnet_flax.training.state import SEED_AXES, seed_state, stack_seeds


class OneSeed:
    """One seed: the program's state is the seed's state; nothing is vmapped."""

    def __init__(self, seeds: list[int]):
        self.seeds = seeds

    def stack(self, states: list[dict]) -> dict:
        """The program's state from per-seed states."""
        return states[0]

    def unstack(self, state: dict) -> list[dict]:
        """Per-seed states of the program's state."""
        return [state]

    def vmap_step(self, step: Callable) -> Callable:
        """The step as the program runs it."""
        return step

    def vmap_eval(self, evaluate: Callable) -> Callable:
        """eval_sums as the program runs it."""
        return evaluate

    def per_seed(self, value) -> list[np.ndarray]:
        """A metric or evaluation result as one value per seed."""
        return [np.asarray(value)]

    def run_dirs(self, run_dir: Path) -> list[Path]:
        """Where each seed writes: the run directory itself."""
        return [Path(run_dir)]

    def mark(self, run_dir: Path) -> None:
        """Nothing marks a single run."""

    def result(self, summaries: list[dict]) -> dict:
        """The job's summary: the run's own."""
        return summaries[0]


class StackedSeeds(OneSeed):
    """k > 1 seeds as one vmapped program, each into run_dir/seed_<s>."""

    def stack(self, states: list[dict]) -> dict:
        """The program's state from per-seed states."""
        return stack_seeds(states)

    def unstack(self, state: dict) -> list[dict]:
        """Per-seed states of the program's state."""
        return [seed_state(state, k) for k in range(len(self.seeds))]

    def vmap_step(self, step: Callable) -> Callable:
        """The step over every seed at once: data and hyperparameters shared, the rest per seed."""
        # The step count is shared, so the epoch-start cond stays a cond (not a select); the
        # seeds of a group share one config, so its hyperparameters too.
        return jax.vmap(step, in_axes=(SEED_AXES, None, None), out_axes=(SEED_AXES, 0))

    def vmap_eval(self, evaluate: Callable) -> Callable:
        """eval_sums over every seed's parameters and statistics, the batch shared."""
        return jax.vmap(evaluate, in_axes=(0, 0) + (None,) * 5)

    def per_seed(self, value) -> list[np.ndarray]:
        """A metric or evaluation result split into one value per seed (seed axis last)."""
        value = np.asarray(value)
        return [value[..., k] for k in range(len(self.seeds))]

    def run_dirs(self, run_dir: Path) -> list[Path]:
        """Where each seed writes: run_dir/seed_<s>."""
        return [Path(run_dir) / f"seed_{s}" for s in self.seeds]

    def mark(self, run_dir: Path) -> None:
        """Write the marker that makes run_dir a seed group, not a run."""
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = {"seeds": self.seeds, "run_dirs": [d.name for d in self.run_dirs(run_dir)]}
        write_json(run_dir / SEED_GROUP_MARKER, marker)

    def result(self, summaries: list[dict]) -> dict:
        """The job's summary: every seed's, completed only when all are."""
        done = all(s["status"] == RunStatus.COMPLETED for s in summaries)
        status = RunStatus.COMPLETED if done else RunStatus.DIVERGED
        return {"status": status, "seeds": self.seeds, "runs": summaries}


def seed_axis(first_seed: int, count: int) -> OneSeed:
    """The seeds first_seed .. first_seed+count-1 as the program holds them."""
    seeds = [first_seed + k for k in range(count)]
    return StackedSeeds(seeds) if count > 1 else OneSeed(seeds)
