"""The digits demo sweep in PyTorch eager: the same nets, split, recipe, evaluations and jobs.

It runs in a process of its own (benchmarks.torch_sweep); neither that process nor its workers
import JAX, so their start-up is PyTorch's alone.
"""

from __future__ import annotations

import itertools
import multiprocessing
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

from benchmarks.torch_baseline import build_torch_model, check_torch_spec
from resnet_flax.data.memory import load_digits
from resnet_flax.models.spec import ModelSpec


@dataclass(frozen=True)
class TwinRecipe:
    """Everything a job of the twin trains with, as plain values (our preset's)."""

    jobs: tuple[tuple[str, int], ...]  # (model, depth) in the order the sweep dispatches them
    n_jobs: int  # jobs at a time, one single-threaded process each
    iterations: int
    batch_size: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    eval_batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    warmup_iterations: int
    seed: int = 0
    bn_momentum: float = 0.9  # Flax's convention: PyTorch's momentum is 1 minus this
    bn_epsilon: float = 1e-5

    @classmethod
    def from_dict(cls, fields: dict) -> TwinRecipe:
        """A recipe from its JSON form."""
        jobs = tuple((str(m), int(d)) for m, d in fields["jobs"])
        return cls(**{**fields, "jobs": jobs})


def twin_recipe(
    spec: ModelSpec, data_cfg, optim, trainer, seed: int, jobs: list, n_jobs: int
) -> TwinRecipe:
    """The twin's recipe from our run configuration; ValueError for what the twin lacks."""
    unsupported = {
        "dataset other than digits": data_cfg.name != "digits",
        "augmentation (crop_padding, flip)": data_cfg.crop_padding > 0 or data_cfg.flip,
        "normalization other than pixel_mean": data_cfg.normalization != "pixel_mean",
        "a validation split": data_cfg.validation_size > 0,
        "schedule other than constant": optim.schedule != "constant",
        "nesterov, decay_all or warmup_lr": optim.nesterov or optim.decay_all or optim.warmup_lr,
        "bn_batch or bfloat16": spec.bn_batch is not None or spec.precision != "float32",
        "vmap_seeds > 1": trainer.vmap_seeds != 1,
        "shortcut other than A": spec.shortcut != "A",
    }
    bad = [what for what, found in unsupported.items() if found]
    if bad:
        raise ValueError(f"the PyTorch twin does not implement: {', '.join(bad)}")
    for model, depth in jobs:
        check_torch_spec(spec.replace(model=model, depth=depth))
    return TwinRecipe(
        jobs=tuple((str(m), int(d)) for m, d in jobs),
        n_jobs=int(n_jobs),
        iterations=trainer.iterations,
        batch_size=trainer.batch_size,
        log_every=trainer.log_every,
        eval_every=trainer.eval_every,
        checkpoint_every=trainer.checkpoint_every,
        eval_batch_size=trainer.eval_batch_size,
        lr=optim.lr,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
        warmup_iterations=optim.linear_warmup_iterations,
        seed=seed,
        bn_momentum=spec.bn_momentum,
        bn_epsilon=spec.bn_epsilon,
    )


def sweep_jobs(params: dict, model: str, depth: int) -> list[tuple[str, int]]:
    """(model, depth) of each job of a Hydra basic sweep over `params`, in the sweep's order.

    Hydra's basic sweeper runs the product of the swept values, the first swept key outermost;
    a key it does not sweep keeps the config's value.
    """
    swept = {k: [v.strip() for v in str(values).split(",")] for k, values in params.items()}
    other = sorted(set(swept) - {"model", "depth"})
    if other:
        raise ValueError(f"the PyTorch twin sweeps model and depth only; got {other}")
    jobs = []
    for values in itertools.product(*swept.values()):
        job = {"model": model, "depth": depth, **dict(zip(swept, values, strict=True))}
        jobs.append((str(job["model"]), int(job["depth"])))
    return jobs


def twin_lr(recipe: TwinRecipe, step: int) -> float:
    """The learning rate of a step: a linear ramp from 0 over the warm-up, then constant."""
    warm = recipe.warmup_iterations
    return recipe.lr * step / warm if step < warm else recipe.lr


def pixel_mean(x_train: np.ndarray) -> np.ndarray:
    """The mean training image on the 0-1 scale (our pixel_mean normalisation, std 1)."""
    return (x_train.astype(np.float64) / 255.0).mean(axis=0).astype(np.float32)


def normalised_nchw(x: np.ndarray, mean: np.ndarray):
    """uint8 NHWC images as mean-subtracted float32 NCHW tensors."""
    import torch

    x = x.astype(np.float32) / 255.0 - mean
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def build_twin(recipe: TwinRecipe, model: str, depth: int, in_channels: int, num_classes: int):
    """The PyTorch net initialised as ours: He-normal convs, 1/sqrt(fan_in) linear, zero bias."""
    import torch
    from torch import nn

    torch.manual_seed(recipe.seed)
    spec = ModelSpec(model=model, depth=depth, in_channels=in_channels, num_classes=num_classes)
    net = build_torch_model(spec)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.Linear):  # its default weight bound is ours; our bias starts at 0
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.momentum, m.eps = 1.0 - recipe.bn_momentum, recipe.bn_epsilon
    return net


def decayed_parameters(net) -> tuple[list, list]:
    """(conv and linear weights, everything else): our L2 decay applies to the first only."""
    from torch import nn

    decay, rest = [], []
    for module in net.modules():
        for name, p in module.named_parameters(recurse=False):
            weight = name == "weight" and isinstance(module, nn.Conv2d | nn.Linear)
            (decay if weight else rest).append(p)
    return decay, rest


