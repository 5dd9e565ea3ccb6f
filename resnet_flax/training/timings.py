"""Where a run's time goes, as the loop records it in summary.json under "timings".

Phases (seconds of this call of train(), compilation taken out of each):
    startup_s     the process's start (or the end of the previous run this process trained,
                  a reused sweep worker) to train() being called: imports, Hydra, launcher
    data_s        opening the data (loading, normalising, or starting the input stream)
    set_up_s      initialisation: the nets, their states, the program, the data on device
    train_s       the training chunks
    eval_s        the evaluations (with their metric lines)
    checkpoint_s  restoring, saving and finishing checkpoints
    compile_s     {phase: seconds} compiling inside each phase (tracing, lowering, XLA or a
                  persistent-cache read), from JAX's own compilation events (jax.monitoring)
    programs      {program: seconds} of that compilation per compiled function
    total_s       train() from its call to the summary; what no phase covers is the loop's
                  own work (metric lines, progress bar, summary)
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import jax
import psutil

# JAX's time spans of one compilation: tracing to a jaxpr, lowering it, XLA compiling it
# (or reading it from the persistent cache).
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
PHASES = ("data", "set_up", "train", "eval", "checkpoint")

# When the last run trained in this process ended: a sweep worker reused for another job
# starts that job's start-up there, not at the process start.
_last_run_end: float | None = None


def process_start_time() -> float | None:
    """This process's start in epoch seconds; None where the platform does not tell."""
    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return None


def program_name(fun_name: str) -> str:
    """A compiled function's name without JAX's jit(...) wrapper."""
    match = re.fullmatch(r"jit\((.*)\)", fun_name)
    return match.group(1) if match else fun_name


def outermost(spans: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The spans not inside an earlier one (a jit traced inside another's trace counts once)."""
    kept: list[tuple[float, float, str]] = []
    for start, end, name in sorted(spans, key=lambda s: (s[0], -s[1])):
        if kept and end <= kept[-1][1]:
            continue
        # Overlapping without nesting (another thread's compile): only the new part counts.
        start = max(start, kept[-1][1]) if kept else start
        kept.append((start, end, name))
    return kept


class Timings:
    """The phases of one train() call, started when it is called."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        begin = process_start_time() if _last_run_end is None else _last_run_end
        self.startup_s = None if begin is None else max(0.0, self.started_at - begin)
        self.reused_process = _last_run_end is not None
        self.seconds: dict[str, float] = defaultdict(float)
        self.compile_s: dict[str, float] = defaultdict(float)
        self.programs: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as `name`, its compilations apart (JAX reports them as they end)."""
        if name not in PHASES:  # a misspelt phase would vanish from the record
            raise ValueError(f"phase must be one of {', '.join(PHASES)}; got {name!r}")
        spans: list[tuple[float, float, str]] = []

        def on_span(event: str, start: float, end: float, **kwargs) -> None:
            if event in COMPILE_EVENTS:
                spans.append((start, end, program_name(str(kwargs.get("fun_name", "")))))

        jax.monitoring.register_event_time_span_listener(on_span)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            jax.monitoring.unregister_event_time_span_listener(on_span)
            compiled = 0.0
            for start, end, program in outermost(spans):
                compiled += end - start
                self.programs[program] += end - start
            self.compile_s[name] += compiled
            self.seconds[name] += max(0.0, elapsed - compiled)

    def record(self) -> dict:
        """The summary.json "timings" of the run so far; this process's last run ends now."""
        global _last_run_end
        _last_run_end = time.time()
        ranked = sorted(self.programs.items(), key=lambda kv: -kv[1])
        return {
            "startup_s": self.startup_s,
            "reused_process": self.reused_process,
            **{f"{p}_s": self.seconds.get(p, 0.0) for p in PHASES},
            "compile_s": {p: self.compile_s.get(p, 0.0) for p in PHASES},
            "programs": {name: round(s, 3) for name, s in ranked},
            "total_s": time.perf_counter() - self._t0,
            "started_at": self.started_at,
            "ended_at": _last_run_end,
        }
