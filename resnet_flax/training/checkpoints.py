"""Orbax checkpoints of the training state; resume from the newest one that restores."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

# absl, logging while Orbax imports, adds a stderr handler to the root logger when it has none
# (logging.basicConfig): the application's own log config would then print every line twice.
_ROOT_HANDLERS = set(logging.root.handlers)
import orbax.checkpoint as ocp  # noqa: E402

for _handler in set(logging.root.handlers) - _ROOT_HANDLERS:
    logging.root.removeHandler(_handler)

from resnet_flax.rundir import RunDirError, write_failure  # noqa: E402

log = logging.getLogger(__name__)

# How Orbax names the directory of a save that has not finished (<step>.orbax-checkpoint-tmp-*).
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"


def _orbax_echo(args) -> bool:
    """Whether an unraisable exception only echoes an Orbax operation that already failed
    (and was reported): a callback into Orbax's closed event loop after a failed save, or a
    read coroutine of a failed restore collected unawaited."""
    if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
        return True
    code = getattr(args.object, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


def _quiet_unraisable(previous):
    """An unraisable-exception hook that drops Orbax's echoes and passes on the rest."""

    def hook(args) -> None:
        if not _orbax_echo(args):
            previous(args)

    hook.quiets_orbax = True
    return hook


class _WriteFailureEcho(logging.Filter):
    """Orbax's own log of a write that failed on a full or read-only disk: the exception it
    raises says it once, so its log lines (with a traceback each) are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return write_failure(exc) is None and write_failure(Exception(record.getMessage())) is None


def quiet_orbax_echoes() -> None:
    """Install (once per process) the filters of Orbax's echoes of failures it reported."""
    if not getattr(sys.unraisablehook, "quiets_orbax", False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _WriteFailureEcho) for f in absl.filters):
        absl.addFilter(_WriteFailureEcho())


class CheckpointMismatch(RunDirError):
    """A readable checkpoint of another training state (another network or dataset)."""


class Checkpointer:
    """Saves the state every few iterations and restores the newest complete checkpoint."""

    def __init__(self, directory: Path, keep: int = 3):
        quiet_orbax_echoes()
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers=ocp.StandardCheckpointHandler(),  # reads each step's tree metadata
        )

    def save(self, step: int, state) -> None:
        """Write the state at this step (asynchronously; finished before the next save)."""
        if not self.manager.save(step, args=ocp.args.StandardSave(state)):
            # Orbax skips a step at or below its newest: the newest would be an older state.
            raise RuntimeError(
                f"checkpoint {self.directory}/{step} not written: Orbax already holds step "
                f"{self.manager.latest_step()}, so resuming would not see this state"
            )

    def steps(self) -> list[int]:
        """The iterations that have a checkpoint, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def restore(self, step: int, abstract_state) -> object | None:
        """The state saved at `step`, or None (with a warning) when it cannot be read.

        Raises CheckpointMismatch when the checkpoint reads but holds another state: that
        is not corruption, and the checkpoint is left where it is.
        """
        mismatch = self.mismatch(step, abstract_state)
        if mismatch:
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} holds another training state than this "
                f"command builds ({mismatch}): the run directory belongs to another "
                "configuration; train into another hydra.run.dir"
            )
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as err:  # any failure to read means this checkpoint is unusable
            log.warning(
                "checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                self.directory,
                step,
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
            )
            return None

    def mismatch(self, step: int, abstract_state) -> str | None:
        """How the tree saved at `step` differs from `abstract_state`; None if it does not,
        or if its metadata cannot be read (then the restore tells).
        """
        try:
            saved = leaf_shapes(self.manager.item_metadata(step).tree)
        except Exception:  # unreadable metadata: a corrupt checkpoint, judged by the restore
            return None
        wanted = leaf_shapes(abstract_state)
        missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
        reshaped = [k for k in sorted(wanted.keys() & saved.keys()) if wanted[k] != saved[k]]
        if missing or extra:
            parts = [f"lacks {'.'.join(missing[0])}" if missing else ""]
            parts += [f"has {'.'.join(extra[0])}" if extra else ""]
            counted = f"{len(missing)} leaves missing, {len(extra)} extra"
            return f"{counted}: it {' and '.join(p for p in parts if p)}"
        if reshaped:
            k = reshaped[0]
            return f"{'.'.join(k)} has shape {saved[k]}, this command's {wanted[k]}"
        return None

    def set_aside(self, step: int, folder: str, why: str) -> Path:
        """Move checkpoint `step` out of Orbax's steps to <folder>/<step>-<time>; its new path."""
        target = self.directory / folder / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        # Moved, not deleted: a checkpoint misjudged (a restore that failed for another
        # reason) stays recoverable by hand; one process moves it, the others wait.
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint set aside {self.directory} {step}")
        self.manager.reload()
        log.warning("checkpoint %s/%d %s; moved to %s", self.directory, step, why, target)
        return target

    def restore_latest(self, abstract_state) -> tuple[int, object] | None:
        """The newest checkpoint that restores, as (step, state); None when there is none.

        A corrupt or partial newest checkpoint is reported and the one before it is tried,
        so a run killed while writing loses at most one checkpoint interval. Read-only: the
        corrupt checkpoint stays (restore_common, which training uses, sets it aside).
        """
        for step in self.steps():
            state = self.restore(step, abstract_state)
            if state is not None:
                return step, state
        return None

    def discard_unfinished(self) -> None:
        """Remove the temporary directories of saves that did not finish (a full disk's),
        so the space they hold can take the run's status."""
        for path in self.directory.glob(f"*{TMP_DIR_SUFFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def leaf_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of a pytree's leaves, paths spelt alike for states and Orbax metadata."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _key_name(key) -> str:
    """A path entry's name, whatever kind of node it indexes (dict, sequence, attribute)."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def abstract_like(state) -> object:
    """Shape/dtype/sharding structs for a state pytree (the restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore_common(checkpointers: list[Checkpointer], abstract_state) -> tuple[int, list] | None:
    """The newest step that restores in every checkpointer (seeds trained together resume
    together), as (step, [state per checkpointer]); None when there is no such step.

    Every checkpoint newer than that step is set aside (corrupt ones under corrupt/, the
    others under unused/): the resumed run saves those steps again, and Orbax would skip a
    save at or below a step it still lists.
    """
    common = set.intersection(*(set(c.steps()) for c in checkpointers))
    restored = None
    for step in sorted(common, reverse=True):
        states = [c.restore(step, abstract_state) for c in checkpointers]
        for checkpointer, state in zip(checkpointers, states, strict=True):
            if state is None:
                checkpointer.set_aside(step, "corrupt", "cannot be restored")
        if all(s is not None for s in states):
            restored = step, states
            break
    resume = restored[0] if restored else -1
    for checkpointer in checkpointers:
        for step in checkpointer.steps():
            if step > resume:
                why = f"is newer than iteration {max(resume, 0)}, the newest every seed restores"
                checkpointer.set_aside(step, "unused", why)
    return restored
