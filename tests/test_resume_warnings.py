"""Resume warnings (a changed max_steps, learning rate, schedule or batch geometry is named
with its effect) and the final evaluation (never twice for the same step)."""

import dataclasses
import glob
import json
import logging
import os
import shutil
import re
import sys
import types

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
import train_hf  # noqa: E402
from hf_sparse.training.config import resume_check  # noqa: E402
from hf_sparse.training.config.run_config import parse_run_config  # noqa: E402


def _tensorboard_available() -> bool:
    from transformers.integrations import is_tensorboard_available

    return is_tensorboard_available()


# One tiny run: 4 cosine steps, evaluated by the Trainer at steps 2 and 4, checkpoint at 4.
BASE = {
    "model_config": os.path.join(REPO_ROOT, "configs", "llama_tiny.json"),
    "squ_relu": "relu2",
    "max_length": 32,
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "learning_rate": 0.003,
    "lr_scheduler_type": "cosine",
    "logging_steps": 1,
    "eval_strategy": "steps",
    "eval_steps": 2,
    "max_eval_samples": 16,
    "save_strategy": "steps",
    "save_steps": 4,
    # The duplicate evaluation used to open a second TensorBoard events file.
    "report_to": ["tensorboard"] if _tensorboard_available() else [],
    "disable_tqdm": True,
    "seed": 0,
}


def _config(folder, name, **overrides) -> str:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({**BASE, "output_dir": str(folder / name), **overrides}))
    return str(path)


def _history(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "trainer_state.json")) as handle:
        return json.load(handle)["log_history"]


def _results(run_dir) -> dict:
    with open(os.path.join(run_dir, "all_results.json")) as handle:
        return json.load(handle)


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume_warnings")
    train_hf.main([_config(folder, "base")])
    return folder


@pytest.fixture(scope="module")
def resumed_run(base_run):
    """checkpoint-4 resumed to max_steps 6 with another learning_rate and no evaluation
    during training (with eval_strategy "steps" the Trainer always evaluates the last
    step), so step 6 is left to train_hf.py's final evaluation. Returns (run folder, the
    warnings logged)."""
    recorder = _Recorder()
    source = logging.getLogger(resume_check.__name__)
    source.addHandler(recorder)
    try:
        checkpoint = str(base_run / "base" / "checkpoint-4")
        config = _config(base_run, "resumed", max_steps=6, learning_rate=0.01, eval_strategy="no", save_strategy="no",
                         resume_from_checkpoint=checkpoint)  # fmt: skip
        train_hf.main([config])
    finally:
        source.removeHandler(recorder)
    return base_run / "resumed", recorder.messages


def _warnings_for(base_run, **overrides) -> list[str]:
    checkpoint = str(base_run / "base" / "checkpoint-4")
    run = parse_run_config([_config(base_run, "probe", resume_from_checkpoint=checkpoint, **overrides)])
    return resume_check.warn_on_resume_changes(checkpoint, run.training_args, run.script_args)


# --- resume warnings ------------------------------------------------------------------------


def test_larger_max_steps_warns_with_old_new_and_the_real_lr_jump(resumed_run):
    run_dir, messages = resumed_run
    assert len(messages) == 2, messages  # one per difference: max_steps and learning_rate
    (steps,) = [m for m in messages if "max_steps" in m]
    assert "max_steps changed 4 → 6 since checkpoint-4 (step 4)" in steps
    assert "cosine schedule is re-stretched to the new max_steps" in steps
    jump = re.search(r"jumps from (\S+) at step 5 to (\S+) at step 6", steps)
    assert jump, steps
    # The figures are those the resumed run really logged (3 significant digits).
    logged = {row["step"]: row["learning_rate"] for row in _history(run_dir) if "loss" in row}
    assert float(jump.group(1)) == pytest.approx(logged[5], rel=5e-3, abs=1e-12)
    assert float(jump.group(2)) == pytest.approx(logged[6], rel=5e-3)
    assert logged[6] > logged[5]  # it really jumps: the 4-step cosine had reached 0

    (lr,) = [m for m in messages if "learning_rate" in m]
    assert "learning_rate changed 0.003 → 0.01" in lr and "no effect" in lr
    # ... and indeed: step 6 runs at the 0.003-based cosine value, not a 0.01-based one.
    assert logged[6] == pytest.approx(0.003 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 5 / 6)).item()), rel=1e-5)


def test_same_settings_resume_does_not_warn(base_run, caplog):
    with caplog.at_level(logging.WARNING, logger=resume_check.__name__):
        assert _warnings_for(base_run) == []
    assert not caplog.records


