"""Which run a directory holds: compare what a command asks for with its run_config.json.

A run directory holds one run. A command may continue it (more iterations, other logging
intervals), change its recipe only when it says so (recorded, dated, in recipe_changes.jsonl),
and never change what identifies it: the network, the data, what an iteration means.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from resnet_flax.rundir.owner import own
from resnet_flax.rundir.records import (
    RECIPE_CHANGES_FILE,
    RUN_CONFIG_FILE,
    SEED_GROUP_MARKER,
    RunDirError,
    read_json,
    read_metrics,
    seed_run_dirs,
)

log = logging.getLogger(__name__)


class Role(StrEnum):
    """What changing a configuration key does to the run a directory holds."""

    IDENTITY = "identity"  # another network, other data, or another meaning of an iteration
    RECIPE = "recipe"  # how the same network trains on: allowed with allow_recipe_change
    CONTINUE = "continue"  # how long and how visibly it trains: always allowed


IDN, REC, CON = Role.IDENTITY, Role.RECIPE, Role.CONTINUE

# Every key of run_config.json and its role (a key missing here identifies the run).
ROLES: dict[str, dict[str, Role]] = {
    "model": {
        "model": IDN, "depth": IDN, "family": IDN, "shortcut": IDN, "block": IDN,
        "num_classes": IDN, "in_channels": IDN, "zero_init_residual": IDN, "precision": IDN,
        "bn_momentum": IDN, "bn_epsilon": IDN, "bn_batch": IDN, "bottleneck_stride": IDN,
        "strided_padding": IDN, "preact_first_shortcut": IDN, "norm": IDN, "activation": IDN,
        "leaky_relu_slope": IDN, "tat_target": IDN, "init": IDN, "sigma_w2": IDN,
        "sigma_b2": IDN, "branch": IDN,
        # how the same network is computed: the same parameters, the same numbers
        "remat": CON, "conv_impl": CON, "stage_loop": CON,
    },
    "dataset": {
        "name": IDN, "path": IDN, "num_classes": IDN, "validation_size": IDN,
        "normalization": IDN, "stream.image_size": IDN, "stream.tfds_config": IDN,
        "crop_padding": REC, "flip": REC, "stream.augmentation": REC,
        "data_dir": CON, "download": CON, "stream.shuffle_buffer": CON,
        "stream.num_parallel_calls": CON, "stream.prefetch": CON, "stream.cache": CON,
    },
    "optim": {
        "lr": REC, "momentum": REC, "nesterov": REC, "weight_decay": REC, "decay_all": REC,
        "schedule": REC, "boundaries": REC, "decay_factor": REC,
        "linear_warmup_iterations": REC, "warmup_lr": REC, "warmup_until_error": REC,
        "warmup_iterations": REC,
    },
    "trainer": {
        "batch_size": IDN, "vmap_seeds": IDN,
        "iterations": CON, "log_every": CON, "eval_every": CON, "checkpoint_every": CON,
        "keep_checkpoints": CON, "eval_batch_size": CON, "progress": CON, "step_loop": CON,
        "xla_cpu_preset": CON, "device_prefetch": CON, "allow_recipe_change": CON,
    },
    "info": {
        "seed": IDN, "init_from": IDN, "experiment_name": CON, "cpu_devices": CON,
        "compilation_cache_dir": CON, "results_dir": CON,
    },
}  # fmt: skip
# run_config.json written before the configuration refactor names the data section "data".
SECTION_NAMES = {"data": "dataset"}
# The command-line name of a key where it is not <section>.<key>.
COMMAND_KEYS = {
    **{f"model.{k}": k for k in ROLES["model"]},
    **{f"info.{k}": k for k in ROLES["info"]},
    "dataset.name": "dataset",
}
# Schedules whose shape depends on trainer.iterations: extending the run changes them.
LENGTH_DEPENDENT_SCHEDULES = ("cosine",)


def config_dict(**sections: object) -> dict:
    """A run_config dict from its sections' dataclasses (model=..., data=..., ...)."""
    return {name: dataclasses.asdict(part) for name, part in sections.items()}


def completed_iterations(summary: dict) -> int:
    """The iterations a run's summary (or the fewest of a seed group's) says it completed."""
    runs = summary.get("runs") or [summary]
    return min(int(run.get("iterations") or 0) for run in runs)


def flatten(config: dict) -> dict[str, object]:
    """{'section.key': value} of a run_config dict, nested nodes dotted, values as JSON."""
    out = {}
    for section, values in config.items():
        section = SECTION_NAMES.get(section, section)
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, dict):
                out.update({f"{section}.{key}.{k}": v for k, v in value.items()})
            else:
                out[f"{section}.{key}"] = value
    return json.loads(json.dumps(out))  # tuples become lists, as in the file


