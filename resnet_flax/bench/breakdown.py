"""Where a sweep's time went: its jobs' records (experiments.job_timer) as phase totals."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

# JAX's time spans of one compilation: tracing to a jaxpr, lowering it, XLA compiling it
# (or reading it from the persistent cache).
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
BACKEND_COMPILE = COMPILE_EVENTS[2]
# The phases job_timer.HOOKS records; the compilations inside the first three are their own
# line (the initialisation programs, the training step, the evaluation program).
PHASES = ("data", "set_up", "train", "eval", "checkpoint", "records", "summary")
COMPILED_PHASES = ("set_up", "train", "eval")
# The parts of a job, ours and the PyTorch twin's, as the report names them.
PARTS = (
    ("startup_s", "start-up: process, imports, Hydra (ours) / pool (PyTorch)"),
    ("data_s", "data: load the digits, normalise"),
    ("set_up_s", "set-up: model init, device put (PyTorch: build the net)"),
    ("set_up_compile_s", "compile: initialisation programs"),
    ("train_compile_s", "compile: training step"),
    ("eval_compile_s", "compile: evaluation program"),
    ("train_s", "training"),
    ("eval_s", "evaluation"),
    ("checkpoint_s", "checkpointing"),
    ("records_s", "metrics records and summary"),
    ("other_s", "other (loop, progress bar, between phases)"),
    ("total_s", "job total"),
)


def union_s(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the intervals (nested or overlapping ones counted once)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def clip(intervals: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    """The parts of the intervals inside [lo, hi]."""
    return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


def program_name(fun_name: str) -> str:
    """A compiled function's name without JAX's jit(...) wrapper."""
    match = re.fullmatch(r"jit\((.*)\)", fun_name)
    return match.group(1) if match else fun_name


def job_breakdown(record: dict) -> dict:
    """One job's seconds per part (PARTS), its compilation-cache hits and largest programs.

    Start-up runs from the worker process's start (a reused worker: its previous job's end)
    to the job's first timed phase; a phase's compilations are counted apart from it.
    """
    phases, end = record["phases"], record["job_end"]
    entry = min((start for _, start, _ in phases), default=record["job_start"])
    begin = record.get("previous_job_end") or record.get("process_start") or record["job_start"]
    spans = [(a, b) for event, a, b, _ in record["spans"] if event in COMPILE_EVENTS]
    out = {"num": record["num"], "pid": record["pid"], **record.get("summary", {})}
    out["reused_worker"] = record.get("previous_job_end") is not None
    out["startup_s"] = entry - begin
    in_phases = 0.0
    for phase in PHASES:
        intervals = [(a, b) for p, a, b in phases if p == phase]
        total = sum(b - a for a, b in intervals)
        compiled = sum(union_s(clip(spans, a, b)) for a, b in intervals)
        in_phases += total
        if phase in COMPILED_PHASES:
            out[f"{phase}_s"], out[f"{phase}_compile_s"] = total - compiled, compiled
        else:
            out[f"{phase}_s"] = total
    out["records_s"] += out.pop("summary_s")
    out["other_s"] = end - entry - in_phases
    out["total_s"] = end - begin
    out["compile_s"] = union_s(clip(spans, entry, end))
    events = [event.rsplit("/", 1)[-1] for event, _ in record["events"]]
    out["cache_hits"] = events.count("cache_hits")
    out["cache_misses"] = events.count("cache_misses")
    out["programs"] = largest_programs(record["spans"])
    out["unhooked"] = record.get("unhooked", [])
    return out


def largest_programs(spans: list, count: int = 4) -> dict[str, float]:
    """Seconds of tracing, lowering and compiling per program name, the largest `count`."""
    seconds: dict[str, float] = defaultdict(float)
    for event, a, b, name in spans:
        if event in COMPILE_EVENTS:
            seconds[program_name(name)] += b - a
    ranked = sorted(seconds.items(), key=lambda kv: -kv[1])[:count]
    return {name: round(s, 3) for name, s in ranked}


def twin_breakdown(job: dict) -> dict:
    """A PyTorch twin job's seconds in the same parts (it compiles nothing, records in memory)."""
    out = {k: job[k] for k in ("model", "depth", "final_train_error", "final_test_error")}
    out.update({k: job[k] for k in ("startup_s", "data_s", "train_s", "eval_s", "total_s")})
    out.update(set_up_s=job["build_s"], checkpoint_s=job["checkpoint_s"])
    out["reused_worker"] = job["reused_worker"]
    parts = ("startup_s", "data_s", "set_up_s", "train_s", "eval_s", "checkpoint_s")
    out["other_s"] = job["total_s"] - sum(out[k] for k in parts)
    return out


def sweep_breakdown(timing_dir: Path, launched: float, exited: float) -> dict:
    """A sweep's jobs (in job order) and its own start-up and end, from job_timer's files."""
    records = [json.loads(p.read_text()) for p in Path(timing_dir).glob("job_*.json")]
    jobs = sorted((job_breakdown(r) for r in records), key=lambda j: j["num"])
    sweep_file = Path(timing_dir) / "sweep.json"
    sweep = json.loads(sweep_file.read_text()) if sweep_file.exists() else {}
    out = {"wall_s": exited - launched, "jobs": jobs, "job_seconds": part_totals(jobs)}
    if "multirun_start" in sweep:  # the main process's imports and Hydra's composition
        out["main_startup_s"] = sweep["multirun_start"] - launched
    if records:
        out["first_job_entry_s"] = min(r["job_start"] for r in records) - launched
        out["after_last_job_s"] = exited - max(r["job_end"] for r in records)
    return out


def part_totals(jobs: list[dict]) -> dict[str, float]:
    """Each part's seconds summed over the jobs (job-seconds: jobs run side by side)."""
    keys = [key for key, _ in PARTS if any(key in j for j in jobs)]
    return {key: sum(j.get(key) or 0.0 for j in jobs) for key in keys}
