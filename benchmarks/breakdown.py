"""Where a sweep's time went: each run's recorded phases (summary.json "timings") as parts."""

from __future__ import annotations

from pathlib import Path

from resnet_flax.analysis.runs import find_run_dirs
from resnet_flax.rundir import read_summary

# The phases whose compilations are their own part (the initialisation programs, the training
# step, the evaluation program); compilation in any other phase is one more part.
COMPILED_PHASES = ("set_up", "train", "eval")
# The parts of a job, ours and the PyTorch twin's, as the report names them. records_s is in
# results measured before the loop recorded its own phases (it is in other_s since).
PARTS = (
    ("startup_s", "start-up: process, imports, Hydra (ours) / pool (PyTorch)"),
    ("data_s", "data: load the digits, normalise"),
    ("set_up_s", "set-up: model init, device put (PyTorch: build the net)"),
    ("set_up_compile_s", "compile: initialisation programs"),
    ("train_compile_s", "compile: training step"),
    ("eval_compile_s", "compile: evaluation program"),
    ("other_compile_s", "compile: in data loading and checkpointing"),
    ("train_s", "training"),
    ("eval_s", "evaluation"),
    ("checkpoint_s", "checkpointing"),
    ("records_s", "metrics records and summary"),
    ("other_s", "other (loop, metric lines, progress bar, summary)"),
    ("total_s", "job total"),
)
# The summary.json fields a job's breakdown keeps.
SUMMARY_FIELDS = (
    "model",
    "depth",
    "status",
    "final_train_error",
    "final_test_error",
    "compile_time_s",
    "wall_time_s",
    "images_per_sec",
)


def job_breakdown(summary: dict, num: int) -> dict:
    """One run's seconds per part (PARTS) from its summary, its cache hits, largest programs.

    The job starts at its process's start (a reused worker: at its previous run's end) and
    ends when train() returned its summary.
    """
    t = summary["timings"]
    compiled = dict(t["compile_s"])
    out = {"num": num, **{k: summary.get(k) for k in SUMMARY_FIELDS}}
    out["reused_worker"] = t["reused_process"]
    out["startup_s"] = t["startup_s"] or 0.0
    for phase in ("data", "set_up", "train", "eval", "checkpoint"):
        out[f"{phase}_s"] = t[f"{phase}_s"]
    for phase in COMPILED_PHASES:
        out[f"{phase}_compile_s"] = compiled.pop(phase, 0.0)
    out["other_compile_s"] = sum(compiled.values())
    out["total_s"] = out["startup_s"] + t["total_s"]
    counted = [key for key, _ in PARTS if key not in ("other_s", "total_s") and key in out]
    out["other_s"] = out["total_s"] - sum(out[key] for key in counted)
    out["compile_s"] = sum(t["compile_s"].values())
    cache = summary.get("compile_cache") or {}  # the persistent cache's lookups (a run's own)
    out["cache_hits"], out["cache_misses"] = cache.get("hits"), cache.get("misses")
    out["programs"] = dict(list(t["programs"].items())[:4])  # the largest, as recorded
    out["started_at"], out["ended_at"] = t["started_at"], t["ended_at"]
    return out


def twin_breakdown(job: dict) -> dict:
    """A PyTorch twin job's seconds in the same parts (it compiles nothing, records in memory)."""
    out = {k: job[k] for k in ("model", "depth", "final_train_error", "final_test_error")}
    out.update({k: job[k] for k in ("startup_s", "data_s", "train_s", "eval_s", "total_s")})
    out.update(set_up_s=job["build_s"], checkpoint_s=job["checkpoint_s"])
    out["reused_worker"] = job["reused_worker"]
    parts = ("startup_s", "data_s", "set_up_s", "train_s", "eval_s", "checkpoint_s")
    out["other_s"] = job["total_s"] - sum(out[k] for k in parts)
    return out


def sweep_breakdown(sweep_dir: Path, launched: float, exited: float) -> dict:
    """A sweep's jobs in the order they started, and the time before the first and after the last.

    `launched` and `exited` are the sweep command's start and end (epoch seconds).
    """
    summaries = [read_summary(d) for d in find_run_dirs([sweep_dir])]
    summaries = sorted((s for s in summaries if "timings" in s), key=started_at)
    jobs = [job_breakdown(s, num) for num, s in enumerate(summaries)]
    out = {"wall_s": exited - launched, "jobs": jobs, "job_seconds": part_totals(jobs)}
    if jobs:  # the sweep's own start-up, and Hydra's end after the last run
        out["first_train_call_s"] = min(j["started_at"] for j in jobs) - launched
        out["after_last_job_s"] = exited - max(j["ended_at"] for j in jobs)
    return out


def started_at(summary: dict) -> float:
    """When a run's train() was called (epoch seconds)."""
    return summary["timings"]["started_at"]


def part_totals(jobs: list[dict]) -> dict[str, float]:
    """Each part's seconds summed over the jobs (job-seconds: jobs run side by side)."""
    keys = [key for key, _ in PARTS if any(key in j for j in jobs)]
    return {key: sum(j.get(key) or 0.0 for j in jobs) for key in keys}