def role(dotted: str) -> Role:
    """The role of a flattened key (an unknown key identifies the run)."""
    section, _, key = dotted.partition(".")
    return ROLES.get(SECTION_NAMES.get(section, section), {}).get(key, Role.IDENTITY)


def command_key(dotted: str) -> str:
    """How the command line spells a flattened key."""
    return COMMAND_KEYS.get(dotted, dotted)


@dataclass
class Change:
    """One key whose requested value differs from the run's."""

    key: str
    old: object
    new: object
    role: Role
    why: str = ""

    def __str__(self) -> str:
        text = f"{command_key(self.key)}={_show(self.old)} -> {_show(self.new)}"
        return f"{text} ({self.why})" if self.why else text


def _show(value: object) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, list) else str(value)


def differences(old: dict, new: dict) -> list[Change]:
    """The keys present in both configurations whose values differ, with their roles.

    A key only one side has is a field added or removed since the run started: ignored.
    """
    before, after = flatten(old), flatten(new)
    changes = [
        Change(key, before[key], after[key], role(key))
        for key in sorted(before.keys() & after.keys())
        if before[key] != after[key]
    ]
    return changes + _stretched_schedule(before, after)


def _stretched_schedule(before: dict, after: dict) -> list[Change]:
    """A length-dependent schedule whose run is extended or shortened: a recipe change."""
    schedule = after.get("optim.schedule")
    old_n, new_n = before.get("trainer.iterations"), after.get("trainer.iterations")
    if schedule not in LENGTH_DEPENDENT_SCHEDULES or old_n is None or old_n == new_n:
        return []
    why = (
        f"optim.schedule={schedule} spans trainer.iterations, so the learning rate of every "
        f"iteration not yet trained follows the {new_n}-iteration {schedule} from here: the "
        f"iterations trained so far followed the {old_n}-iteration one"
    )
    return [Change("optim.schedule_length", old_n, new_n, Role.RECIPE, why)]


def effective_config(run_dir: Path) -> dict:
    """The run's configuration: run_config.json with its recorded recipe changes applied."""
    config = read_json(run_dir / RUN_CONFIG_FILE)
    for record in read_metrics(run_dir / RECIPE_CHANGES_FILE):
        for dotted, (_, new) in record.get("changes", {}).items():
            _set(config, dotted, new)
    return config


def _set(config: dict, dotted: str, value: object) -> None:
    """Set a flattened key's value in a run_config dict where that key exists."""
    section, *path = dotted.split(".")
    node = next((v for s, v in config.items() if SECTION_NAMES.get(s, s) == section), None)
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and path and path[-1] in node:
        node[path[-1]] = value


