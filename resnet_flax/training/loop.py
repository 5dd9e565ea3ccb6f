"""The one training loop: model + dataset + recipe -> a finished, resumable run directory."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from resnet_flax.data import augment as aug
from resnet_flax.data.memory import DataConfig, Dataset, load_dataset
from resnet_flax.data.prefetch import DevicePrefetcher
from resnet_flax.data.stream import Stream, is_streaming, open_stream
from resnet_flax.models.counts import count_params
from resnet_flax.models.resnet import build_model
from resnet_flax.models.spec import ModelSpec, check_bn_batch, resolve
from resnet_flax.rundir import (
    RUN_CONFIG_FILE,
    SEED_GROUP_MARKER,
    RunRecorder,
    RunStatus,
    git_commit,
    library_versions,
    read_summary,
)
from resnet_flax.training.checkpoints import Checkpointer, abstract_like, restore_common
from resnet_flax.training.optim import (
    OptimConfig,
    apply_lr,
    learning_rate,
    make_optimizer,
    make_schedule,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerConfig:
    """How long to train and how often to log, evaluate and checkpoint (all in iterations)."""

    iterations: int = 64_000
    batch_size: int = 128
    log_every: int = 100
    eval_every: int = 2_000
    checkpoint_every: int = 2_000
    keep_checkpoints: int = 3
    eval_batch_size: int = 1_000
    progress: bool = True
    # How a chunk of steps runs: one lax.scan ("scan"), or a Python loop over a compiled step
    # ("python"). "auto" picks python on CPU, where XLA runs convolution gradients inside
    # while loops 30x slower than unrolled (docs/performance.md), and scan elsewhere.
    step_loop: str = "auto"
    # Seeds seed .. seed+vmap_seeds-1 trained as ONE compiled program (vmap over seeds), each
    # into run_dir/seed_<s>: small models leave a GPU idle, several seeds fill it.
    vmap_seeds: int = 1
    # Batches copied to the devices ahead of the running step (streaming datasets).
    device_prefetch: int = 2


@dataclass(frozen=True)
class RunInfo:
    """Identifying fields copied into summary.json so analysis can group runs."""

    experiment: str = "default"
    seed: int = 0


# The training state; every entry but the shared step count gets a leading seed axis when
# several seeds train as one program (TrainerConfig.vmap_seeds).
STATE_KEYS = ("params", "batch_stats", "opt_state", "step", "warm_done", "order", "key")
SEED_AXES = {k: (None if k == "step" else 0) for k in STATE_KEYS}


class ConfigError(ValueError):
    """An impossible training configuration; the message says what is valid."""


def check_trainer(cfg: TrainerConfig, num_devices: int) -> None:
    """Fail before any compile when intervals or batch sizes cannot work."""
    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.log_every < 1:
        raise ConfigError("iterations, batch_size and log_every must be positive")
    if cfg.vmap_seeds < 1 or cfg.device_prefetch < 1:
        raise ConfigError(
            f"trainer.vmap_seeds and trainer.device_prefetch must be at least 1; "
            f"got {cfg.vmap_seeds} and {cfg.device_prefetch}"
        )
    for name in ("eval_every", "checkpoint_every"):
        value = getattr(cfg, name)
        if value < 1 or value % cfg.log_every:
            raise ConfigError(
                f"trainer.{name} must be a positive multiple of trainer.log_every "
                f"({cfg.log_every}); got {value}"
            )
    resolve_loop(cfg.step_loop)
    if cfg.batch_size % num_devices:
        raise ConfigError(
            f"trainer.batch_size {cfg.batch_size} must be divisible by the {num_devices} devices"
        )


# --- the pure functions that are compiled ---------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def resolve_loop(choice: str) -> str:
    """'scan' or 'python' for a step_loop / stage loop choice of 'auto', 'scan' or 'python'."""
    if choice not in ("auto", "scan", "python"):
        raise ConfigError(f"step_loop must be one of auto, scan, python; got {choice!r}")
    if choice == "auto":
        return "python" if jax.default_backend() == "cpu" else "scan"
    return choice


@dataclass(frozen=True)
class Compiled:
    """The jitted training steps (one, or a scanned chunk) and the evaluation functions."""

    train_step: object
    train_chunk: object
    evaluate: object
    step_loop: str
    # The one compiled step behind every chunk length of the python loop.
    _compiled_step: dict = dataclasses.field(default_factory=dict)

    def compile_step(self, state, data):
        """The single training step (state, data) -> (state, metrics), compiled once."""
        if "step" not in self._compiled_step:
            self._compiled_step["step"] = self.train_step.lower(state, data).compile()
        return self._compiled_step["step"]

    def compile_chunk(self, length: int, state, data):
        """A callable (state, data) -> (state, per-step metrics) running `length` steps."""
        if self.step_loop == "scan":
            return self.train_chunk.lower(state, data, length).compile()
        step = self.compile_step(state, data)
        return lambda state, data: run_steps(step, state, itertools.repeat(data, length))


def stack_trees(trees: list) -> object:
    """Pytrees of one structure stacked leaf by leaf on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


