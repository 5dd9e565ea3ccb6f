"""The demo-vs-PyTorch benchmark's result as JSON and Markdown (benchmarks.demo_vs_torch)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.breakdown import PARTS


def _cell(value: object) -> str:
    """A number for the tables: seconds to 0.1, '-' when missing."""
    if value is None:
        return "-"
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def _errors(job: dict) -> str:
    """Final training / test error in percent."""
    return f"{100 * job['final_train_error']:.1f} / {100 * job['final_test_error']:.1f}"


def markdown(result: dict) -> str:
    """The results as Markdown: wall times and ratio, final errors, where the time went."""
    ours, twin = result["ours"], result["torch"]
    runs = {f"ours, {k} compilation cache": r for k, r in ours.items()}
    lines = [
        f"# Demo sweep vs PyTorch eager\n\nCommand: `{result['command']}`  ",
        f"Commit: `{result['git_commit']}`  \nMachine: {result['machine']}  ",
        f"Cores: {result['cores']}; {twin['n_jobs']} jobs at a time, each one single-threaded "
        f"process (ours: one CPU device; {twin['framework']}: {twin['threads_per_job']} thread)  ",
        f"Our sweep: `{result['sweep_command']}`  ",
        f"Environment: {result['environment']}\n",
        "| run | wall s | / PyTorch | plots after it, s |",
        "|---|---|---|---|",
    ]
    for (name, run), key in zip(runs.items(), ours, strict=True):
        ratio = result["ratio_to_torch"][key]
        lines.append(f"| {name} | {run['wall_s']:.1f} | {ratio:.2f} | {_cell(run.get('plot_s'))} |")
    lines += [f"| PyTorch eager twin | {twin['wall_s']:.1f} | 1.00 | - |", ""]
    lines += ["Final training / test error, %:\n", "| net | ours | PyTorch |", "|---|---|---|"]
    twin_jobs = {(j["model"], j["depth"]): j for j in twin["jobs"]}
    for mine in next(iter(ours.values()))["jobs"]:
        theirs = twin_jobs.get((mine.get("model"), mine.get("depth")))
        net = f"{mine.get('model')}-{mine.get('depth')}"
        lines.append(f"| {net} | {_errors(mine)} | {_errors(theirs) if theirs else '-'} |")
    lines += ["", f"Seconds summed over the jobs ({twin['n_jobs']} run at a time):\n"]
    lines += ["| part | " + " | ".join(runs) + " | PyTorch |", "|---" * (len(runs) + 2) + "|"]
    for key, label in PARTS:
        cells = [_cell(r["job_seconds"].get(key)) for r in (*runs.values(), twin)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| launch to the first run's training call (imports, Hydra, workers) | "
        + " | ".join(_cell(r.get("first_train_call_s")) for r in runs.values())
        + " | - |"
    )
    for name, run in {**runs, "PyTorch eager twin": twin}.items():
        lines += ["", f"Jobs, {name}:\n", *job_table(run["jobs"])]
    return "\n".join(lines) + "\n"


def job_table(jobs: list[dict]) -> list[str]:
    """One line per job: its parts in seconds and its compilation-cache hits."""
    keys = [key for key, _ in PARTS if key not in ("records_s", "other_s")]
    head = "| job | net | worker reused | " + " | ".join(k[:-2] for k in keys)
    lines = [head + " | cache hits/misses |", "|---" * (len(keys) + 4) + "|"]
    for i, job in enumerate(jobs):
        cells = " | ".join(_cell(job.get(k)) for k in keys)
        net = f"{job.get('model')}-{job.get('depth')}"
        known = job.get("cache_hits") is not None
        hits = f"{job['cache_hits']}/{job['cache_misses']}" if known else "-"
        num = job.get("num", i)
        lines.append(f"| {num} | {net} | {job['reused_worker']} | {cells} | {hits} |")
    return lines


def write_results(out_dir: Path, stem: str, result: dict) -> tuple[Path, Path]:
    """The result as out_dir/stem.json and stem.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path
