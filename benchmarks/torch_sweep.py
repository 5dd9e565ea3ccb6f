"""The PyTorch eager twin of the demo sweep in a process of its own: RECIPE.json -> OUT.json.

Run by benchmarks.demo_vs_torch as `python -m benchmarks.torch_sweep RECIPE.json OUT.json`;
it never imports JAX, so its start-up is PyTorch's alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.twin import TwinRecipe, run_sweep


def main(argv: list[str] | None = None) -> int:
    """Run the recipe in RECIPE.json and write the results to OUT.json."""
    # No benchmarks.common: its imports would count as PyTorch's start-up.
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_sweep", description=__doc__)
    p.add_argument("recipe", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    recipe = TwinRecipe.from_dict(json.loads(args.recipe.read_text()))
    args.out.write_text(json.dumps(run_sweep(recipe), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
