"""Splitting the host CPU into single-threaded devices: the count chosen and what JAX gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_flax.training import cpu_devices
from resnet_flax.training.cpu_devices import CpuDevicesError, cpu_device_count

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "cores,batches,expected",
    [(2, [128], 2), (6, [128], 4), (8, [128, 96], 8), (3, [128], 2), (1, [128], 1), (4, [7], 1)],
)
def test_auto_is_the_most_devices_that_split_every_batch_within_the_cores(
    monkeypatch, cores, batches, expected
):
    monkeypatch.setattr(cpu_devices, "usable_cores", lambda: cores)
    assert cpu_device_count("auto", batches) == expected


def test_explicit_count_is_kept_or_rejected_with_what_to_do():
    assert cpu_device_count(4, [128]) == 4
    assert cpu_device_count("2", [128]) == 2
    with pytest.raises(CpuDevicesError, match="does not divide the batch size 100.*auto"):
        cpu_device_count(8, [128, 100])
    for bad in (0, -2, "many"):
        with pytest.raises(CpuDevicesError, match="'auto' or a positive integer"):
            cpu_device_count(bad, [128])


PROBE = """
import json, logging, os, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from resnet_flax.training.cpu_devices import use_cpu_devices
import jax
first = use_cpu_devices(int(sys.argv[1]))
devices = len(jax.devices())
again = use_cpu_devices(int(sys.argv[1]))
other = use_cpu_devices(int(sys.argv[1]) + 1)
print(json.dumps({"first": first, "again": again, "other": other, "devices": devices,
                  "flags": os.environ.get("XLA_FLAGS", "")}))
"""


def _probe(count: int, xla_flags: str | None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def test_use_cpu_devices_gives_jax_that_many_single_threaded_devices():
    result, log = _probe(2, None)
    assert result["first"] and result["again"] and result["devices"] == 2
    assert "--xla_cpu_multi_thread_eigen=false" in result["flags"]
    # Once JAX runs, another count cannot be had: the devices are kept and that is logged.
    assert result["other"] is False and "cpu_devices=3 is ignored" in log


def test_a_device_count_in_xla_flags_wins():
    result, _ = _probe(2, "--xla_force_host_platform_device_count=3")
    assert result["first"] is False and result["devices"] == 3
    assert "eigen" not in result["flags"]


PIN_PROBE = """
import json, multiprocessing, os, sys
from resnet_flax.training.cpu_devices import pin_cores

def child(q):
    q.put(sorted(os.sched_getaffinity(0)))

if __name__ == "__main__":
    kept = pin_cores(1)
    q = multiprocessing.get_context("spawn").Queue()
    p = multiprocessing.get_context("spawn").Process(target=child, args=(q,))
    p.start()
    print(json.dumps({"kept": kept, "self": sorted(os.sched_getaffinity(0)), "child": q.get()}))
    p.join()
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity")
def test_pin_cores_restricts_the_process_and_the_processes_it_starts(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PIN_PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(probe)], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    first = min(os.sched_getaffinity(0))
    assert result == {"kept": [first], "self": [first], "child": [first]}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity")
def test_pin_cores_rejects_a_count_outside_the_usable_cores_without_pinning():
    before = os.sched_getaffinity(0)
    for bad in (0, len(before) + 1):
        with pytest.raises(CpuDevicesError, match=f"between 1 and the {len(before)} usable"):
            cpu_devices.pin_cores(bad)
    assert os.sched_getaffinity(0) == before