def make_twin_optimizer(net, recipe: TwinRecipe):
    """SGD with momentum and coupled L2 decay on weights only, as our optax chain."""
    import torch

    decay, rest = decayed_parameters(net)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=0.0, momentum=recipe.momentum)


def evaluate(net, x, y, batch: int) -> tuple[float, float]:
    """Mean loss and error in eval mode over a whole split."""
    import torch
    import torch.nn.functional as F

    net.eval()
    loss, wrong = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            logits = net(x[start : start + batch])
            target = y[start : start + batch]
            loss += float(F.cross_entropy(logits, target, reduction="sum"))
            wrong += int((logits.argmax(1) != target).sum())
    net.train()
    return loss / len(x), wrong / len(x)


def train_twin(recipe: TwinRecipe, model: str, depth: int, checkpoint_dir: str) -> dict:
    """Train one net as our loop does; its final errors and where its time went."""
    import torch
    import torch.nn.functional as F

    t0 = time.time()
    data = load_digits()
    mean = pixel_mean(data.x_train)
    x_train, x_test = normalised_nchw(data.x_train, mean), normalised_nchw(data.x_test, mean)
    y_train, y_test = torch.from_numpy(data.y_train).long(), torch.from_numpy(data.y_test).long()
    # As ours: the evaluation batch is no larger than the smallest split.
    eval_batch = min(recipe.eval_batch_size, len(x_train), len(x_test))
    t1 = time.time()
    net = build_twin(recipe, model, depth, x_train.shape[1], data.num_classes)
    opt = make_twin_optimizer(net, recipe)
    rng = np.random.default_rng(recipe.seed)
    n, batch = len(x_train), recipe.batch_size
    steps_per_epoch = n // batch  # the last partial batch of each epoch is dropped, as ours
    times = {"data_s": t1 - t0, "build_s": time.time() - t1, "train_s": 0.0, "eval_s": 0.0}
    times["checkpoint_s"] = 0.0

    def timed(key, fn, *args):
        start = time.time()
        out = fn(*args)
        times[key] += time.time() - start
        return out

    test_curve = []

    def test_eval(iteration):
        test_curve.append((iteration, *timed("eval_s", evaluate, net, x_test, y_test, eval_batch)))

    test_eval(0)  # the curves start at the untrained network, as ours
    iteration, order = 0, None
    while iteration < recipe.iterations:
        length = min(recipe.log_every, recipe.iterations - iteration)
        start = time.time()
        for i in range(iteration, iteration + length):
            pos = i % steps_per_epoch
            if pos == 0:  # a fresh permutation at each epoch start
                order = torch.from_numpy(rng.permutation(n))
            idx = order[pos * batch : (pos + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = twin_lr(recipe, i)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
        loss.item()  # one host read per interval, as our metrics line
        times["train_s"] += time.time() - start
        iteration += length
        done = iteration >= recipe.iterations
        if iteration % recipe.eval_every == 0 or done:
            test_eval(iteration)
        if iteration % recipe.checkpoint_every == 0 or done:
            state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": iteration}
            path = Path(checkpoint_dir) / f"{model}-{depth}.pt"
            timed("checkpoint_s", torch.save, state, path)
    final = timed("eval_s", evaluate, net, x_train, y_train, eval_batch)
    return {
        "model": model,
        "depth": depth,
        "params": sum(p.numel() for p in net.parameters()),
        "final_train_error": final[1],
        "final_test_error": test_curve[-1][2],
        "test_curve": test_curve,
        **times,
    }


_worker: dict = {}  # this worker process's start and the end of its previous job


def _start_worker() -> None:
    """Pool initializer: one single-threaded PyTorch per process, as ours has one device."""
    _worker["process_start"] = psutil.Process().create_time()
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def _run_job(task: tuple) -> dict:
    """One job in a pool worker, with its start-up since the worker or its previous job."""
    recipe, model, depth, checkpoint_dir = task
    entry = time.time()
    begin = _worker.get("last_end") or _worker.get("process_start") or entry
    result = train_twin(TwinRecipe.from_dict(recipe), model, depth, checkpoint_dir)
    end = time.time()
    import torch

    result.update(
        worker=multiprocessing.current_process().name,
        reused_worker="last_end" in _worker,
        startup_s=entry - begin,
        total_s=end - begin,
        framework=f"pytorch {torch.__version__} eager",
        threads=torch.get_num_threads(),
    )
    _worker["last_end"] = end
    return result


def run_sweep(recipe: TwinRecipe, checkpoint_dir: str | None = None) -> dict:
    """Every job of the recipe, n_jobs at a time in its order; their results and the wall time."""
    start = time.time()
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as the sweep's workers
    with tempfile.TemporaryDirectory(prefix="torch_sweep_") as tmp:
        tasks = [(asdict(recipe), m, d, checkpoint_dir or tmp) for m, d in recipe.jobs]
        workers = min(recipe.n_jobs, len(tasks))
        with ctx.Pool(workers, initializer=_start_worker) as pool:
            jobs = list(pool.imap(_run_job, tasks, chunksize=1))
    return {
        "framework": jobs[0]["framework"],
        "n_jobs": workers,
        "threads_per_job": jobs[0]["threads"],
        "pool_wall_s": time.time() - start,
        "jobs": jobs,
    }