def test_changed_batch_geometry_warns(base_run, caplog):
    with caplog.at_level(logging.WARNING, logger=resume_check.__name__):
        messages = _warnings_for(base_run, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    assert [r.getMessage() for r in caplog.records] == messages
    assert len(messages) == 2, messages
    assert "per_device_train_batch_size changed 4 → 8" in messages[0]
    assert "gradient_accumulation_steps changed 1 → 2" in messages[1]
    for message in messages:
        assert "the data order/samples per step change" in message
        assert "16 sequences instead of 4" in message


def test_changed_world_size_and_warmup_warn(base_run):
    checkpoint = str(base_run / "base" / "checkpoint-4")
    old, step = resume_check.checkpoint_settings(checkpoint)
    assert (old.max_steps, old.learning_rate, old.lr_scheduler_type, old.world_size, step) == (4, 0.003, "cosine", 1, 4)
    new = dataclasses.replace(old, world_size=2, warmup_steps=2, max_steps=8)
    saved = torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True)
    messages = resume_check.resume_warnings(old, new, step, saved, checkpoint="checkpoint-4")
    changed = [m.split(" changed")[0].removeprefix("resume: ") for m in messages]
    assert changed == ["max_steps", "warmup_steps", "world_size"]
    assert "world_size changed 1 → 2" in messages[2] and "8 sequences instead of 4" in messages[2]
    # Both schedule messages give the lr of the run with both changes: warm-up 2 of 8 steps
    # is over at step 5, cosine over the remaining 6 steps.
    expected = 0.003 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 6)).item())
    for message in messages[:2]:
        assert f"to {expected:.3g} at step 6 (with the other schedule changes)" in message


def test_batch_growth_skips_and_shrinkage_repeats(base_run):
    checkpoint = str(base_run / "base" / "checkpoint-4")
    old, step = resume_check.checkpoint_settings(checkpoint)
    bigger = resume_check.resume_warnings(old, dataclasses.replace(old, per_device_train_batch_size=8), step, None)
    smaller = resume_check.resume_warnings(old, dataclasses.replace(old, per_device_train_batch_size=2), step, None)
    assert bigger[-1].endswith("so sequences are skipped") and smaller[-1].endswith("so sequences are repeated")


def test_max_steps_at_the_checkpoint_step_leaves_nothing(base_run):
    checkpoint = str(base_run / "base" / "checkpoint-4")
    old, step = resume_check.checkpoint_settings(checkpoint)
    old = dataclasses.replace(old, max_steps=2 * step)  # as if written at step 4 of an 8-step run
    at = resume_check.resume_warnings(old, dataclasses.replace(old, max_steps=step), step, None)
    after = resume_check.resume_warnings(old, dataclasses.replace(old, max_steps=step + 1), step, None)
    assert "the checkpoint is already at step 4, nothing is left to train" in at[0]
    assert "nothing is left to train" not in after[0]


def test_world_size_of_a_two_rank_checkpoint(base_run, tmp_path):
    # A checkpoint written by 2 ranks holds rng_state_0.pth and rng_state_1.pth (the test
    # runs' checkpoints are all single-process): its world size is 2, so resuming on 2 says nothing.
    two_rank = tmp_path / "checkpoint-4"
    shutil.copytree(base_run / "base" / "checkpoint-4", two_rank)
    os.remove(two_rank / "training_args.bin")  # the rng files are then the only witness
    rng = two_rank / "rng_state.pth"
    shutil.copy(rng, two_rank / "rng_state_0.pth")
    shutil.copy(rng, two_rank / "rng_state_1.pth")
    os.remove(rng)
    old, step = resume_check.checkpoint_settings(str(two_rank))
    assert old.world_size == 2
    same = dataclasses.replace(old, world_size=2)
    assert not [m for m in resume_check.resume_warnings(old, same, step, None) if "world_size" in m]


def test_training_args_bin_is_read_without_running_it(base_run, tmp_path):
    # A checkpoint from elsewhere: its training_args.bin would run code when unpickled.
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    source = base_run / "base" / "checkpoint-4"
    (checkpoint / "trainer_state.json").write_text((source / "trainer_state.json").read_text())
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save(Payload(), checkpoint / "training_args.bin")
    settings, step = resume_check.checkpoint_settings(str(checkpoint))
    assert not marker.exists()
    assert (settings.max_steps, settings.per_device_train_batch_size, settings.learning_rate, step) == (4, 4, None, 4)
    torch.load(checkpoint / "training_args.bin", weights_only=False).close()
    assert marker.exists()  # the file was a real payload


# --- the final evaluation -------------------------------------------------------------------


def test_last_step_evaluated_by_the_trainer_is_not_evaluated_again(base_run):
    run_dir = base_run / "base"
    eval_rows = [row for row in _history(run_dir) if "eval_loss" in row]
    assert [row["step"] for row in eval_rows] == [2, 4]
    results = _results(run_dir)
    for key in ("eval_loss", "eval_perplexity", "eval_accuracy"):
        assert results[key] == eval_rows[-1][key], key
    if "tensorboard" in BASE["report_to"]:
        assert len(glob.glob(str(run_dir / "runs" / "**" / "events.out.tfevents*"), recursive=True)) == 1


def test_no_eval_at_the_last_step_still_gets_one_final_eval(resumed_run):
    run_dir, _ = resumed_run
    eval_rows = [row for row in _history(run_dir) if "eval_loss" in row]
    assert [row["step"] for row in eval_rows] == [2, 4, 6]  # 2 and 4 from the checkpoint's history
    assert _results(run_dir)["eval_loss"] == eval_rows[-1]["eval_loss"]


def test_best_model_at_end_is_evaluated_when_it_is_not_the_last_step():
    row = {"eval_loss": 1.0, "eval_perplexity": 2.7, "epoch": 1.0, "step": 8}
    state = types.SimpleNamespace(global_step=8, best_global_step=4, log_history=[row])
    assert resume_check.final_step_eval(state, types.SimpleNamespace(load_best_model_at_end=True)) is None
    assert resume_check.final_step_eval(state, types.SimpleNamespace(load_best_model_at_end=False)) == {
        "eval_loss": 1.0, "eval_perplexity": 2.7}  # fmt: skip