@dataclass
class Claim:
    """A run directory this process owns, and how the command's configuration relates to it."""

    run_dirs: list[Path]
    requested: dict
    recipe_changes: list[Change] = field(default_factory=list)
    previous: dict = field(default_factory=dict)

    def record(self, start: int, write: bool = True) -> dict:
        """The run_config to write for a run resumed at `start`; dates its recipe changes.

        A run that resumes keeps its recorded configuration for the keys that identify it
        and its recipe (recipe changes go to recipe_changes.jsonl); a run that restarts
        from iteration 0 is a new run with the requested configuration.
        """
        if start == 0 or not self.previous:
            for run_dir in self.run_dirs if write else []:  # a new run: no recipe history
                (run_dir / RECIPE_CHANGES_FILE).unlink(missing_ok=True)
            return self.requested
        if self.recipe_changes and write:
            line = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "from_iteration": start,
                "changes": {c.key: [c.old, c.new] for c in self.recipe_changes},
            }
            for run_dir in self.run_dirs:
                with (run_dir / RECIPE_CHANGES_FILE).open("a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
        recorded = {}
        for section, values in self.requested.items():
            # Under the requested section's name, whatever the run's file called it.
            canonical = SECTION_NAMES.get(section, section)
            name = next((s for s in self.previous if SECTION_NAMES.get(s, s) == canonical), None)
            kept = self.previous.get(name) if name else None
            if isinstance(values, dict) and section != "info":
                recorded[section] = _continued(section, kept or {}, values)
            else:
                recorded[section] = values if kept is None else kept
        return recorded


def _continued(prefix: str, kept: dict, asked: dict) -> dict:
    """A section as a resumed run records it: the asked values of the continuing keys, the
    run's own values of the others (nested nodes key by key)."""
    out = {}
    for key, value in asked.items():
        dotted, old = f"{prefix}.{key}", kept.get(key, value)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = _continued(dotted, old, value)
        else:
            out[key] = value if role(dotted) == Role.CONTINUE else old
    return out


def group_dirs(run_dir: Path, requested: dict) -> list[Path]:
    """Where the requested run's seeds write (run_dir itself for one seed)."""
    first = int(requested.get("info", {}).get("seed", 0))
    count = int(requested.get("trainer", {}).get("vmap_seeds", 1))
    return seed_run_dirs(Path(run_dir), [first + k for k in range(count)])


def check_run_dir(
    run_dir: Path, requested: dict, allow_recipe_change: bool = False, derived: tuple = ()
) -> Claim:
    """Check that the command continues the run in run_dir (RunDirMismatch if it does not).

    `requested` is the run_config the command would write (its "info" names the first
    seed). `derived`: keys whose requested value is not known yet (taken from the data
    later): not compared.
    """
    run_dir = Path(run_dir)
    seed_dirs = group_dirs(run_dir, requested)
    _check_layout(run_dir, seed_dirs)
    claim = Claim(seed_dirs, requested)
    first_seed = int(requested.get("info", {}).get("seed", 0))
    for k, seed_dir in enumerate(seed_dirs):
        previous = effective_config(seed_dir)
        if not previous:
            continue
        asked = {**requested, "info": {**requested.get("info", {}), "seed": first_seed + k}}
        changes = [c for c in differences(previous, asked) if c.key not in derived]
        _refuse(seed_dir, [c for c in changes if c.role == Role.IDENTITY])
        recipe = [c for c in changes if c.role == Role.RECIPE]
        if recipe and not allow_recipe_change:
            raise RunDirMismatch(recipe_message(seed_dir, recipe))
        if k == 0:  # the file as the run started it: recipe changes stay in their own record
            claim.previous = read_json(seed_dir / RUN_CONFIG_FILE)
            claim.recipe_changes = recipe
    return claim


# Keys a command's configuration fills in only once the data is loaded.
DATA_DERIVED = ("model.num_classes", "model.in_channels", "trainer.eval_batch_size")


def claim_run_dir(
    run_dir: Path, requested: dict, allow_recipe_change: bool = False, lock: bool = True
) -> Claim:
    """Own run_dir (and its seeds' directories) and check that the command continues its run.

    Raises RunDirBusy when another process trains there, and RunDirMismatch (one line: the
    old and new values and what to do) when the command asks for another run, or for
    another recipe without `allow_recipe_change`. `lock`: False in the processes of a
    multi-host job that do not write (the writing process owns the directory).
    """
    run_dir = Path(run_dir)
    if lock:
        for path in dict.fromkeys([run_dir, *group_dirs(run_dir, requested)]):
            own(path)
    claim = check_run_dir(run_dir, requested, allow_recipe_change)
    for change in claim.recipe_changes:
        log.warning("%s: recipe change %s, recorded in %s", run_dir, change, RECIPE_CHANGES_FILE)
    return claim


class RunDirMismatch(RunDirError):
    """The command asks for another run than the one its run directory holds."""


def _refuse(run_dir: Path, changes: list[Change]) -> None:
    """Raise RunDirMismatch naming every identifying change."""
    if not changes:
        return
    listed = "; ".join(str(c) for c in changes)
    raise RunDirMismatch(
        f"{run_dir} holds another run ({listed}): these define the network, the data or an "
        "iteration, so its checkpoints cannot continue under them; train into another "
        "hydra.run.dir, or rerun with the run's own values (its run_config.json)"
    )


def recipe_message(run_dir: Path, changes: list[Change]) -> str:
    """One line: the recipe changes a command asks for, and how to allow or avoid them."""
    listed = "; ".join(str(c) for c in changes)
    return (
        f"{run_dir} was trained with another recipe ({listed}): to change it from the "
        "resumed iteration on, add trainer.allow_recipe_change=true (the change is recorded, "
        f"dated, in {RECIPE_CHANGES_FILE}); to start a new run, train into another "
        "hydra.run.dir"
    )


def _check_layout(run_dir: Path, seed_dirs: list[Path]) -> None:
    """A seed group's directory holds a group, a single run's directory holds one run."""
    grouped = [Path(d) for d in seed_dirs] != [run_dir]
    marker = read_json(run_dir / SEED_GROUP_MARKER)
    if grouped and (run_dir / RUN_CONFIG_FILE).is_file():
        raise RunDirMismatch(
            f"{run_dir} holds one seed's run (trainer.vmap_seeds=1); this command asks for "
            f"trainer.vmap_seeds={len(seed_dirs)}: train into another hydra.run.dir"
        )
    if not grouped and marker:
        raise RunDirMismatch(
            f"{run_dir} holds a group of seeds {marker.get('seeds')} "
            f"(trainer.vmap_seeds={len(marker.get('seeds', []))}); this command asks for "
            "trainer.vmap_seeds=1: train into another hydra.run.dir"
        )
