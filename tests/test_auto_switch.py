"""The automatic dense -> 2:4 switch: the decision (threshold, window, cap), what the Trainer
logs, resume before and after the switch, and the pooled would-drop fraction it reads."""

import math

import pytest
import torch
from transformers import Trainer

from hf_sparse import SparseLlamaForCausalLM, SparsityCallback
from hf_sparse.training.callbacks.auto_switch import DROP_KEY, SWITCH_STEP_KEY, decide_switch_step
from hf_sparse.training.callbacks.telemetry import sparsity_metrics
from tests.conftest import tiny_config, tiny_training_args
from tests.test_telemetry import RandomTokens


def _rows(*drops, start=1):
    return [{"step": start + i, DROP_KEY: d} for i, d in enumerate(drops)]


def test_decision_needs_a_full_window_strictly_below_the_threshold():
    assert decide_switch_step(_rows(0.3, 0.05, 0.05, 0.05), max_drop=0.1, window=3, cap=100) == 4
    # A row at or above the threshold restarts the window.
    assert decide_switch_step(_rows(0.05, 0.05, 0.1, 0.05, 0.05), max_drop=0.1, window=3, cap=100) is None
    assert decide_switch_step(_rows(0.05, 0.05, 0.1, 0.05, 0.05, 0.05), max_drop=0.1, window=3, cap=100) == 6
    assert decide_switch_step(_rows(0.09), max_drop=0.1, window=1, cap=100) == 1
    # Rows without the value (eval rows) neither count nor break the window.
    rows = _rows(0.05, 0.05) + [{"step": 2, "eval_loss": 3.0}] + _rows(0.05, start=3)
    assert decide_switch_step(rows, max_drop=0.1, window=3, cap=100) == 3


def test_rows_past_the_cap_do_not_decide():
    # From the cap on the warm-up is over; later rows measure real 2:4 drops.
    assert decide_switch_step(_rows(0.5, 0.5, 0.01, 0.01), max_drop=0.1, window=2, cap=3) is None
    assert decide_switch_step(_rows(0.5, 0.01, 0.01, 0.01), max_drop=0.1, window=2, cap=3) == 3


def _train(tmp_path, name, max_steps=6, resume=None, save=False, **config_overrides):
    torch.manual_seed(0)
    config = tiny_config(activation_2by4=True, activation_auto_switch=True, **config_overrides)
    model = SparseLlamaForCausalLM(config)
    saving = dict(save_strategy="steps", save_steps=2) if save else {}
    args = tiny_training_args(tmp_path / name, max_steps=max_steps, **saving)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64), callbacks=[SparsityCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def _mlps_sparse(model):
    return [layer.mlp.sparse_2by4_active for layer in model.model.layers]


def test_switch_is_logged_and_2to4_starts_at_the_next_step(tmp_path):
    trainer, model = _train(
        tmp_path,
        "run",
        activation_auto_switch_max_drop=1.0,
        activation_auto_switch_window=2,
        activation_dense_warmup_steps=100,
    )
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r.get(SWITCH_STEP_KEY) for r in rows] == [None, 2, None, None, None, None]
    assert all(0.0 < r[DROP_KEY] < 1.0 for r in rows)
    assert model.config.activation_switch_step == 2
    assert _mlps_sparse(model) == [True, True]
    # Dense rows count what 2:4 *would* drop; from step 3 on the forward really is 2:4, so
    # each 4-group keeps at most 2 and the pooled drop fraction is what the mask removed.
    assert "sparsity_24/layer_0" in rows[0]


def test_cap_switches_when_the_threshold_is_never_met(tmp_path):
    trainer, model = _train(
        tmp_path,
        "run",
        max_steps=4,
        activation_auto_switch_max_drop=1e-9,
        activation_auto_switch_window=1,
        activation_dense_warmup_steps=3,
    )
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r.get(SWITCH_STEP_KEY) for r in rows] == [None, None, 3, None]
    assert model.config.activation_switch_step == 3


def test_no_switch_before_the_window_fills(tmp_path):
    trainer, model = _train(
        tmp_path,
        "run",
        max_steps=3,
        activation_auto_switch_max_drop=1.0,
        activation_auto_switch_window=4,
        activation_dense_warmup_steps=100,
    )
    assert not any(SWITCH_STEP_KEY in r for r in trainer.state.log_history)
    assert model.config.activation_switch_step is None
    assert _mlps_sparse(model) == [False, False]


def test_resume_before_or_after_the_switch_is_bit_identical(tmp_path):
    """The switch falls at step 3 (window 3, every row below); checkpoints at 2 (before it) and 4."""
    keys = dict(activation_auto_switch_max_drop=1.0, activation_auto_switch_window=3, activation_dense_warmup_steps=100)
    full, _ = _train(tmp_path, "full", save=True, **keys)
    losses = {r["step"]: r["loss"] for r in full.state.log_history if "loss" in r}
    for resume_step in (2, 4):
        checkpoint = str(tmp_path / "full" / f"checkpoint-{resume_step}")
        resumed, model = _train(tmp_path, f"from_{resume_step}", resume=checkpoint, **keys)
        again = {r["step"]: r["loss"] for r in resumed.state.log_history if "loss" in r and r["step"] > resume_step}
        assert sorted(again) == list(range(resume_step + 1, 7))
        assert all(again[s] == losses[s] for s in again), (resume_step, losses, again)
        assert model.config.activation_switch_step == 3
        assert [r.get(SWITCH_STEP_KEY) for r in resumed.state.log_history if "loss" in r].count(3) == 1


