"""A NaN injected mid-run is reported with its layer; `stop` keeps checkpoints clean and
names the last good one, `skip` drops exactly the poisoned update."""

import glob
import json
import math
import os
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
import train_hf  # noqa: E402
from hf_sparse import SparseLlamaForCausalLM, SparsityCallback  # noqa: E402
from hf_sparse.training.callbacks.numerics import NonFiniteError, NumericsGuardCallback  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.test_telemetry import RandomTokens  # noqa: E402


class InjectNaN(TrainerCallback):
    """Makes layer 1's FFN pre-activation NaN during the forwards of optimizer step `at`."""

    def __init__(self, at):
        self.at, self.handle = at, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.at:
            poison = lambda module, inputs, output: output * float("nan")  # noqa: E731
            self.handle = model.model.layers[1].mlp.up_proj.register_forward_hook(poison)

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _trainer(tmp_path, policy, squ_relu="relu2", report_to=()):
    torch.manual_seed(0)
    guard = NumericsGuardCallback(policy)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        logging_steps=2,
        save_strategy="steps",
        save_steps=2,
        report_to=list(report_to),
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-3,
    )
    trainer = Trainer(
        model=SparseLlamaForCausalLM(tiny_config(squ_relu=squ_relu)),
        args=args,
        train_dataset=RandomTokens(64),
        callbacks=[SparsityCallback(), guard, InjectNaN(at=3)],
    )
    return trainer, guard


@pytest.mark.parametrize("squ_relu", ["relu2", "silu"])
def test_stop_policy_names_layer_and_last_good_checkpoint(tmp_path, squ_relu):
    trainer, guard = _trainer(tmp_path, "stop", squ_relu)
    trainer.train()
    assert trainer.state.global_step == 4  # stopped at the first check after step 3
    assert "layer 1" in guard.failure and "between optimizer steps 3 and 4" in guard.failure
    assert f"Last good checkpoint: {tmp_path / 'checkpoint-2'}" in guard.failure
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]  # the poisoned step-4 state was not saved


def test_skip_policy_drops_the_poisoned_update(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, guard = _trainer(tmp_path, "skip", report_to=["tensorboard"])
    trainer.train()
    assert guard.skipped == [(3, 1)]
    assert trainer.state.global_step == 8
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert rows[-1]["numerics/skipped_steps"] == 1.0 and math.isfinite(rows[-1]["loss"])
    # ...and in the reporting backends, on the loss row (the companion runs before them).
    events = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    skipped = acc.Scalars("train/numerics/skipped_steps")
    assert [e.step for e in skipped] == [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.value for e in skipped] == [0.0, 1.0, 1.0, 1.0]


def test_train_hf_stops_with_a_clear_message_and_no_final_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_config

    def poisoned(config, **kwargs):
        model = original(config, **kwargs)
        layer = model.model.layers[1].mlp.up_proj
        calls = {"n": 0}

        def hook(module, inputs, output):
            calls["n"] += 1
            return output * float("nan") if module.training and calls["n"] == 3 else output

        layer.register_forward_hook(hook)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", poisoned)
    config = {
        "model_config": os.path.join(REPO_ROOT, "configs", "llama_tiny.json"),
        "max_length": 32,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "save_steps": 2,
        "eval_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    with pytest.raises(NonFiniteError, match=r"layer 1 .*Last good checkpoint: .*checkpoint-2"):
        train_hf.main([str(path)])
    names = set(os.listdir(tmp_path / "run"))
    assert "config.json" not in names and "model.safetensors" not in names
    assert "checkpoint-4" not in names and "checkpoint-2" in names
