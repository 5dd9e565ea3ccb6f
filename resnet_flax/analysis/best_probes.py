"""Signal-propagation probes of each group's best run: what the arms of a sweep do to the signal."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from resnet_flax.analysis.best_of_group import BestOfGroups, best_run_dirs
from resnet_flax.analysis.probe_plots import probe_figures
from resnet_flax.analysis.probe_study import probe_runs
from resnet_flax.analysis.probes import ProbeConfig
from resnet_flax.analysis.why_report import probe_table_markdown

SECTION = """
## Probes of each net at its best learning rate

Each group's best run probed at initialisation and at its end ({count} runs; figures
`probes_vs_depth`, `shattered_gradients`, `signal_propagation_*`). Lag-1: autocorrelation of the
input gradient along a line through an image (Balduzzi et al. 2017; near 1: smooth, near 0:
shattered); Jacobian: spread of the log singular values of the input-output Jacobian (0:
dynamical isometry, Xiao et al. 2018); gradient ratio: log10 of the first layer's gradient norm
over the last's. – marks a value that does not exist: at initialisation Fixup's zero classifier
passes no gradient, SkipInit's and Fixup's branches output zero, and delta kernels (stride-2
convs reading only their centre tap) leave input pixels unseen, so the Jacobian has zero
singular values.

"""


def probe_best_runs(
    sweep_dir: Path, runs: pd.DataFrame, best: BestOfGroups, cfg: ProbeConfig, report: Path
) -> list[Path]:
    """Probe every group's best run, draw the probe figures, append the table to `report`."""
    dirs = best_run_dirs(runs, best)
    if not dirs:
        return []
    records = probe_runs(dirs, cfg, sweep_dir / "probes")
    paths = probe_figures(records, sweep_dir / "figures")
    with report.open("a", encoding="utf-8") as out:
        out.write(SECTION.format(count=len(dirs)) + probe_table_markdown(records))
    return paths