def test_pooled_drop_is_all_dropped_over_all_nonzeros():
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(tiny_config(activation_2by4=True, activation_dense_warmup_steps=100))
    model.train()
    for layer in model.model.layers:
        layer.mlp.training_step = 0  # dense warm-up: the would-drop counts
    model(input_ids=torch.randint(0, 128, (2, 16)), labels=torch.randint(0, 128, (2, 16)))
    stats = [layer.mlp.activation_stats.clone() for layer in model.model.layers]
    metrics = sparsity_metrics(model, pooled_drop=True)
    from hf_sparse.model.modeling_sparse_llama import STAT_DROPPED_24, STAT_TOTAL, STAT_ZEROS

    dropped = sum(float(s[STAT_DROPPED_24]) for s in stats)
    nonzeros = sum(float(s[STAT_TOTAL] - s[STAT_ZEROS]) for s in stats)
    assert metrics[DROP_KEY] == pytest.approx(dropped / nonzeros, rel=1e-12)
    # Pooled, not the mean of the per-layer fractions (they differ when layers' counts do).
    per_layer = [metrics[f"sparsity_24/layer_{i}"] for i in range(2)]
    assert 0.0 < metrics[DROP_KEY] < 1.0 and not math.isclose(per_layer[0], per_layer[1])
    assert DROP_KEY not in sparsity_metrics(model)  # only on request


def test_report_marks_the_auto_switch_step(tmp_path):
    import json

    from hf_sparse.report import _dense_to_sparse_step

    config = {
        "activation_2by4": True,
        "activation_dense_warmup_steps": 100,
        "activation_auto_switch": True,
        "activation_switch_step": 40,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _dense_to_sparse_step(str(tmp_path)) == 40
    config["activation_auto_switch"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _dense_to_sparse_step(str(tmp_path)) == 100


@pytest.mark.parametrize(
    "overrides",
    [
        dict(activation_2by4=True, activation_auto_switch=True, activation_dense_warmup_steps=100),
        dict(activation_l1=0.1),
        dict(activation_l1=0.1, activation_2by4=True, activation_dense_warmup_steps=0),
    ],
    ids=["auto_switch", "activation_l1", "activation_l1_2by4"],
)
def test_no_host_sync_outside_logging_steps(tmp_path, monkeypatch, overrides):
    from transformers import TrainerControl, TrainerState

    from tests.conftest import callback_training_step, host_sync_calls

    model = SparseLlamaForCausalLM(tiny_config(**overrides)).train()
    callback = SparsityCallback()
    args, state, control = tiny_training_args(tmp_path), TrainerState(max_steps=4), TrainerControl()
    ids = torch.randint(0, 128, (2, 16))

    def step():
        callback_training_step(callback, args, state, control, model, ids)

    assert host_sync_calls(monkeypatch, lambda: callback.on_train_begin(args, state, control, model=model)) == []
    step()  # creates the stat tensors
    # The would-drop counts and the L1 term stay on device on a non-logging step ...
    assert host_sync_calls(monkeypatch, step) == []
    # ... and a logging step reads them with the other metrics in one transfer.
    state.log_history.append({"loss": 1.0, "step": 0})
    logs = {"loss": 1.0}
    assert host_sync_calls(monkeypatch, lambda: callback.on_log(args, state, control, logs=logs, model=model)) == [
        "tolist"
    ]
    assert (DROP_KEY in logs) == ("activation_auto_switch" in overrides)
    assert ("activation_l1/loss" in logs) == ("activation_l1" in overrides)


def test_train_hf_writes_the_switch_step_only_once_2to4_started(tmp_path):
    """all_results.json gets `activation_switch_step` when 2:4 started; a run that ended
    dense has none (and the console summary, which formats every value, still prints)."""
    import json
    import os

    import train_hf

    base = [
        os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.json"),
        "--model_config",
        os.path.join(os.path.dirname(__file__), "..", "configs", "llama_tiny.json"),
        "--max_length",
        "32",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--report_to",
        "[]",
        "--disable_tqdm",
        "true",
        "--activation_auto_switch",
        "true",
        "--activation_auto_switch_max_drop",
        "1.0",
    ]
    for name, window, expected in (("switched", 2, 2), ("dense", 9, None)):
        out = tmp_path / name
        train_hf.main(base + ["--output_dir", str(out), "--activation_auto_switch_window", str(window)])
        results = json.loads((out / "all_results.json").read_text())
        assert results.get(SWITCH_STEP_KEY) == expected
        card = (out / "README.md").read_text()
        assert ("switched at step 2" in card) == (expected == 2) and "automatic" in card


def test_report_plots_the_pooled_curve_and_the_threshold(tmp_path, monkeypatch):
    import json

    from hf_sparse import report

    history = [
        {
            "step": s,
            "loss": 5.0,
            "sparsity_relu/layer_0": 0.5,
            "sparsity_relu/mean_across_layers": 0.5,
            "sparsity_24/layer_0": d,
            "sparsity_24/mean_across_layers": d,
            DROP_KEY: d,
        }
        for s, d in ((10, 0.2), (20, 0.1), (30, 0.09))
    ]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "activation_2by4": True,
                "activation_dense_warmup_steps": 100,
                "activation_auto_switch": True,
                "activation_auto_switch_max_drop": 0.12,
                "activation_switch_step": 30,
            }
        )
    )
    lines = []
    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y, **kw: lines.append((y, kw.get("label"))))
    assert report.sparsity_series(history)["pooled_drop"] == [0.2, 0.1, 0.09]
    report.write_report(str(tmp_path))
    assert lines == [(0.12, "auto-switch threshold 0.12")]
