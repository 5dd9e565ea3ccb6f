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
