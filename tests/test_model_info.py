"""experiments.model_info inspects a network without importing training, data or Orbax."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("resnet_flax.training", "resnet_flax.data", "orbax", "tensorflow")


def test_model_info_imports_only_the_models():
    code = (
        "import experiments.model_info, sys; "
        "print('\\n'.join(sorted(m for m in sys.modules "
        "if m.startswith(('resnet_flax', 'orbax', 'tensorflow')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    modules = out.split()
    assert "resnet_flax.models.counts" in modules
    assert [m for m in modules if m.startswith(HEAVY)] == []


def test_an_added_key_is_refused_in_one_line():
    # Fails when `+lr=0.5` (Hydra's + adds keys the schema lacks) reaches ModelSpec as a
    # TypeError traceback, or is dropped silently.
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.model_info", "depth=20", "+lr=0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("error: unknown key(s) lr; valid: activation, block, bn_batch"), (
        proc.stderr
    )
