"""The one training loop: model + dataset + recipe -> a finished, resumable run directory."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
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

from resnet_flax import augment as aug
from resnet_flax.architecture import ModelSpec, resolve
from resnet_flax.checkpoints import Checkpointer, abstract_like
from resnet_flax.data import DataConfig, Dataset, load_dataset
from resnet_flax.models import build_model
from resnet_flax.optim import OptimConfig, apply_lr, learning_rate, make_optimizer, make_schedule
from resnet_flax.records import RunRecorder, git_commit, library_versions
from resnet_flax.summary import count_params

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
    # while loops 30x slower than unrolled (measured, DESIGN/README), and scan elsewhere.
    step_loop: str = "auto"


@dataclass(frozen=True)
class RunInfo:
    """Identifying fields copied into summary.json so analysis can group runs."""

    experiment: str = "default"
    seed: int = 0


class ConfigError(ValueError):
    """An impossible training configuration; the message says what is valid."""


def check_trainer(cfg: TrainerConfig, num_devices: int) -> None:
    """Fail before any compile when intervals or batch sizes cannot work."""
    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.log_every < 1:
        raise ConfigError("iterations, batch_size and log_every must be positive")
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
    """The jitted training steps (one, or a scanned chunk) and the evaluation of a split."""

    train_step: object
    train_chunk: object
    evaluate: object
    step_loop: str
    # The one compiled step behind every chunk length of the python loop.
    _compiled_step: dict = dataclasses.field(default_factory=dict)

    def compile_chunk(self, length: int, state, data):
        """A callable (state, data) -> (state, per-step metrics) running `length` steps."""
        if self.step_loop == "scan":
            return self.train_chunk.lower(state, data, length).compile()
        if "step" not in self._compiled_step:
            self._compiled_step["step"] = self.train_step.lower(state, data).compile()
        step = self._compiled_step["step"]

        def run(state, data):
            metrics = []
            for _ in range(length):
                state, m = step(state, data)
                metrics.append(m)
            return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

        return run


def build_functions(
    graphdef,
    spec_data: dict,
    optim: OptimConfig,
    schedule,
    tx,
    trainer: TrainerConfig,
    mesh: Mesh,
    seed: int,
) -> Compiled:
    """Close the model, recipe and data layout into the two jitted functions."""
    batch_sharding = NamedSharding(mesh, P("data"))
    steps_per_epoch = spec_data["steps_per_epoch"]
    n_train = spec_data["n_train"]
    batch = trainer.batch_size
    padding, flip = spec_data["crop_padding"], spec_data["flip"]
    base_key = jax.random.PRNGKey(seed)
    order_key, augment_key = jax.random.split(jax.random.fold_in(base_key, 1))

    def forward(params, batch_stats, x, train):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        logits = model(x, train=train)
        return logits, nnx.state(model, nnx.BatchStat)

    def step(state, data):
        x_all, y_all, mean, std = data
        i = state["step"]
        epoch, pos = i // steps_per_epoch, i % steps_per_epoch
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
        y = y_all[idx]

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
            "params": params,
            "batch_stats": new_stats,
            "opt_state": opt_state,
            "step": i + 1,
            "warm_done": warm_done,
            "order": order,
        }
        return new_state, {"loss": loss, "error": error, "lr": lr}

    @functools.partial(jax.jit, static_argnums=(2,), donate_argnums=(0,))
    def train_chunk(state, data, length):
        return jax.lax.scan(lambda s, _: step(s, data), state, length=length)

    train_step = jax.jit(step, donate_argnums=(0,))

    eval_batch = trainer.eval_batch_size

    @jax.jit
    def evaluate(params, batch_stats, x_all, y_all, mean, std):
        n = x_all.shape[0]
        num_batches = -(-n // eval_batch)

        def body(carry, b):
            idx = b * eval_batch + jnp.arange(eval_batch)
            valid = idx < n
            idx = jax.lax.with_sharding_constraint(jnp.minimum(idx, n - 1), batch_sharding)
            x = aug.normalize(x_all[idx], mean, std)
            logits, _ = forward(params, batch_stats, x, False)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y_all[idx])
            wrong = jnp.argmax(logits, -1) != y_all[idx]
            return (
                carry[0] + jnp.sum(jnp.where(valid, losses, 0.0)),
                carry[1] + jnp.sum(valid & wrong),
            ), None

        (loss_sum, wrong), _ = jax.lax.scan(
            body, (jnp.float32(0.0), jnp.int32(0)), jnp.arange(num_batches)
        )
        return loss_sum / n, wrong / n

    return Compiled(train_step, train_chunk, evaluate, resolve_loop(trainer.step_loop))


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
    }
    return graphdef, state


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

    @property
    def train_data(self) -> tuple:
        """The arguments of the train chunk besides the state."""
        d = self.on_device
        return d["x_train"], d["y_train"], d["mean"], d["std"]


def prepare(
    spec: ModelSpec,
    data: Dataset,
    data_cfg: DataConfig,
    optim: OptimConfig,
    trainer: TrainerConfig,
    seed: int,
) -> Prepared:
    """Validate, build the initial state and the jitted functions, put the data on device."""
    mesh = make_mesh()
    check_trainer(trainer, mesh.size)
    spec = dataclasses.replace(spec, num_classes=data.num_classes, in_channels=data.image_shape[-1])
    resolve(spec)
    n_train = len(data.x_train)
    if n_train < trainer.batch_size:
        raise ConfigError(
            f"the training split has {n_train} images, fewer than batch_size {trainer.batch_size}"
        )
    steps_per_epoch = n_train // trainer.batch_size
    eval_batch = math.ceil(trainer.eval_batch_size / mesh.size) * mesh.size
    trainer = dataclasses.replace(trainer, eval_batch_size=eval_batch)

    schedule = make_schedule(optim, trainer.iterations)
    tx = make_optimizer(optim)
    graphdef, state = initial_state(spec, seed, tx, n_train)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    param_count = count_params(nnx.merge(graphdef, state["params"], state["batch_stats"]))

    mean, std = aug.normalization_stats(data.x_train, data_cfg.normalization)
    arrays = {
        "x_train": data.x_train,
        "y_train": data.y_train,
        "x_test": data.x_test,
        "y_test": data.y_test,
        "mean": mean,
        "std": std,
    }
    if data.x_val is not None:
        arrays.update(x_val=data.x_val, y_val=data.y_val)
    on_device = {name: put_replicated(arr, mesh) for name, arr in arrays.items()}
    layout = {
        "steps_per_epoch": steps_per_epoch,
        "n_train": n_train,
        "crop_padding": data_cfg.crop_padding,
        "flip": data_cfg.flip,
    }
    fns = build_functions(graphdef, layout, optim, schedule, tx, trainer, mesh, seed)
    return Prepared(
        spec, trainer, mesh, graphdef, state, fns, on_device, steps_per_epoch, param_count
    )


def train(
    run_dir: str | Path,
    spec: ModelSpec,
    data_cfg: DataConfig,
    optim: OptimConfig,
    trainer: TrainerConfig,
    info: RunInfo,
    dataset: Dataset | None = None,
) -> dict:
    """Train (or resume) one run into run_dir and return its summary.

    Bad configurations raise before anything compiles. A non-finite loss ends the run with
    status "diverged" (returned, not raised) so a sweep can go on with its other runs.
    """
    run_dir = Path(run_dir)
    check_trainer(trainer, len(jax.devices()))
    data = dataset if dataset is not None else load_dataset(data_cfg)
    prep = prepare(spec, data, data_cfg, optim, trainer, info.seed)
    spec, trainer, mesh, fns = prep.spec, prep.trainer, prep.mesh, prep.fns
    state, on_device, steps_per_epoch = prep.state, prep.on_device, prep.steps_per_epoch

    checkpointer = Checkpointer(run_dir / "checkpoints", keep=trainer.keep_checkpoints)
    restored = checkpointer.restore_latest(abstract_like(state))
    start = 0
    if restored is not None:
        start, state = restored
        log.info("resuming %s from iteration %d", run_dir, start)
    recorder = RunRecorder(run_dir, resume_from=start)
    write_run_config(run_dir, spec, data_cfg, optim, trainer, info)
    train_data = prep.train_data
    param_count = prep.param_count

    base_summary = {
        "experiment": info.experiment,
        "model": spec.model,
        "depth": spec.depth,
        "shortcut": spec.shortcut,
        "family": spec.family,
        "dataset": data.name,
        "seed": info.seed,
        "param_count": param_count,
        "batch_size": trainer.batch_size,
        "device_kind": jax.devices()[0].device_kind,
        "device_count": mesh.size,
        "process_count": jax.process_count(),
        "versions": library_versions(),
        "git_commit": git_commit(),
    }
    previous = _read_previous_summary(run_dir)
    wall_before = previous.get("wall_time_s", 0.0) if start > 0 else 0.0
    recorder.write_summary({**base_summary, "status": "running", "iterations": start})

    def evaluate(split: str) -> tuple[float, float]:
        loss, err = fns.evaluate(
            state["params"],
            state["batch_stats"],
            on_device[f"x_{split}"],
            on_device[f"y_{split}"],
            on_device["mean"],
            on_device["std"],
        )
        return float(loss), float(err)

    def eval_line(iteration: int) -> dict:
        line = {"iteration": iteration, "epoch": iteration / steps_per_epoch}
        line["test_loss"], line["test_error"] = evaluate("test")
        if data.x_val is not None:
            line["val_loss"], line["val_error"] = evaluate("val")
        return line

    compile_time = 0.0
    compiled: dict[int, object] = {}

    def chunk_fn(length: int):
        nonlocal compile_time
        if length not in compiled:
            t0 = time.perf_counter()
            compiled[length] = fns.compile_chunk(length, state, train_data)
            compile_time += time.perf_counter() - t0
        return compiled[length]

    status, message = "completed", None
    t_start = time.perf_counter()
    train_time, train_images = 0.0, 0
    iteration = start
    bar = tqdm(
        total=trainer.iterations,
        initial=start,
        disable=not trainer.progress,
        desc=f"{spec.model}-{spec.depth} seed {info.seed}",
        unit="it",
        dynamic_ncols=True,
    )
    try:
        if start == 0:
            # The curves start at the untrained network, as the paper's figures do.
            recorder.log(eval_line(0))
        while iteration < trainer.iterations:
            length = min(trainer.log_every, trainer.iterations - iteration)
            fn = chunk_fn(length)
            t0 = time.perf_counter()
            state, metrics = fn(state, train_data)
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - t0
            train_time += elapsed
            train_images += length * trainer.batch_size
            iteration += length
            losses = np.asarray(metrics["loss"], dtype=np.float64)
            line = {
                "iteration": iteration,
                "epoch": iteration / steps_per_epoch,
                "lr": float(metrics["lr"][-1]),
                "train_loss": float(losses.mean()),
                "train_error": float(np.mean(metrics["error"])),
                "images_per_sec": length * trainer.batch_size / elapsed,
            }
            if not np.all(np.isfinite(losses)):
                bad = int(np.argmax(~np.isfinite(losses)))
                status = "diverged"
                message = (
                    f"non-finite training loss at iteration {iteration - length + bad + 1}; "
                    "lower optim.lr or use a warm-up (optim.warmup_lr)"
                )
                recorder.log(line)
                log.error("%s: %s", run_dir, message)
                break
            recorder.log(line)
            bar.update(length)
            bar.set_postfix(
                loss=f"{line['train_loss']:.3f}",
                err=f"{line['train_error']:.3f}",
                lr=f"{line['lr']:.3g}",
                img_s=f"{line['images_per_sec']:.0f}",
            )
            done = iteration >= trainer.iterations
            if iteration % trainer.eval_every == 0 or done:
                recorder.log(eval_line(iteration))
            if iteration % trainer.checkpoint_every == 0 or done:
                checkpointer.save(iteration, state)
    except BaseException as err:
        status = "failed"
        message = f"{type(err).__name__}: {err}"
        recorder.write_summary(
            {**base_summary, "status": "failed", "iterations": iteration, "message": message}
        )
        raise
    finally:
        bar.close()
        checkpointer.close()

    summary = {**base_summary, "status": status, "message": message}
    summary.update(_final_numbers(recorder.history, steps_per_epoch, iteration))
    if status == "completed":
        summary["final_train_loss"], summary["final_train_error"] = evaluate("train")
    summary["compile_time_s"] = compile_time
    summary["wall_time_s"] = wall_before + time.perf_counter() - t_start
    summary["images_per_sec"] = train_images / train_time if train_time else None
    recorder.write_summary(summary)
    recorder.close()
    return summary


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
    (run_dir / "run_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _read_previous_summary(run_dir: Path) -> dict:
    """The summary of an earlier attempt at this run (for accumulated wall time)."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


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
