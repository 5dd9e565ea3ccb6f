"""The training step's compile time, images/s and memory; optionally PyTorch eager's step.

Run: python -m benchmarks.step_time [--models ...] [--depths ...] [--torch] ...
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
from collections.abc import Iterator

from benchmarks.common import (
    UsageError,
    add_output_args,
    exit_code,
    parser,
    provenance,
    require_torch,
    results_dir,
)
from resnet_flax.models.spec import ModelSpec, SpecError, check_bn_batch, resolve
from resnet_flax.training.cpu_devices import (
    CpuDevicesError,
    cpu_device_count,
    pin_cores,
    use_cpu_devices,
)


def bn_batch_arg(text: str) -> int | None:
    """--bn-batches value: a positive integer, or 'batch' for the whole batch."""
    if text in ("batch", "none", "null"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'batch', got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line."""
    p = parser("benchmarks.step_time", __doc__)
    p.add_argument("--models", nargs="+", default=["plain", "residual"])
    p.add_argument("--depths", nargs="+", type=int, default=[20, 56, 110])
    p.add_argument("--family", default="cifar", choices=["cifar", "imagenet"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    p.add_argument("--precisions", nargs="+", default=["float32"])
    p.add_argument("--conv-impls", nargs="+", default=["auto"])
    p.add_argument("--stage-loops", nargs="+", default=["auto"], help="auto | scan | unroll")
    p.add_argument(
        "--bn-batches",
        nargs="+",
        type=bn_batch_arg,
        default=[None],
        metavar="N|batch",
        help="images per BatchNorm statistics group (batch: the whole batch; 64: the paper's "
        "batch 128 on two GPUs)",
    )
    p.add_argument("--step-loop", default="auto", help="auto | scan | python")
    p.add_argument("--remat", action="store_true")
    p.add_argument(
        "--vmap-seeds",
        nargs="+",
        type=int,
        default=[1],
        help="seeds trained as one program (images/s counts all seeds)",
    )
    p.add_argument(
        "--cpu-devices",
        default="auto",
        help="CPU only: XLA devices the host is split into, the batch sharded over them "
        "(auto: one per core; 1: a single device using every core through XLA's thread pool)",
    )
    p.add_argument(
        "--cores",
        type=int,
        default=None,
        help="CPU only: run on the first N cores (JAX and the PyTorch baseline alike); "
        "1 gives a per-core comparison (JAX on one single-threaded device, PyTorch on one "
        "thread)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="benchmark the nets a preset sweeps (conf/experiment/NAME.yaml: its model and depth "
        "values, batch size and iterations) and estimate the preset's wall time on this device",
    )
    p.add_argument("--compile-only", action="store_true", help="measure compile time only")
    p.add_argument("--image-size", type=int, default=None, help="default: 32 or 224")
    p.add_argument("--steps", type=int, default=10, help="steps per compiled chunk")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time each step in this many rounds of --repeats; with --torch, PyTorch's rounds "
        "alternate with JAX's (PyTorch runs in its own process)",
    )
    p.add_argument("--torch", action="store_true", help="also time PyTorch eager (CPU)")
    p.add_argument(
        "--input",
        default=None,
        metavar="DATASET",
        help="also measure the streaming input pipeline of imagenet2012 | imagenette "
        "(images/s delivered on this host, next to the training images/s)",
    )
    p.add_argument("--data-dir", default=None, help="TFDS data_dir of --input")
    p.add_argument("--augmentation", default="random_resized_crop", help="for --input")
    p.add_argument("--input-batches", type=int, default=20, help="batches timed for --input")
    add_output_args(p, "a timestamp")
    return p.parse_args(argv)


def preset_jobs(name: str) -> tuple[list[tuple[str, int]], int, int, int | None]:
    """The (model, depth) jobs a preset sweeps, its batch size, iterations per run, bn_batch."""
    from experiments.cli.train_config import compose_train

    cfg = compose_train([f"experiment={name}"])
    params = {k: str(v).split(",") for k, v in (cfg.hydra.sweeper.params or {}).items()}
    other = sorted(set(params) - {"model", "depth"})
    if other:
        raise SpecError(f"--preset estimates model/depth sweeps; {name} also sweeps {other}")
    models = [m.strip() for m in params.get("model", [cfg.model])]
    depths = [int(d) for d in params.get("depth", [cfg.depth])]
    jobs = [(m, d) for m in models for d in depths]
    bn_batch = None if cfg.bn_batch is None else int(cfg.bn_batch)
    return jobs, int(cfg.trainer.batch_size), int(cfg.trainer.iterations), bn_batch


def apply_preset(args: argparse.Namespace) -> tuple[list[tuple[str, int]], int] | None:
    """With --preset: take the nets, batch size and bn_batch it sweeps; its jobs and length."""
    if not args.preset:
        return None
    try:
        jobs, batch, iterations, bn_batch = preset_jobs(args.preset)
    except Exception as err:  # an unknown preset: Hydra's message, in one line
        raise UsageError(f"--preset {args.preset}: {err}".splitlines()[0]) from err
    args.models = list(dict.fromkeys(m for m, _ in jobs))
    args.depths = list(dict.fromkeys(d for _, d in jobs))
    args.batch_sizes = [batch]
    args.bn_batches = [bn_batch]
    return jobs, iterations


def make_cases(args: argparse.Namespace) -> list[tuple]:
    """Every combination of the requested settings, each checked before anything compiles."""
    cases = list(
        itertools.product(
            args.models,
            args.depths,
            args.batch_sizes,
            args.precisions,
            args.conv_impls,
            args.stage_loops,
            args.vmap_seeds,
            args.bn_batches,
        )
    )
    try:
        for model, depth, batch, *_, bn_batch in cases:
            resolve(ModelSpec(model=model, depth=depth, family=args.family, bn_batch=bn_batch))
            check_bn_batch(bn_batch, batch)
    except SpecError as err:
        raise UsageError(str(err)) from err
    return cases


def set_up_backends(args: argparse.Namespace, cases: list[tuple]) -> None:
    """Pin cores and split the CPU before JAX starts; check PyTorch before anything compiles."""
    try:
        if args.cores is not None:
            pin_cores(args.cores)  # before JAX starts: its thread pools size to these cores
        count = cpu_device_count(args.cpu_devices, args.batch_sizes)
        use_cpu_devices(count, single_threaded=args.cores == 1)
    except CpuDevicesError as err:
        raise UsageError(str(err)) from err
    if not args.torch:
        return
    from benchmarks.torch_baseline import check_torch_spec

    require_torch("--torch")
    try:
        for model, depth in dict.fromkeys((m, d) for m, d, *_ in cases):
            check_torch_spec(ModelSpec(model=model, depth=depth, family=args.family))
    except ValueError as err:
        raise UsageError(f"--torch: {err}") from err


@contextlib.contextmanager
def cold_compiles() -> Iterator[None]:
    """The persistent compilation cache off while the benchmark times compiles, then as before.

    Compile times are measured cold, never read from $JAX_COMPILATION_CACHE_DIR (which `make`
    sets for training runs); JAX decides once per process whether it uses the cache, so that
    decision is reset on the way in and out (a benchmark called in-process leaves it on).
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


class ResultFiles:
    """The benchmark's JSON and Markdown files, rewritten after every row."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None):
        self.out = results_dir(args.out)
        self.stem = args.name or time.strftime("%Y%m%d-%H%M%S")
        self.meta = provenance("benchmarks.step_time", argv)
        self.cores_text = (
            "all" if args.cores is None else f"{args.cores} (pinned: {self.meta['cores']})"
        )
        self.rows: list[dict] = []

    def save(self, row: dict | None = None, estimate: str = "") -> None:
        """Add a row and rewrite both files: a run cut short keeps every row it measured."""
        from benchmarks.step_timer import markdown_table

        if row is not None:
            print(json.dumps(row), flush=True)
            self.rows.append(row)
        self.out.mkdir(parents=True, exist_ok=True)
        data = {**self.meta, "preset_estimate": estimate.replace("  \n", "\n").strip() or None}
        (self.out / f"{self.stem}.json").write_text(
            json.dumps({**data, "rows": self.rows}, indent=2) + "\n"
        )
        (self.out / f"{self.stem}.md").write_text(
            f"# Benchmark {self.stem}\n\nCommand: `{self.meta['command']}`  \n"
            f"Commit: `{self.meta['git_commit']}`  \n"
            f"Machine: {self.meta['machine']}  \nCores used: {self.cores_text}\n\n"
            f"{estimate}\n{markdown_table(self.rows)}\n"
        )


def measure_input(args: argparse.Namespace, size: int, files: ResultFiles) -> None:
    """The streaming input pipeline's images/s on this host (a missing dataset fails here)."""
    from benchmarks.step_timer import input_row
    from resnet_flax.data.memory import DataError

    try:
        row = input_row(
            args.input,
            args.data_dir,
            args.batch_sizes[0],
            size,
            args.augmentation,
            args.input_batches,
        )
    except DataError as err:
        raise UsageError(str(err)) from err
    files.save(row)


def time_cases(args: argparse.Namespace, cases: list[tuple], size: int, files: ResultFiles) -> None:
    """Time JAX's step for every case and, with --torch, PyTorch's once per net and grouping."""
    from benchmarks.step_timer import BenchCase, run_case
    from benchmarks.torch_baseline import TorchStepTimer

    torch_done: set[tuple[str, int, int | None]] = set()
    for model, depth, batch, precision, impl, stage_loop, seeds, bn_batch in cases:
        case = BenchCase(
            model,
            depth,
            args.family,
            batch,
            size,
            precision,
            impl,
            args.remat,
            stage_loop,
            args.step_loop,
            seeds,
            bn_batch,
        )
        # PyTorch times each net (and BN grouping) once, at the first batch size, alternating
        # with JAX's rounds.
        timer = None
        if args.torch and not args.compile_only and (model, depth, bn_batch) not in torch_done:
            torch_done.add((model, depth, bn_batch))
            spec = ModelSpec(model=model, depth=depth, bn_batch=bn_batch)
            timer = TorchStepTimer(spec, args.batch_sizes[0], size, args.steps)
        try:
            after_round = None if timer is None else (lambda t=timer: t.time(args.repeats))
            row = run_case(
                case, args.steps, args.repeats, args.compile_only, args.rounds, after_round
            )
        finally:
            if timer is not None:
                timer.close()
        files.save({"framework": "jax", **row})
        if timer is not None:
            files.save(timer.row())


def preset_estimate(
    args: argparse.Namespace, jobs: list[tuple[str, int]], iterations: int, rows: list[dict]
) -> str:
    """The preset's estimated wall time on this device, one line per precision."""
    from benchmarks.step_timer import preset_estimate_h

    jax_rows = [r for r in rows if r.get("framework") == "jax"]
    estimate = ""
    for precision in args.precisions:
        hours = preset_estimate_h(
            [r for r in jax_rows if r["precision"] == precision], jobs, iterations
        )
        line = (
            f"Estimated wall time of the {args.preset} preset on this device, {precision}: "
            f"{hours:.2f} h ({len(jobs)} runs x {iterations} iterations, one after "
            "another, compile included, evaluation excluded)"
        )
        print(line, flush=True)
        estimate += line + "  \n"
    return estimate


def main(argv: list[str] | None = None) -> int:
    """Run every requested case and write JSON and Markdown results."""
    return exit_code(lambda: benchmark(parse_args(argv), argv))


def benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Check every case, then time each, the files rewritten after every row."""
    size = args.image_size or (32 if args.family == "cifar" else 224)
    preset = apply_preset(args)
    cases = make_cases(args)
    set_up_backends(args, cases)
    files = ResultFiles(args, argv)
    with cold_compiles():
        if args.input:
            measure_input(args, size, files)
        time_cases(args, cases, size, files)
    estimate = ""
    if preset is not None and not args.compile_only:
        estimate = preset_estimate(args, *preset, files.rows)
    files.save(estimate=estimate)
    print(f"wrote {files.out / files.stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
