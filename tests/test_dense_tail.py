"""The activation dense tail (`activation_dense_tail_steps`): the last N optimizer steps run the
FFN densely again, decided from the optimizer step (resume-safe), beside the warm-up, the auto
switch and weight 2:4's own tail; the step it began is logged once and recorded."""

import json
import os

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_sparse import SparseLlamaConfig, SparseLlamaForCausalLM, SparsityCallback, add_callbacks
from hf_sparse.model.sparse_ffn import relu2_ffn_reference
from hf_sparse.training.config.run_args import ConfigError
from hf_sparse.training.config.run_config import parse_run_config
from tests.conftest import REPO_ROOT, tiny_config, tiny_training_args
from tests.test_telemetry import RandomTokens
from tests.test_train_hf import _write_config

TAIL_KEY = "activation_dense_tail_step"


class _RecordPhases(TrainerCallback):
    """What each step's forward runs: (2:4 activations on, 2:4 weights on) of layer 0, read
    after SparsityCallback set the step."""

    def __init__(self):
        self.phases = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        mlp = model.model.layers[0].mlp
        weights_on = getattr(mlp.up_proj, "sparse_weight_on", None)
        self.phases.append((mlp.sparse_2by4_active, weights_on))


def _train(tmp_path, name, max_steps=6, resume=None, save=False, **config_overrides):
    torch.manual_seed(0)
    values = dict(activation_2by4=True, activation_dense_warmup_steps=0, activation_dense_tail_steps=2)
    model = SparseLlamaForCausalLM(tiny_config(**{**values, **config_overrides}))
    saving = dict(save_strategy="steps", save_steps=2) if save else {}
    args = tiny_training_args(tmp_path / name, max_steps=max_steps, **saving)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64))
    recorder = _RecordPhases()
    add_callbacks(trainer, SparsityCallback(), recorder)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, recorder


def _train_rows(trainer):
    return [row for row in trainer.state.log_history if "loss" in row]


def test_the_last_steps_run_dense_and_the_row_of_the_switch_says_so(tmp_path):
    trainer, model, recorder = _train(tmp_path, "run")
    # Steps 1-4 (global_step 0-3 at their start) run 2:4, steps 5 and 6 dense.
    assert [on for on, _ in recorder.phases] == [True, True, True, True, False, False]
    rows = _train_rows(trainer)
    assert [row.get(TAIL_KEY) for row in rows] == [None, None, None, 4, None, None]
    # The telemetry keeps reporting what 2:4 would drop during the tail.
    assert all(0.0 < row["sparsity_24/layer_0"] < 1.0 for row in rows)
    assert model.config.activation_dense_tail_step == 4
    # After training (no trainer: step None) the model runs as the run ended: dense.
    model.model.layers[0].mlp.training_step = None
    assert not model.model.layers[0].mlp.sparse_2by4_active


def test_the_tail_forward_is_the_exact_dense_relu2_ffn():
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(tiny_config(activation_2by4=True, activation_dense_warmup_steps=0,
                                               activation_dense_tail_steps=3)).train()  # fmt: skip
    mlp = model.model.layers[0].mlp
    mlp.max_steps = 10
    x = torch.randn(2, 8, 32)
    mlp.training_step = 7  # 7 >= 10 - 3 -> the tail
    expected = relu2_ffn_reference(x, mlp.up_proj.weight, mlp.down_proj.weight)
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
    mlp.training_step = 6  # the last 2:4 step: the mask drops something
    assert not torch.allclose(mlp(x), expected)


def test_resume_before_or_inside_the_tail_is_bit_identical_and_logs_it_once(tmp_path):
    full, _, _ = _train(tmp_path, "full", save=True)
    losses = {row["step"]: row["loss"] for row in _train_rows(full)}
    for resume_step in (2, 4):
        checkpoint = str(tmp_path / "full" / f"checkpoint-{resume_step}")
        resumed, model, recorder = _train(tmp_path, f"from_{resume_step}", resume=checkpoint)
        again = {row["step"]: row["loss"] for row in _train_rows(resumed) if row["step"] > resume_step}
        assert sorted(again) == list(range(resume_step + 1, 7))
        assert all(again[s] == losses[s] for s in again), (resume_step, losses, again)
        assert [on for on, _ in recorder.phases] == [s < 4 for s in range(resume_step, 6)]
        assert [row.get(TAIL_KEY) for row in _train_rows(resumed)].count(4) == 1
        assert model.config.activation_dense_tail_step == 4