# Steps dispatched ahead of the running one. XLA:CPU launches each device's part of a
# multi-device program on a pool of as many threads as devices, and a launch blocks its
# thread once 32 programs are queued on a device, so an unbounded queue can leave no thread
# for the other half of an all-reduce: the run deadlocks (see docs/design.md).
MAX_STEPS_IN_FLIGHT = 2


def run_steps(step, state, inputs) -> tuple[dict, dict]:
    """Apply a compiled step once per input; per-step metrics stacked on a leading axis.

    At most MAX_STEPS_IN_FLIGHT steps wait behind the running one.
    """
    metrics = []
    for data in inputs:
        state, m = step(state, data)
        metrics.append(m)
        if len(metrics) > MAX_STEPS_IN_FLIGHT:
            jax.block_until_ready(metrics[-1 - MAX_STEPS_IN_FLIGHT])
    return state, stack_trees(metrics)


def build_functions(
    graphdef,
    layout: dict,
    optim: OptimConfig,
    schedule,
    tx,
    trainer: TrainerConfig,
    mesh: Mesh,
    num_seeds: int = 1,
) -> Compiled:
    """Close the model, recipe and data layout into the jitted functions.

    layout["streaming"] says where a batch comes from: False, the step gathers it from
    the device-resident training set (and augments it there); True, the step receives a
    host-augmented uint8 batch. With num_seeds > 1 the state holds that many seeds
    stacked on a leading axis and every function is vmapped over it (one program).
    """
    batch_sharding = NamedSharding(mesh, P("data"))
    batch = trainer.batch_size
    streaming = layout["streaming"]
    steps_per_epoch, n_train = layout["steps_per_epoch"], layout["n_train"]
    padding, flip = layout.get("crop_padding", 0), layout.get("flip", False)

    def forward(params, batch_stats, x, train):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        logits = model(x, train=train)
        return logits, nnx.state(model, nnx.BatchStat)

    def update(state, x, y):
        """One SGD step on a normalised, augmented batch: the part every data source shares."""
        i = state["step"]

        def loss_fn(params):
            logits, new_stats = forward(params, state["batch_stats"], x, True)
            return cross_entropy(logits, y), (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        error = jnp.mean(jnp.argmax(logits, -1) != y)
        lr = learning_rate(optim, schedule, i, state["warm_done"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], apply_lr(updates, lr))
        warm_done = state["warm_done"]
        if optim.warmup_until_error is not None:
            warm_done = warm_done | (error < optim.warmup_until_error)
        new_state = {
            **state,
            "params": params,
            "batch_stats": new_stats,
            "opt_state": opt_state,
            "step": i + 1,
            "warm_done": warm_done,
        }
        return new_state, {"loss": loss, "error": error, "lr": lr}

    def memory_step(state, data):
        x_all, y_all, mean, std = data
        i = state["step"]
        epoch, pos = i // steps_per_epoch, i % steps_per_epoch
        order_key, augment_key = jax.random.split(jax.random.fold_in(state["key"], 1))
        # A fresh permutation at each epoch start, derived from (seed, epoch) alone, and
        # carried in the state in between (recomputing it every step cost ~27 ms on CPU).
        order = jax.lax.cond(
            pos == 0,
            lambda: jax.random.permutation(jax.random.fold_in(order_key, epoch), n_train),
            lambda: state["order"],
        )
        idx = jax.lax.dynamic_slice(order, (pos * batch,), (batch,))
        idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
        x = aug.normalize(x_all[idx], mean, std)
        x = aug.augment(jax.random.fold_in(augment_key, i), x, padding, flip)
        new_state, metrics = update(state, x, y_all[idx])
        return {**new_state, "order": order}, metrics

    def stream_step(state, data):
        x, y, mean, std = data
        return update(state, aug.normalize(x, mean, std), y)

    step = stream_step if streaming else memory_step
    if num_seeds > 1:
        # The data (and a streamed batch) is shared; parameters, statistics, optimizer state
        # and random keys are per seed. The step count is shared, so the epoch-start cond
        # stays a cond instead of becoming a select that permutes every step.
        step = jax.vmap(step, in_axes=(SEED_AXES, None), out_axes=(SEED_AXES, 0))

    @functools.partial(jax.jit, static_argnums=(2,), donate_argnums=(0,))
    def train_chunk(state, data, length):
        return jax.lax.scan(lambda s, _: step(s, data), state, length=length)

    train_step = jax.jit(step, donate_argnums=(0,))

    def eval_sums(params, batch_stats, x, y, valid, mean, std):
        """Summed loss and number of errors over the valid rows of one evaluation batch."""
        logits, _ = forward(params, batch_stats, aug.normalize(x, mean, std), False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        wrong = jnp.argmax(logits, -1) != y
        return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid & wrong)

    # One evaluation program for every split and data source: batches of a fixed shape come
    # from the host (evaluate_batches), so it compiles once per run. A scan over a whole
    # device-resident split compiled once per split size (test, train, val): one extra
    # forward compile per run, ~10 s of ResNet-56's 43 s in the digits demo.
    evaluate = eval_sums
    if num_seeds > 1:
        evaluate = jax.vmap(evaluate, in_axes=(0, 0) + (None,) * 5)
    return Compiled(train_step, train_chunk, jax.jit(evaluate), resolve_loop(trainer.step_loop))


# --- host side --------------------------------------------------------------------------------


def make_mesh() -> Mesh:
    """A 1-D data-parallel mesh over every device of every process."""
    return Mesh(np.array(jax.devices()), ("data",))


def put_replicated(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """Copy a host array to every device (works on one host and on several)."""
    sharding = NamedSharding(mesh, P())
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def maybe_initialize_distributed() -> None:
    """Join a multi-host job (SLURM or explicit coordinator) before touching devices."""
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def enable_compilation_cache(path: str | None) -> None:
    """Persist compiled programs so reruns of the same shapes skip compilation."""
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def initial_state(spec: ModelSpec, seed: int, tx, n_train: int) -> tuple[object, dict]:
    """Model definition and the initial training state (parameters drawn from seed).

    This is also the restore template of a checkpoint, so analysis builds it the same way.
    """
    model = build_model(spec, seed=seed)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "step": jnp.int32(0),
        "warm_done": jnp.bool_(False),
        "order": jnp.zeros((n_train,), jnp.int32),  # the epoch's data order, set at step 0
        # Data order and augmentation keys derive from this, so seeds can be vmapped.
        "key": jax.random.PRNGKey(seed),
    }
    return graphdef, state


def stack_seeds(states: list[dict]) -> dict:
    """Per-seed states stacked on a leading axis (the step count stays shared)."""
    return {
        k: states[0][k] if SEED_AXES[k] is None else stack_trees([s[k] for s in states])
        for k in STATE_KEYS
    }


def seed_state(state: dict, index: int) -> dict:
    """One seed's state out of a stacked state."""
    return {
        k: v if SEED_AXES[k] is None else jax.tree.map(lambda a: a[index], v)
        for k, v in state.items()
    }


def seed_run_dirs(run_dir: Path, seeds: list[int]) -> list[Path]:
    """Where each seed writes: run_dir itself, or run_dir/seed_<s> when seeds train together."""
    if len(seeds) == 1:
        return [Path(run_dir)]
    return [Path(run_dir) / f"seed_{s}" for s in seeds]


def global_eval_batch(
    trainer: TrainerConfig, num_devices: int, smallest_split: int | None = None
) -> int:
    """The evaluation batch rounded up to a multiple of the device count.

    With `smallest_split`, no larger than that split (so rounded up): a 360-image test set
    is not padded to a batch of 1,000.
    """
    batch = trainer.eval_batch_size
    if smallest_split is not None:
        batch = min(batch, smallest_split)
    return math.ceil(batch / num_devices) * num_devices


def array_eval_batches(
    x: np.ndarray, y: np.ndarray, batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's rows of each global evaluation batch of in-memory arrays, with a mask.

    The last batch is padded (mask False) to the full size, so every batch has one shape.
    """
    n, local = len(x), batch // jax.process_count()
    first = jax.process_index() * local
    for start in range(0, n, batch):
        rows = np.arange(start + first, start + first + local)
        valid = rows < n
        rows = np.minimum(rows, n - 1)
        yield x[rows], y[rows], valid


def evaluate_batches(
    evaluate: Callable, state: dict, batches: Iterable, n: int, sharding, prefetch: int, stats
) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and error (per seed when vmapped) over host batches (x, y, mask) of n rows.

    The batches are copied to the devices `prefetch` ahead of the compiled evaluation.
    """
    loss, wrong = 0.0, 0
    on_device = DevicePrefetcher(iter(batches), sharding, prefetch)
    try:
        for x, y, valid in on_device:
            sums = evaluate(state["params"], state["batch_stats"], x, y, valid, *stats)
            loss, wrong = loss + np.asarray(sums[0]), wrong + np.asarray(sums[1])
    finally:
        on_device.close()
    return loss / n, wrong / n


def open_data(data_cfg: DataConfig, trainer: TrainerConfig, seed: int) -> Dataset | Stream:
    """A run's data: the in-memory sets, or a host stream for the ImageNet-scale ones.

    Either way this fails in seconds with a DataError (nothing has compiled yet).
    """
    if is_streaming(data_cfg.name):
        eval_batch = global_eval_batch(trainer, jax.device_count())
        return open_stream(data_cfg, trainer.batch_size, eval_batch, seed)
    return load_dataset(data_cfg)


@dataclass
class Prepared:
    """Everything a loop over chunks needs: the state, the compiled functions, device data."""

    spec: ModelSpec
    trainer: TrainerConfig
    mesh: Mesh
    graphdef: object
    state: dict
    fns: Compiled
    on_device: dict
    steps_per_epoch: int
    param_count: int
    seeds: list[int]
    stream: Stream | None = None

    @property
    def train_data(self) -> tuple:
        """The arguments of the in-memory train chunk besides the state."""
        d = self.on_device
        return d["x_train"], d["y_train"], d["mean"], d["std"]

    @property
    def batch_sharding(self) -> NamedSharding:
        """Batches split row-wise over the devices of the mesh."""
        return NamedSharding(self.mesh, P("data"))

    @property
    def norm_stats(self) -> tuple:
        """The per-channel mean and std (on the devices) that normalize() takes."""
        return self.on_device["mean"], self.on_device["std"]

    def evaluate(self, state: dict, batches: Iterable, n: int, prefetch: int = 2) -> tuple:
        """Mean loss and error of `state` over host batches (x, y, mask) holding n rows."""
        return evaluate_batches(
            self.fns.evaluate, state, batches, n, self.batch_sharding, prefetch, self.norm_stats
        )


def prepare(
    spec: ModelSpec,
    data: Dataset | Stream,
    data_cfg: DataConfig,
    optim: OptimConfig,
    trainer: TrainerConfig,
    seed: int = 0,
    num_seeds: int = 1,
) -> Prepared:
    """Validate, build the initial state(s) and the jitted functions, put the data on device.

    num_seeds > 1 stacks seeds seed, seed+1, ... into one state trained as one program.
    """
    mesh = make_mesh()
    check_trainer(trainer, mesh.size)
    streaming = not isinstance(data, Dataset)
    in_channels = data.image_shape[-1]
    spec = dataclasses.replace(spec, num_classes=data.num_classes, in_channels=in_channels)
    resolve(spec)
    check_bn_batch(spec.bn_batch, trainer.batch_size)
    n_train = data.n_train if streaming else len(data.x_train)
    if n_train < trainer.batch_size:
        raise ConfigError(
            f"the training split has {n_train} images, fewer than batch_size {trainer.batch_size}"
        )
    steps_per_epoch = n_train // trainer.batch_size
    splits = [] if streaming else [data.x_train, data.x_test, data.x_val]
    smallest = min((len(x) for x in splits if x is not None), default=None)
    eval_batch = global_eval_batch(trainer, mesh.size, smallest)
    trainer = dataclasses.replace(trainer, eval_batch_size=eval_batch)

    schedule = make_schedule(optim, trainer.iterations)
    tx = make_optimizer(optim)
    seeds = [seed + k for k in range(num_seeds)]
    # A stream orders its own data: the state's permutation is a placeholder (of length 1,
    # as Orbax cannot save empty arrays).
    order_len = 1 if streaming else n_train
    states = []
    for s in seeds:
        graphdef, state = initial_state(spec, s, tx, order_len)
        states.append(state)
    state = states[0] if num_seeds == 1 else stack_seeds(states)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    param_count = count_params(nnx.merge(graphdef, states[0]["params"], states[0]["batch_stats"]))

    if streaming:
        # The stream's per-channel statistics are on the 0-255 scale; normalize() uses 0-1.
        arrays = {"mean": data.mean / 255.0, "std": data.std / 255.0}
        layout = {"streaming": True, "steps_per_epoch": steps_per_epoch, "n_train": n_train}
    else:
        mean, std = aug.normalization_stats(data.x_train, data_cfg.normalization)
        # Only the training set lives on the devices: evaluation batches come from the host.
        arrays = {"x_train": data.x_train, "y_train": data.y_train, "mean": mean, "std": std}
        layout = {
            "streaming": False,
            "steps_per_epoch": steps_per_epoch,
            "n_train": n_train,
            "crop_padding": data_cfg.crop_padding,
            "flip": data_cfg.flip,
        }
    arrays["mean"] = np.asarray(arrays["mean"], np.float32)
    arrays["std"] = np.asarray(arrays["std"], np.float32)
    on_device = {name: put_replicated(arr, mesh) for name, arr in arrays.items()}
    fns = build_functions(graphdef, layout, optim, schedule, tx, trainer, mesh, num_seeds)
    return Prepared(
        spec,
        trainer,
        mesh,
        graphdef,
        state,
        fns,
        on_device,
        steps_per_epoch,
        param_count,
        seeds,
        data if streaming else None,
    )


@dataclass
class SeedRun:
    """The records of one seed's run directory while it trains."""

    info: RunInfo
    run_dir: Path
    recorder: RunRecorder
    checkpointer: Checkpointer
    base_summary: dict
    wall_before: float
    status: RunStatus = RunStatus.RUNNING
    message: str | None = None

    def summary(self, iteration: int, steps_per_epoch: int) -> dict:
        """summary.json's content at this point of the run."""
        out = {**self.base_summary, "status": self.status, "message": self.message}
        out.update(_final_numbers(self.recorder.history, steps_per_epoch, iteration))
        return out


def train(
    run_dir: str | Path,
    spec: ModelSpec,
    data_cfg: DataConfig,
    optim: OptimConfig,
    trainer: TrainerConfig,
    info: RunInfo,
    dataset: Dataset | Stream | None = None,
) -> dict:
    """Train (or resume) one run into run_dir and return its summary.

    With trainer.vmap_seeds = k > 1, seeds info.seed .. info.seed+k-1 train as one compiled
    program, each into run_dir/seed_<s>; the return value then holds every seed's summary
    under "runs". Bad configurations raise before anything compiles. A non-finite loss ends
    a run with status RunStatus.DIVERGED (returned, not raised) so a sweep can go on.
    """
    run_dir = Path(run_dir)
    check_trainer(trainer, len(jax.devices()))
    data = dataset if dataset is not None else open_data(data_cfg, trainer, info.seed)
    prep = prepare(spec, data, data_cfg, optim, trainer, info.seed, trainer.vmap_seeds)
    spec, trainer, mesh, fns = prep.spec, prep.trainer, prep.mesh, prep.fns
    state, steps_per_epoch = prep.state, prep.steps_per_epoch
    seeds, stream = prep.seeds, prep.stream
    stacked = len(seeds) > 1
    if stacked and jax.default_backend() == "cpu":
        log.warning(
            "vmap_seeds=%d on CPU: vmapped convolutions become grouped convolutions, which "
            "XLA:CPU runs ~3.5x slower per image than separate runs (measured, ResNet-20); "
            "it pays on GPUs, where one small net leaves the device idle",
            len(seeds),
        )
    dirs = seed_run_dirs(run_dir, seeds)
    writer = jax.process_index() == 0  # one process of a multi-host job writes the records
    if stacked and writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = {"seeds": seeds, "run_dirs": [d.name for d in dirs]}
        (run_dir / SEED_GROUP_MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    checkpointers = [Checkpointer(d / "checkpoints", keep=trainer.keep_checkpoints) for d in dirs]
    template = abstract_like(seed_state(state, 0) if stacked else state)
    restored = restore_common(checkpointers, template)
    start = 0
    if restored is not None:
        start, states = restored
        state = (
            states[0]
            if not stacked
            else jax.device_put(stack_seeds(states), NamedSharding(mesh, P()))
        )
        log.info("resuming %s from iteration %d", run_dir, start)

    dataset_name = stream.name if stream is not None else data.name
    common = {
        "experiment": info.experiment,
        "model": spec.model,
        "depth": spec.depth,
        "shortcut": spec.shortcut,
        "family": spec.family,
        "dataset": dataset_name,
        "param_count": prep.param_count,
        "batch_size": trainer.batch_size,
        "device_kind": jax.devices()[0].device_kind,
        "device_count": mesh.size,
        "process_count": jax.process_count(),
        "vmap_seeds": len(seeds),
        "versions": library_versions(),
        "git_commit": git_commit(),
    }
    if stream is not None:
        common["eval_split"] = stream.eval_split
    runs = []
    for seed, d, ckpt in zip(seeds, dirs, checkpointers, strict=True):
        seed_info = dataclasses.replace(info, seed=seed)
        recorder = RunRecorder(d, resume_from=start, write=writer)
        if writer:
            write_run_config(d, spec, data_cfg, optim, trainer, seed_info)
        previous = read_summary(d)
        wall_before = previous.get("wall_time_s", 0.0) if start > 0 else 0.0
        run = SeedRun(seed_info, d, recorder, ckpt, {**common, "seed": seed}, wall_before)
        recorder.write_summary(
            {**run.base_summary, "status": RunStatus.RUNNING, "iterations": start}
        )
        runs.append(run)

    def per_seed(value, index: int):
        """Seed `index`'s entry of a (per-step) metric or evaluation result."""
        value = np.asarray(value)
        return value[..., index] if stacked else value

    def evaluate(split: str) -> list[tuple[float, float]]:
        """(loss, error) of every seed on a split."""
        if stream is None:
            x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
            batches, n = array_eval_batches(x, y, trainer.eval_batch_size), len(x)
        else:
            batches, n = stream.eval_batches(), stream.n_eval
        loss, err = prep.evaluate(state, batches, n, trainer.device_prefetch)
        return [(float(per_seed(loss, k)), float(per_seed(err, k))) for k in range(len(seeds))]

    def log_eval(iteration: int) -> None:
        line = {"iteration": iteration, "epoch": iteration / steps_per_epoch}
        test = evaluate("test")
        val = evaluate("val") if stream is None and data.x_val is not None else None
        for k, run in enumerate(runs):
            if run.status != RunStatus.RUNNING:
                continue
            out = {**line, "test_loss": test[k][0], "test_error": test[k][1]}
            if val is not None:
                out["val_loss"], out["val_error"] = val[k]
            run.recorder.log(out)

    batch_sharding, stream_stats = prep.batch_sharding, prep.norm_stats
    compile_time = 0.0
    compiled: dict[int, object] = {}
    batches = None
    if stream is not None:
        batches = DevicePrefetcher(
            stream.train_batches(start), batch_sharding, trainer.device_prefetch
        )

    def run_chunk(state, length: int):
        """Train `length` steps: a compiled chunk over device data, or streamed batches."""
        nonlocal compile_time
        if stream is None:
            if length not in compiled:
                t0 = time.perf_counter()
                compiled[length] = fns.compile_chunk(length, state, prep.train_data)
                compile_time += time.perf_counter() - t0
            return compiled[length](state, prep.train_data)
        inputs = ((x, y, *stream_stats) for x, y in itertools.islice(batches, length))
        first = next(inputs)  # the compiled step needs one batch's shapes
        if "step" not in compiled:
            t0 = time.perf_counter()
            compiled["step"] = fns.compile_step(state, first)
            compile_time += time.perf_counter() - t0
        return run_steps(compiled["step"], state, itertools.chain([first], inputs))

    t_start = time.perf_counter()
    train_time, train_images = 0.0, 0
    iteration = start
    bar = tqdm(
        total=trainer.iterations,
        initial=start,
        disable=not trainer.progress,
        desc=f"{spec.model}-{spec.depth} seed {','.join(map(str, seeds))}",
        unit="it",
        dynamic_ncols=True,
    )
    try:
        if start == 0:
            # The curves start at the untrained network, as the paper's figures do.
            log_eval(0)
        while iteration < trainer.iterations and any(r.status == RunStatus.RUNNING for r in runs):
            length = min(trainer.log_every, trainer.iterations - iteration)
            wait_before = batches.wait_s if batches is not None else 0.0
            compile_before = compile_time
            t0 = time.perf_counter()
            state, metrics = run_chunk(state, length)
            metrics = jax.device_get(metrics)
            # Compilation happens inside the first chunk of each length: not training time.
            elapsed = time.perf_counter() - t0 - (compile_time - compile_before)
            train_time += elapsed
            train_images += length * trainer.batch_size
            iteration += length
            line = {
                "iteration": iteration,
                "epoch": iteration / steps_per_epoch,
                # Per run, as in summary.json: k seeds in one program process k times this.
                "images_per_sec": length * trainer.batch_size / elapsed,
            }
            if batches is not None:
                # Share of the interval spent waiting for input: 0 means the host keeps up.
                line["input_wait_fraction"] = (batches.wait_s - wait_before) / elapsed
            done = iteration >= trainer.iterations
            shown = None  # the progress bar shows the first seed still running
            for k, run in enumerate(runs):
                if run.status != RunStatus.RUNNING:
                    continue
                losses = np.asarray(per_seed(metrics["loss"], k), dtype=np.float64)
                seed_line = {
                    **line,
                    "lr": float(per_seed(metrics["lr"], k)[-1]),
                    "train_loss": float(losses.mean()),
                    "train_error": float(np.mean(per_seed(metrics["error"], k))),
                }
                run.recorder.log(seed_line)
                shown = shown or seed_line
                if not np.all(np.isfinite(losses)):
                    bad = int(np.argmax(~np.isfinite(losses)))
                    run.status = RunStatus.DIVERGED
                    run.message = (
                        f"non-finite training loss at iteration {iteration - length + bad + 1}; "
                        "lower optim.lr or use a warm-up (optim.warmup_lr)"
                    )
                    log.error("%s: %s", run.run_dir, run.message)
            bar.update(length)
            bar.set_postfix(
                loss=f"{shown['train_loss']:.3f}",
                err=f"{shown['train_error']:.3f}",
                img_s=f"{line['images_per_sec']:.0f}",
            )
            if iteration % trainer.eval_every == 0 or done:
                log_eval(iteration)
            if iteration % trainer.checkpoint_every == 0 or done:
                for k, run in enumerate(runs):
                    if run.status == RunStatus.RUNNING:
                        run.checkpointer.save(iteration, seed_state(state, k) if stacked else state)
    except BaseException as err:
        message = f"{type(err).__name__}: {err}"
        for run in runs:
            run.status, run.message = RunStatus.FAILED, message
            failed = {"status": RunStatus.FAILED, "iterations": iteration, "message": message}
            run.recorder.write_summary({**run.base_summary, **failed})
        raise
    finally:
        bar.close()
        if batches is not None:
            batches.close()
        for run in runs:
            run.checkpointer.close()

    final_train = evaluate("train") if stream is None and iteration >= trainer.iterations else None
    summaries = []
    for k, run in enumerate(runs):
        if run.status == RunStatus.RUNNING:
            run.status = RunStatus.COMPLETED
        summary = run.summary(iteration, steps_per_epoch)
        if run.status == RunStatus.COMPLETED and final_train is not None:
            summary["final_train_loss"], summary["final_train_error"] = final_train[k]
        summary["compile_time_s"] = compile_time
        summary["wall_time_s"] = run.wall_before + time.perf_counter() - t_start
        # Per run: a program training k seeds delivers k times these images per second.
        summary["images_per_sec"] = train_images / train_time if train_time else None
        if batches is not None and train_time:
            summary["input_wait_fraction"] = batches.wait_s / train_time
        run.recorder.write_summary(summary)
        run.recorder.close()
        summaries.append(summary)
    if not stacked:
        return summaries[0]
    statuses = {s["status"] for s in summaries}
    status = RunStatus.COMPLETED if statuses == {RunStatus.COMPLETED} else RunStatus.DIVERGED
    return {"status": status, "seeds": seeds, "runs": summaries}


def write_run_config(
    run_dir: Path,
    spec: ModelSpec,
    data_cfg: DataConfig,
    optim: OptimConfig,
    trainer: TrainerConfig,
    info: RunInfo,
) -> None:
    """The library-level configuration, so analysis can rebuild the run without Hydra."""
    config = {
        "model": dataclasses.asdict(spec),
        "data": dataclasses.asdict(data_cfg),
        "optim": dataclasses.asdict(optim),
        "trainer": dataclasses.asdict(trainer),
        "info": dataclasses.asdict(info),
    }
    (run_dir / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _final_numbers(history: list[dict], steps_per_epoch: int, iteration: int) -> dict:
    """Final and best test (and validation) numbers from the metric lines."""
    evals = [m for m in history if m.get("test_error") is not None]
    out = {"iterations": iteration, "epochs": iteration / steps_per_epoch}
    if evals:
        out["final_test_error"] = evals[-1]["test_error"]
        out["final_test_loss"] = evals[-1]["test_loss"]
        out["best_test_error"] = min(m["test_error"] for m in evals)
        out["final_val_error"] = evals[-1].get("val_error")
    trains = [m for m in history if m.get("train_error") is not None]
    if trains:
        out["final_running_train_error"] = trains[-1]["train_error"]
    return out
