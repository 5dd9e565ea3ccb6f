"""Print a model's per-stage table and a JSON line with params, weighted layers and MACs."""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from experiments.cli.model_config import model_spec
from experiments.cli.preflight import run_checked
from resnet_flax.models.counts import summarize
from resnet_flax.models.spec import SpecError


@hydra.main(version_base="1.3", config_path="../conf", config_name="model_info")
def main(cfg: DictConfig) -> None:
    """Summarise the configured network without compiling anything."""
    try:
        spec, input_size = model_spec(cfg)
        summary = summarize(spec, input_size)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{spec.model} net, {spec.family} family, depth {spec.depth}, shortcut {spec.shortcut}")
    print(f"input {'x'.join(map(str, summary.input_shape[1:]))}, {spec.num_classes} classes")
    header = f"{'stage':>5} {'blocks':>6} {'block':>10} {'width':>5} {'out':>5} {'map':>7}"
    print(header)
    for row in summary.stages:
        print(
            f"{row['stage']:>5} {row['blocks']:>6} {row['block']:>10} {row['width']:>5} "
            f"{row['out_channels']:>5} {row['output_map']:>7}"
        )
    print(
        f"params {summary.params:,}  weighted layers {summary.weighted_layers}  "
        f"MACs {summary.macs / 1e6:,.2f}M"
    )
    print(
        json.dumps(
            {
                "params": summary.params,
                "weighted_layers": summary.weighted_layers,
                "macs": summary.macs,
                "model": spec.model,
                "depth": spec.depth,
                "family": spec.family,
                "shortcut": spec.shortcut,
                "num_classes": spec.num_classes,
            }
        )
    )


if __name__ == "__main__":
    run_checked(main, "model_info", model_spec)
