"""Tests of the report tables, published numbers and the degradation verdict (no JAX)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # share the run builders of test_runs
from test_runs import make_sweep, write_run  # noqa: E402

from resnet_flax.analysis.report import (  # noqa: E402
    comparison_table,
    degradation_verdict,
    final_table,
    published_for,
    write_report,
)
from resnet_flax.analysis.runs import load_runs  # noqa: E402


def _load(path: Path) -> pd.DataFrame:
    """Load runs, silencing the expected malformed-line warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_runs([path])


def _table(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    """A final_table-shaped frame from (model, depth, train mean, train std) rows."""
    return pd.DataFrame(
        [
            {"model": m, "depth": d, "final_train_error_mean": mean,
             "final_train_error_std": std, "final_test_error_mean": mean + 0.05,
             "final_test_error_std": std, "n": 3, "partial": False}
            for m, d, mean, std in rows
        ]
    )  # fmt: skip


def test_final_table_from_sweep(tmp_path: Path) -> None:
    table = final_table(_load(make_sweep(tmp_path)))
    plain56 = table[(table["model"] == "plain") & (table["depth"] == 56)].iloc[0]
    assert plain56["n"] == 2 and plain56["incomplete"] == 1 and plain56["completed"] == 2
    assert plain56["final_train_error_mean"] == pytest.approx(0.201)
    failed = table[(table["model"] == "residual") & (table["depth"] == 110)].iloc[0]
    assert failed["n"] == 0 and failed["failed"] == 1
    assert pd.isna(failed["final_train_error_mean"])


def test_verdict_degradation_present() -> None:
    table = _table([("plain", 20, 0.05, 0.005), ("plain", 56, 0.15, 0.01),
                    ("residual", 20, 0.04, 0.005), ("residual", 56, 0.03, 0.005)])  # fmt: skip
    verdict = degradation_verdict(table)
    assert verdict.plain_degrades and verdict.residual_avoids and verdict.enough_data
    assert "5.00%" in verdict.text and "15.00%" in verdict.text and "+10.00 pp" in verdict.text


def test_verdict_no_degradation() -> None:
    table = _table([("plain", 20, 0.05, 0.005), ("plain", 56, 0.06, 0.005),
                    ("residual", 20, 0.05, 0.005), ("residual", 56, 0.04, 0.005)])  # fmt: skip
    verdict = degradation_verdict(table)
    assert not verdict.plain_degrades and verdict.residual_avoids
    assert "does not degrade" in verdict.text


def test_verdict_noise_larger_than_margin() -> None:
    # A 5 pp rise but seeds scatter by 10 pp: not a clear degradation.
    table = _table([("plain", 20, 0.05, 0.10), ("plain", 56, 0.10, 0.10),
                    ("residual", 20, 0.05, 0.0), ("residual", 56, 0.20, 0.0)])  # fmt: skip
    verdict = degradation_verdict(table)
    assert not verdict.plain_degrades and not verdict.residual_avoids


def test_verdict_residual_above_plain_does_not_avoid() -> None:
    table = _table([("plain", 20, 0.05, 0.0), ("plain", 56, 0.20, 0.0),
                    ("residual", 20, 0.21, 0.0), ("residual", 56, 0.22, 0.0)])  # fmt: skip
    verdict = degradation_verdict(table)
    assert verdict.plain_degrades and not verdict.residual_avoids


def test_verdict_not_enough_data() -> None:
    one_depth = degradation_verdict(_table([("plain", 20, 0.05, 0.0), ("residual", 20, 0.04, 0.0)]))
    assert not one_depth.enough_data and "not enough data" in one_depth.text
    assert "one depth only (20)" in one_depth.text
    no_plain = degradation_verdict(
        _table([("residual", 20, 0.05, 0.0), ("residual", 56, 0.04, 0.0)])
    )
    assert not no_plain.plain_degrades and "no plain runs" in no_plain.text
    empty = degradation_verdict(
        _table([]).reindex(
            columns=["model", "depth", "final_train_error_mean", "final_train_error_std"]
        )
    )
    assert not empty.enough_data


def test_comparison_table() -> None:
    table = _table([("plain", 20, 0.05, 0.0), ("plain", 56, 0.20, 0.0),
                    ("residual", 56, 0.03, 0.0), ("residual", 110, 0.02, 0.0)])  # fmt: skip
    both = comparison_table(table)
    assert both["depth"].tolist() == [56]
    assert both["final_train_error_diff"].iloc[0] == pytest.approx(0.17)


def test_published_numbers_only_for_matching_dataset() -> None:
    assert published_for("cifar10", "residual", 110).startswith("6.43")
    assert "6.37" in published_for("cifar10", "preact", 110)
    assert published_for("digits", "residual", 110) == ""
    assert published_for("cifar10", "plain", 56) == ""
    assert "25.03" in published_for("imagenet2012", "residual", 34)
    assert published_for("cifar10", "residual", 34) == ""


def test_report_contents(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    report = write_report(_load(sweep), sweep)
    text = (sweep / "report.md").read_text()
    assert report.path == sweep / "report.md" and text == report.text
    assert "## Dataset: cifar10" in text
    assert "8.75" in text and "6.97" in text  # Table 6, ResNet-20 and -56
    assert "20.10 ± 0.14" in text  # plain-56 train error in percent, mean ± std
    assert "plain DEGRADES" in text and "residual AVOIDS" in text
    assert "Plain vs residual at equal depth" in text
    assert "diverged" in text and "loss is NaN" in text and "OOM" in text
    assert report.verdicts["cifar10"].plain_degrades


def test_report_no_published_numbers_for_other_dataset(tmp_path: Path) -> None:
    for depth in (20, 56):
        write_run(tmp_path, "residual", depth, 0, dataset="digits")
    text = write_report(_load(tmp_path), tmp_path / "r.md").text
    assert "8.75" not in text and "6.97" not in text
    assert "no plain runs" in text


def test_imagenet_report_puts_table_2_beside_ours(tmp_path: Path) -> None:
    for model in ("plain", "residual"):
        for depth, train in ((18, 0.30), (34, 0.33 if model == "plain" else 0.27)):
            write_run(tmp_path, model, depth, 0, final_train=train, dataset="imagenet2012")
    report = write_report(_load(tmp_path), tmp_path / "r.md")
    text = report.text
    assert "## Dataset: imagenet2012" in text
    for published in ("27.94", "28.54", "27.88", "25.03"):  # Table 2, top-1 10-crop
        assert published in text
    assert "centre-crop error on the validation split" in text
    assert report.verdicts["imagenet2012"].plain_degrades


def test_diverged_run_is_named_and_left_out_of_the_verdict(tmp_path: Path) -> None:
    for model, deep in (("plain", 0.20), ("residual", 0.03)):
        for seed in (0, 1):
            write_run(tmp_path, model, 20, seed, final_train=0.05)
            write_run(tmp_path, model, 56, seed, final_train=deep)
    # Its metrics end near 90% training error: averaged in, plain-20 would look worse than 56.
    write_run(tmp_path, "plain", 20, 7, final_train=0.9, status="diverged", iterations=500)
    report = write_report(_load(tmp_path), tmp_path / "r.md")
    assert "| plain | 20 | 7 | diverged | 500 | loss is NaN |" in report.text
    assert "2 completed, 1 diverged" in report.text
    verdict = report.verdicts["cifar10"]
    assert verdict.plain_degrades and verdict.residual_avoids
    assert "5.00% (depth 20)" in verdict.text  # seeds 0 and 1 only


def test_report_says_which_training_error_each_table_holds(tmp_path: Path) -> None:
    # Fails when the report's training error (eval mode on the whole training set; for a
    # streamed dataset the last running mean) is unqualified, or qualified wrongly.
    sweep = make_sweep(tmp_path)
    text = write_report(_load(sweep), sweep).text
    assert "| train error, eval mode (%) | test error, eval mode (%) |" in text
    assert "plain train, eval mode (%)" in text
    assert "training curves are the running training-mode error of each log interval" in text
    for model in ("plain", "residual"):
        write_run(tmp_path / "in", model, 18, 0, dataset="imagenet2012")
    streamed = write_report(_load(tmp_path / "in"), tmp_path / "r.md").text
    assert "| train error, running, training mode (%) |" in streamed
