"""`python -m hf_sparse.report RUN_DIR`: plots from trainer_state.json alone."""

import json
import subprocess
import sys

import pytest

from hf_sparse.report import CURVES_NAME, HEATMAP_NAME, NotARunError, write_report


def _fake_run(run_dir, with_24=True):
    history = []
    for step in (10, 20, 30):
        row = {"loss": 5.0 - step / 10, "step": step}
        for layer in range(3):
            row[f"sparsity_relu/layer_{layer}"] = 0.5 + 0.01 * step + 0.05 * layer
        row["sparsity_relu/mean_across_layers"] = 0.55 + 0.01 * step
        if with_24:
            row["sparsity_24/mean_across_layers"] = 0.3 - 0.005 * step
        history.append(row)
    history.append({"eval_loss": 3.0, "step": 30})
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 30}))


def _is_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_writes_both_pngs_and_a_summary(tmp_path):
    _fake_run(tmp_path)
    result = write_report(str(tmp_path))
    assert _is_png(tmp_path / HEATMAP_NAME) and _is_png(tmp_path / CURVES_NAME)
    assert "last 0.8500" in result["summary"]  # mean at step 30
    assert "2:4 drop rate: last 0.1500" in result["summary"]
    assert "L2=0.900" in result["summary"]


def test_report_cli_on_a_finished_run(tmp_path):
    _fake_run(tmp_path, with_24=False)
    proc = subprocess.run([sys.executable, "-m", "hf_sparse.report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert HEATMAP_NAME in proc.stderr + proc.stdout
    assert (tmp_path / CURVES_NAME).exists()


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(NotARunError, match="trainer_state.json"):
        write_report(str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "hf_sparse.report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "is not a training run" in proc.stderr
    assert not (tmp_path / HEATMAP_NAME).exists()


def test_report_refuses_a_run_without_sparsity_metrics(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 1}]}))
    with pytest.raises(NotARunError, match="wandb_sparsityrelu"):
        write_report(str(tmp_path))


def _fake_flip_run(run_dir, with_activations):
    history = []
    for step in (10, 20, 30):
        row = {"loss": 4.0, "step": step, "flip_rate/mean": 0.02 / step, "flip_rate/max": 0.05 / step,
               "flip_rate/total": 0.025 / step, "flip_rate/layer_0/mlp_up_proj": 0.02 / step}
        if with_activations:
            row.update({"sparsity_relu/layer_0": 0.6, "sparsity_relu/mean_across_layers": 0.6})
        history.append(row)
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 30}))


@pytest.mark.parametrize("with_activations", [False, True])
def test_report_adds_the_flip_rate_curve(tmp_path, with_activations):
    from hf_sparse.report import FLIP_RATE_NAME

    _fake_flip_run(tmp_path, with_activations)
    result = write_report(str(tmp_path))
    assert result["flip_rate"] == str(tmp_path / FLIP_RATE_NAME) and _is_png(tmp_path / FLIP_RATE_NAME)
    assert "flip rate: last mean 0.000667, max 0.001667, total 0.000833 (step 30)" in result["summary"]
    # A weight-2:4 run without activation metrics still gets its flip-rate report.
    assert (tmp_path / HEATMAP_NAME).exists() == with_activations
