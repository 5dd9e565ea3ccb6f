"""Published folders: the sweep's figures and report, with how and where they were made."""

import os
from pathlib import Path

from resnet_flax.analysis.publish import Provenance, publish


def test_publish_replaces_the_folder_and_states_command_commit_and_machine(tmp_path: Path):
    # Fails when an old figure survives a new publication (a folder mixing two sweeps), a
    # figure or the report is not copied, or PROVENANCE.md drops the commit or states a
    # machine it did not measure (a fixed core count, no load: a wall time read out of context).
    sweep = tmp_path / "sweep"
    (sweep / "figures").mkdir(parents=True)
    (sweep / "figures" / "curve.png").write_bytes(b"png")
    (sweep / "report.md").write_text("# report\n")
    target = tmp_path / "published"
    target.mkdir()
    (target / "stale.png").write_bytes(b"old")
    publish(sweep, target, Provenance("python -m experiments.x", sweep, 12.4, 15.6, "| t |"))
    assert sorted(p.name for p in target.iterdir()) == ["PROVENANCE.md", "curve.png", "report.md"]
    text = (target / "PROVENANCE.md").read_text()
    assert "Command: `python -m experiments.x`" in text and "Commit: `" in text
    assert "Sweep wall time: 12 s; total with analysis and plots: 16 s" in text
    cores = len(os.sched_getaffinity(0))
    assert f"Machine: {cores} CPU cores, " in text and "load average (1, 5, 15 min)" in text
    assert "```\n| t |\n```" in text
