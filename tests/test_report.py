"""`python -m hf_sparse.report RUN_DIR`: plots from trainer_state.json alone."""

import json
import os
import sys

import pytest

from hf_sparse.report import CURVES_NAME, HEATMAP_NAME, NotARunError, write_report
from tests import processes  # noqa: E402


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


def test_report_figures_are_labelled(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = []
    real_savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    _fake_run(tmp_path)
    write_report(str(tmp_path))
    heatmap, curves = saved[:2]
    colorbar = heatmap.axes[-1]  # the colorbar's own axes comes last
    assert colorbar.get_ylabel() == "fraction of exact zeros"
    axis = curves.axes[0]
    assert axis.get_ylabel() == "fraction" and "ReLU² sparsity" in axis.get_title()


def test_report_cli_on_a_finished_run(tmp_path):
    _fake_run(tmp_path, with_24=False)
    env = dict(os.environ, WANDB_MODE="offline")
    proc = processes.run([sys.executable, "-m", "hf_sparse.report", str(tmp_path)], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert HEATMAP_NAME in proc.stderr + proc.stdout
    # transformers prints this on import under WANDB_MODE=offline; hf_sparse takes it out.
    assert "Running in WANDB offline mode" not in proc.stdout + proc.stderr
    assert (tmp_path / CURVES_NAME).exists()


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(NotARunError, match="trainer_state.json"):
        write_report(str(tmp_path))
    proc = processes.run([sys.executable, "-m", "hf_sparse.report", str(tmp_path)], timeout=120)
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
        row = {
            "loss": 4.0,
            "step": step,
            "flip_rate/mean": 0.02 / step,
            "flip_rate/max": 0.05 / step,
            "flip_rate/total": 0.025 / step,
            "flip_rate/layer_0/mlp_up_proj": 0.02 / step,
        }
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


def _write_long_run(run_dir, n_rows, n_layers=12, warmup=1000):
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(1, n_rows + 1):
        row = {"loss": 3.0, "step": 10 * k}
        for layer in range(n_layers):
            row[f"sparsity_relu/layer_{layer}"] = 0.5 + 0.4 * layer / n_layers
        row["sparsity_relu/mean_across_layers"] = 0.7
        row["sparsity_24/mean_across_layers"] = 0.02
        rows.append(row)
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": rows}))
    (run_dir / "config.json").write_text(
        json.dumps({"model_type": "sparse_llama", "activation_2by4": True, "activation_dense_warmup_steps": warmup})
    )


def test_figures_have_a_fixed_size_whatever_the_number_of_rows(tmp_path):
    from PIL import Image

    from hf_sparse.report import MAX_HEATMAP_COLUMNS, _binned

    sizes = []
    for n_rows in (30, 2000):
        run = tmp_path / f"run{n_rows}"
        _write_long_run(run, n_rows)
        write_report(str(run))
        sizes.append(tuple(Image.open(run / name).size for name in (HEATMAP_NAME, CURVES_NAME)))
    assert sizes[0] == sizes[1]
    assert sizes[0][0][0] <= 1200 and sizes[0][0][1] <= 600
    edges, matrix = _binned(list(range(10, 20010, 10)), [[float(i) for i in range(2000)]], MAX_HEATMAP_COLUMNS)
    assert len(matrix[0]) == MAX_HEATMAP_COLUMNS and len(edges) == MAX_HEATMAP_COLUMNS + 1
    assert matrix[0][0] == sum(range(7)) / 7  # 2000 rows into 300 columns: first bin holds rows 0..6


def test_layer_ticks_are_integers_and_the_switch_step_is_read_from_the_config(tmp_path):
    from hf_sparse.report import _dense_to_sparse_step, layer_ticks

    assert layer_ticks([0, 1]) == ([0, 1], ["0", "1"])
    positions, labels = layer_ticks(list(range(48)))
    assert all(isinstance(p, int) for p in positions) and len(labels) <= 16 and labels[0] == "0"
    _write_long_run(tmp_path / "run", 5, warmup=100)
    assert _dense_to_sparse_step(str(tmp_path / "run")) == 100


def test_no_logging_step_reached_gives_that_reason(tmp_path):
    # max_steps below logging_steps: only the end-of-training summary row exists.
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"train_runtime": 1.0, "step": 3}]}))
    with pytest.raises(NotARunError, match="reached no training logging step"):
        write_report(str(tmp_path))


def test_help_names_the_program_it_was_invoked_as(monkeypatch, capsys):
    from hf_sparse.report import main
    from tests.conftest import help_as_invoked

    for prog, out in help_as_invoked(monkeypatch, capsys, main, "hf-sparse-report", "hf_sparse.report").items():
        assert out.startswith(f"usage: {prog} [-h] run_dir\n") and "trainer_state.json" in out, out
