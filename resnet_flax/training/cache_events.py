"""The persistent compilation cache's events while a run sets up and trains."""

from __future__ import annotations

import collections

import jax

# summary.json's names for JAX's events (jax/_src/compiler.py and compilation_cache.py).
EVENTS = {
    "lookups": "/jax/compilation_cache/compile_requests_use_cache",
    "hits": "/jax/compilation_cache/cache_hits",  # read from the cache, not compiled
    "misses": "/jax/compilation_cache/cache_misses",  # compiled, then written to the cache
}
_totals: collections.Counter = collections.Counter()
_listening: list[bool] = []


def _count(event: str, **_: object) -> None:
    """jax.monitoring listener: one more of this event in this process."""
    _totals[event] += 1


class CacheEvents:
    """Counts of the cache's lookups, hits and misses since this object was made.

    One listener per process counts every event; each counter reports the difference, so
    runs one after another in a process (tests, a notebook) each see their own.
    """

    def __init__(self) -> None:
        if not _listening:
            jax.monitoring.register_event_listener(_count)
            _listening.append(True)
        self._start = {event: _totals[event] for event in EVENTS.values()}

    def counts(self) -> dict[str, int]:
        """{"lookups", "hits", "misses", "not_written"} since this counter was made.

        not_written: programs compiled and not kept (lookups that neither hit nor were
        written): quicker than jax_persistent_cache_min_compile_time_secs, or holding a host
        callback, which JAX never persists (the delta-orthogonal and SUO-delta draws).
        """
        out = {name: _totals[event] - self._start[event] for name, event in EVENTS.items()}
        out["not_written"] = out["lookups"] - out["hits"] - out["misses"]
        return out
