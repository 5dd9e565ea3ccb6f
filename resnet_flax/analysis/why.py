"""The why-study of a trained sweep: probes of every run, landscapes of the deepest plain and
residual nets, their figures, data and report.md."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from resnet_flax.analysis.landscape import LandscapeConfig
from resnet_flax.analysis.landscape_plots import landscape_figures
from resnet_flax.analysis.landscape_run import LandscapePlan, landscape_run, plan_landscape
from resnet_flax.analysis.layer_stats import AnalysisError
from resnet_flax.analysis.probe_plots import probe_figures
from resnet_flax.analysis.probe_study import probe_runs
from resnet_flax.analysis.probes import ProbeConfig
from resnet_flax.analysis.run_state import read_run
from resnet_flax.analysis.runs import find_run_dirs
from resnet_flax.analysis.why_report import landscape_markdown, probe_markdown

log = logging.getLogger(__name__)

# The two nets whose landscapes are compared (Li et al. Fig. 5: ResNet-56 with and without
# shortcuts).
LANDSCAPE_MODELS = ("plain", "residual")


@dataclass(frozen=True)
class StudyPlan:
    """A sweep checked for the study: its runs and the landscapes to compute."""

    run_dirs: tuple[Path, ...]
    landscapes: tuple[LandscapePlan, ...]


def plan_study(sweep_dir: str | Path, depth: int, landscape: LandscapeConfig) -> StudyPlan:
    """Find the runs and check the landscape nets (kept checkpoints) before any compile."""
    run_dirs = tuple(find_run_dirs([sweep_dir]))
    runs = [read_run(d) for d in run_dirs]
    plans = []
    for model in LANDSCAPE_MODELS:
        found = [r for r in runs if r.spec.model == model and r.spec.depth == depth]
        if not found:
            raise AnalysisError(f"no {model}-{depth} run under {sweep_dir} for its landscape")
        plans.append(plan_landscape(found[0].run_dir, landscape))
    return StudyPlan(run_dirs, tuple(plans))


def run_study(
    plan: StudyPlan,
    probe: ProbeConfig,
    landscape: LandscapeConfig,
    init_seeds: Sequence[int],
    out_dir: str | Path,
) -> dict:
    """Probe every run, compute the landscapes, write figures (+ their JSON) and report.md."""
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    t0 = time.perf_counter()
    probes = probe_runs(plan.run_dirs, probe, out_dir / "probes", init_seeds)
    probes_s = time.perf_counter() - t0
    landscapes = [
        landscape_run(p, landscape, out_dir / "landscapes" / p.run.run_dir.name)
        for p in plan.landscapes
    ]
    landscapes_s = time.perf_counter() - t0 - probes_s
    probe_figures(probes, figures)
    landscape_figures(landscapes, figures)
    # The figures' data beside them: every probe result, every surface without directions.
    (figures / "probes.json").write_text(json.dumps(probes, indent=1) + "\n")
    (figures / "landscapes.json").write_text(json.dumps(landscapes, indent=1) + "\n")
    timing = {"probes_s": probes_s, "landscapes_s": landscapes_s}
    (out_dir / "report.md").write_text(report(probes, landscapes, timing, probe, landscape))
    return {"probes": probes, "landscapes": landscapes, **timing}


def report(
    probes: Sequence[dict],
    landscapes: Sequence[dict],
    timing: dict,
    probe: ProbeConfig,
    landscape: LandscapeConfig,
) -> str:
    """The study's report.md."""
    side = landscape.points_2d
    return f"""# Why plain nets degrade: probes and loss landscapes

Every run of the sweep is probed at initialisation (its seed, plus fresh draws) and at its
last checkpoint; the deepest plain and residual nets get loss landscapes. Probes took
{timing["probes_s"]:.0f} s and the landscapes {timing["landscapes_s"]:.0f} s, compile included.

## Probes (`probes_vs_depth.png`, `shattered_gradients.png`, `signal_propagation_*.png`)

- *Shattered gradients* (Balduzzi et al. 2017): g(t) = d logit_y / dt along {probe.lines}
  lines x0 + t u through training images, {probe.points} points on t in [-{probe.span:g},
  {probe.span:g}], u Gaussian with the images' RMS norm, BN in eval mode. The lag-1
  autocorrelation is the uncentred cosine between g and g shifted by one point (1: smooth,
  0: white noise); the correlation length is the first lag where it drops below 0.5
  (capped at {probe.max_lag}).
- *Signal propagation* (the mean-field papers): each branch conv's response after its BN
  (the pre-activation) on {probe.batch} training images: its second moment q and the mean
  cosine similarity of different images' responses (1: the net has forgotten which input
  it saw), with BN in training mode (batch statistics) and eval mode (stored statistics;
  at initialisation these are mean 0 and variance 1, so BN is the identity).
- *Input-output Jacobian*: singular values of d logits / d image per image (eval-mode BN);
  the spread as log10 max/min (median over images) and the std of ln sigma (mean).
- *Gradient flow*: the L2 norm of each branch conv's weight gradient on one training batch
  (BN training mode), as log10 of the first layer's over the last layer's.

{probe_markdown(probes)}
## Loss landscapes (`landscape_contours.png`, `landscape_surfaces.png`, `landscape_slices.png`)

Li et al. 2018: two random Gaussian directions in parameter space, each filter (one output
channel of a conv or dense kernel) rescaled to the norm of its weights, biases and BN scale
and shift left out; the training loss and error at theta + a d1 + b d2 on a {side} x {side}
grid over [-{landscape.span:g}, {landscape.span:g}]^2 (and a 1-D slice of
{landscape.points_1d} points along d1), BN in eval mode with the run's statistics, on a fixed
subset of the training images (seed {landscape.seed}). The trajectory (`trajectory.png`)
projects theta_k - theta_final of the initial state and every kept checkpoint on the first
two principal components of those differences (kernels only) and draws the loss over that
plane; the axes give each component's share of the variance.

{landscape_markdown(landscapes)}
## Caveats

- The digits are 8x8: the third stage works on 2x2 maps, where a 3x3 convolution's zero
  padding removes more than half of its inputs, so a plain net's signal shrinks with depth
  in eval-mode BN at initialisation for a reason the CIFAR papers do not have.
- BN: at initialisation eval mode makes BN the identity (the mean-field setting); training
  mode renormalises every layer, which pins q near 1 and changes what the cosine measures.
- One training seed per net and short training (the digits_degradation recipe); the
  landscapes use a training subset, not the whole set as Li et al. do.
"""