def test_with_the_auto_switch_and_the_weights_own_tail(tmp_path):
    """The auto switch ends the warm-up at step 2 (every row below the threshold); the weights
    run 2:4 from step 0 until their 1-step tail; the activations' 3-step tail starts first."""
    trainer, model, recorder = _train(
        tmp_path, "run", max_steps=7, activation_dense_warmup_steps=100, activation_auto_switch=True,
        activation_auto_switch_max_drop=1.0, activation_auto_switch_window=2, activation_dense_tail_steps=3,
        weight_2by4=True, sparse_dense_finetune_steps=1,
    )  # fmt: skip
    activations = [on for on, _ in recorder.phases]
    weights = [on for _, on in recorder.phases]
    assert activations == [False, False, True, True, False, False, False]
    assert weights == [True] * 6 + [False]
    rows = _train_rows(trainer)
    assert rows[1]["activation_switch_step"] == 2 and rows[3][TAIL_KEY] == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(activation_2by4=False, activation_dense_tail_steps=2),
            r"activation_dense_tail_steps > 0 requires "
            r"activation_2by4=True",
        ),
        (
            dict(activation_dense_tail_steps=10, max_steps=10),
            r"activation_dense_tail_steps=10 leaves no 2:4 step "
            r"in max_steps=10; use activation_dense_tail_steps < 10",
        ),
        (
            dict(activation_dense_tail_steps=2, max_steps=-1, num_train_epochs=1),
            r"activation_dense_tail_steps=2 "
            r"needs max_steps > 0",
        ),
        (dict(activation_dense_tail_steps=-1), r"activation_dense_tail_steps=-1 must be >= 0"),
    ],
    ids=["no_activation_2by4", "tail_covers_the_run", "no_max_steps", "negative"],
)
def test_refused_in_one_line_where_it_cannot_apply(tmp_path, monkeypatch, capsys, overrides, message):
    from tests.conftest import assert_one_line_error, run_train_hf_script

    overrides = {"squ_relu": "relu2", "activation_2by4": True, "activation_dense_warmup_steps": 0, **overrides}
    code = run_train_hf_script(monkeypatch, _write_config(tmp_path, **overrides))
    assert_one_line_error(code, capsys, message)
    assert not (tmp_path / "run").exists()


def test_the_key_is_documented_and_reaches_the_config(tmp_path, monkeypatch, capsys):
    from tests.conftest import run_train_hf_script

    run = parse_run_config([_write_config(tmp_path, squ_relu="relu2", activation_2by4=True,
                                          activation_dense_tail_steps=3, max_steps=8)])  # fmt: skip
    assert run.model_config.activation_dense_tail_steps == 3
    assert SparseLlamaConfig().activation_dense_tail_steps == 0
    with pytest.raises(ConfigError, match="activation_dense_tail_steps=8 leaves no 2:4 step"):
        parse_run_config([_write_config(tmp_path, squ_relu="relu2", activation_2by4=True,
                                        activation_dense_tail_steps=8, max_steps=8)])  # fmt: skip
    assert run_train_hf_script(monkeypatch, "--help") in (None, 0)
    assert "  activation_dense_tail_steps (int, default 0)" in capsys.readouterr().out
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert "activation_dense_tail_steps" in readme and TAIL_KEY in readme


def test_train_hf_records_the_tail_and_the_switch_reason(tmp_path, capsys):
    """all_results.json, the console's final block, config.json, the card and the report
    name the tail's first step and why the auto switch switched."""
    import train_hf

    out = tmp_path / "run"
    train_hf.main([
        os.path.join(REPO_ROOT, "configs", "quickstart.json"),
        "--model_config", os.path.join(REPO_ROOT, "configs", "llama_tiny.json"),
        "--output_dir", str(out), "--max_length", "32", "--max_steps", "6", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "[]",
        "--disable_tqdm", "true", "--activation_auto_switch", "true", "--activation_auto_switch_max_drop", "1.0",
        "--activation_auto_switch_window", "2", "--activation_dense_tail_steps", "2",
    ])  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert results["activation_switch_step"] == 2 and results["activation_switch_reason"] == "threshold"
    assert results[TAIL_KEY] == 4
    console = capsys.readouterr().out
    assert "activation_switch_reason" in console and "threshold" in console and TAIL_KEY in console
    config = json.loads((out / "config.json").read_text())
    assert config[TAIL_KEY] == 4 and config["activation_dense_tail_steps"] == 2
    state = json.loads((out / "trainer_state.json").read_text())
    switch_rows = [row for row in state["log_history"] if "activation_switch_step" in row]
    assert [(row["step"], row["activation_switch_reason"]) for row in switch_rows] == [(2, "threshold")]
    card = (out / "README.md").read_text()
    assert "dense again from step 4" in card and "threshold" in card
    from hf_sparse import report

    summary = report.write_report(str(out))["summary"]
    assert "dense again from step 4" in summary and "2:4 activations from step 2 (auto switch: threshold)" in summary


def test_the_switch_reason_and_the_tail_step_reach_wandb_and_tensorboard(tmp_path, monkeypatch):
    """The reason is text: wandb keeps it in the row, TensorBoard as a text summary."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.wandb_offline import wait_for_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "hf_sparse_tests")
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(tiny_config(
        activation_2by4=True, activation_dense_warmup_steps=100, activation_auto_switch=True,
        activation_auto_switch_max_drop=1.0, activation_auto_switch_window=2, activation_dense_tail_steps=1,
    ))  # fmt: skip
    args = tiny_training_args(tmp_path / "run", max_steps=4, report_to=["wandb", "tensorboard"])
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64))
    add_callbacks(trainer, SparsityCallback())
    trainer.train()

    import wandb

    run_dir = os.path.dirname(wandb.run.dir)
    wandb.finish()
    rows = wait_for_rows(run_dir, lambda r: "train/loss" in r, expected=4)
    assert [r.get("train/activation_switch_reason") for r in rows] == [None, "threshold", None, None]
    assert [r.get(f"train/{TAIL_KEY}") for r in rows] == [None, None, 3, None]

    events = glob.glob(str(tmp_path / "run" / "**" / "events.out.tfevents.*"), recursive=True)
    board = EventAccumulator(os.path.dirname(events[0]), size_guidance={"tensors": 0})
    board.Reload()
    # add_text stores a string tensor under "<tag>/text_summary".
    texts = board.Tensors("train/activation_switch_reason/text_summary")
    assert [(e.step, e.tensor_proto.string_val[0].decode()) for e in texts] == [(2, "threshold")]
    assert [e.step for e in board.Scalars(f"train/{TAIL_KEY}")] == [3]
