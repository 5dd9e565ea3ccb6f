"""Layer diagnostics of trained runs (Fig. 7 response std, gradient flow) into analysis.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resnet_flax.analysis.runs import find_run_dirs


def main(argv: list[str] | None = None) -> int:
    """Analyse each run directory found under the given paths, then redraw nothing: see plot."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="+", help="run directories or sweep directories")
    p.add_argument("--grad-batch", type=int, default=256)
    p.add_argument(
        "--allow-older-checkpoint",
        action="store_true",
        help="analyse the newest checkpoint that restores even when it is older than the "
        "run's final iteration in summary.json (by default such a run is skipped)",
    )
    p.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="analyse the newest checkpoint of a run that did not complete (interrupted, "
        "failed, or killed: by default such a run is skipped)",
    )
    args = p.parse_args(argv)
    from resnet_flax.analysis.layer_stats import AnalysisError, analyze_run

    try:
        runs = find_run_dirs([Path(x) for x in args.paths])
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print("error: no run directories found under " + " ".join(args.paths), file=sys.stderr)
        return 1
    failures = 0
    for run in runs:
        try:
            result = analyze_run(
                run, args.grad_batch, args.allow_older_checkpoint, args.allow_unfinished
            )
        except AnalysisError as err:
            print(f"skip {run}: {err}", file=sys.stderr)
            failures += 1
            continue
        layers, at = len(result["layers"]), result["checkpoint_step"]
        print(f"{run}/analysis.json: {layers} layers of the checkpoint at iteration {at}")
    print("draw the figures with: python -m experiments.plot " + " ".join(args.paths))
    return 1 if failures == len(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
