"""Layer diagnostics of trained runs (Fig. 7 response std, gradient flow) into analysis.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resnet_flax.analysis.sweep_report import NoRuns, analyze_runs

EXAMPLES = """examples:
  python -m experiments.analyze results/sweeps/digits_degradation/<time>
  python -m experiments.analyze results/runs/default/<time> --grad-batch 128
  python -m experiments.analyze results/sweeps/<name>/<time> --allow-older-checkpoint
more: docs/usage.md (Plots and report)"""


def main(argv: list[str] | None = None) -> int:
    """Analyse each run directory found under the given paths (figures: experiments.plot)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.analyze",
        description=__doc__ + "\nReads each run's newest checkpoint; draw the figures "
        "afterwards with experiments.plot.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", type=Path, help="run directories or sweep directories")
    p.add_argument(
        "--grad-batch", type=int, default=256, help="training images in the gradient-flow batch"
    )
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
    try:
        allow = (args.allow_older_checkpoint, args.allow_unfinished)
        done, skipped = analyze_runs(args.paths, args.grad_batch, *allow)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NoRuns as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(done))
    print("\n".join(skipped), file=sys.stderr)
    print("draw the figures with: python -m experiments.plot " + " ".join(map(str, args.paths)))
    return 1 if not done else 0


if __name__ == "__main__":
    sys.exit(main())
