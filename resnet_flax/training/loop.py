"""The one training loop: model + dataset + recipe -> a finished, resumable run directory."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from resnet_flax.data import augment as aug
from resnet_flax.data.memory import DataConfig, Dataset, load_dataset
from resnet_flax.data.prefetch import DevicePrefetcher
from resnet_flax.data.stream import Stream, is_streaming, open_stream
from resnet_flax.models.counts import count_params
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
from resnet_flax.training.config import ConfigError, RunInfo, TrainerConfig, check_trainer
from resnet_flax.training.evaluate import array_eval_batches, evaluate_batches, global_eval_batch
from resnet_flax.training.optim import OptimConfig, make_optimizer, make_schedule
from resnet_flax.training.runtime import make_mesh, put_replicated
from resnet_flax.training.state import initial_state, seed_run_dirs, seed_state, stack_seeds
from resnet_flax.training.steps import Compiled, build_functions, run_steps

log = logging.getLogger(__name__)


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
