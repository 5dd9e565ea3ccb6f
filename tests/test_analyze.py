"""Layer diagnostics: analysis.json from a real (tiny) run, and its figures."""

import json
import shutil

import pytest

from resnet_flax.analysis.layer_stats import AnalysisError, analyze_run
from resnet_flax.data.memory import DataConfig
from resnet_flax.models.spec import ModelSpec
from resnet_flax.training.config import RunInfo, TrainerConfig
from resnet_flax.training.loop import train
from resnet_flax.training.optim import OptimConfig
from resnet_flax.training.run_config import RunConfig


def test_analysis_of_a_trained_run(tmp_path):
    trainer = TrainerConfig(
        iterations=10,
        batch_size=32,
        log_every=5,
        eval_every=10,
        checkpoint_every=10,
        progress=False,
    )
    run = tmp_path / "model=residual,depth=8,seed=0"
    train(
        run,
        RunConfig(
            ModelSpec(depth=8),
            DataConfig(name="digits"),
            OptimConfig(lr=0.05),
            trainer,
            RunInfo("t", 0),
        ),
    )
    result = analyze_run(run, grad_batch=64)
    saved = json.loads((run / "analysis.json").read_text())
    assert saved == result
    assert saved["checkpoint_step"] == saved["run_iterations"] == 10
    names = [layer["name"] for layer in saved["layers"]]
    assert names == [f"stage{s}/block0/conv{c}" for s in (1, 2, 3) for c in (1, 2)]
    for layer in saved["layers"]:
        assert layer["response_std"] > 0
        assert layer["grad_norm_init"] > 0 and layer["grad_norm_final"] > 0
    # the gradient at init is recomputed from the seed, so it differs from the final one
    assert any(
        abs(layer["grad_norm_init"] - layer["grad_norm_final"]) > 1e-6 for layer in saved["layers"]
    )

    from experiments.plot import main as plot_main

    assert plot_main([str(tmp_path)]) == 0
    figures = tmp_path / "figures"
    for stem in ("layer_response_std", "gradient_flow"):
        assert any(p.stat().st_size > 0 for p in figures.glob(f"*{stem}*.png")), stem


def test_analysis_needs_a_run_directory(tmp_path):
    with pytest.raises(AnalysisError, match="no run_config.json"):
        analyze_run(tmp_path)


def test_analysis_refuses_an_older_checkpoint_unless_allowed(tmp_path, capsys, caplog):
    from experiments.analyze import main as analyze_main

    trainer = TrainerConfig(
        iterations=10, batch_size=32, log_every=5, eval_every=10, checkpoint_every=5, progress=False
    )
    run = tmp_path / "run"
    train(
        run,
        RunConfig(
            ModelSpec(depth=8), DataConfig(name="digits"), OptimConfig(), trainer, RunInfo("t", 0)
        ),
    )
    shutil.rmtree(run / "checkpoints" / "10")  # the final state is lost; iteration 5 remains
    older = r"iteration 5, older than iteration 10 in summary.json.*--allow-older-checkpoint"
    with pytest.raises(AnalysisError, match=older):
        analyze_run(run, grad_batch=64)
    assert analyze_main([str(run), "--grad-batch", "64"]) == 1
    assert "--allow-older-checkpoint" in capsys.readouterr().err
    assert not (run / "analysis.json").exists()
    with caplog.at_level("INFO", logger="resnet_flax"):
        assert analyze_main([str(run), "--grad-batch", "64", "--allow-older-checkpoint"]) == 0
    assert "analysing the checkpoint at iteration 5" in caplog.text
    saved = json.loads((run / "analysis.json").read_text())
    assert saved["checkpoint_step"] == 5 and saved["run_iterations"] == 10
