"""Stop signals at awkward moments, through train_hf.py's own `__main__` in this process: the
signal is sent by a wrapper around the function that is running at that moment (tokenizer
training, data packing, an evaluation, in-loop lm-eval, a checkpoint save, the final save).
Each run ends with either a complete checkpoint and the resume line, or one line saying no
checkpoint was written; never a half-written folder that looks complete, and the same
command then goes on from what is there (resume_from_checkpoint "auto")."""

import json
import logging
import os
import random
import signal
import threading

import pytest
from transformers import Trainer

from hf_sparse.training.data import packing, tokenizer
from hf_sparse.training import run
from hf_sparse.training.callbacks.checkpoints import is_complete_checkpoint
from hf_sparse.training.callbacks.preemption import read_preemption_marker
from tests.conftest import REPO_ROOT, run_train_hf_script

STEPS = 8


def _run_json(tmp_path, **overrides) -> str:
    config = {
        "model_config": os.path.join(REPO_ROOT, "configs", "llama_tiny.json"), "squ_relu": "relu2",
        "max_length": 32, "output_dir": str(tmp_path / "run"), "max_steps": STEPS,
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "max_eval_samples": 16,
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "steps", "save_steps": 4, "report_to": [],
        "disable_tqdm": True, "seed": 1, "resume_from_checkpoint": "auto", **overrides,
    }  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    return str(path)


def _signal_when_called(monkeypatch, owner, name, signum=signal.SIGTERM, delay=None):
    """Replace owner.name by a wrapper that, on its first call, sends `signum` to this process
    (at once, or `delay` seconds later from a timer: then it lands while the call runs)."""
    original = getattr(owner, name)
    sent = []

    def wrapper(*args, **kwargs):
        if not sent:
            sent.append(name)
            if delay is None:
                os.kill(os.getpid(), signum)
            else:
                threading.Timer(delay, os.kill, (os.getpid(), signum)).start()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return sent


def _last_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    return err.splitlines()[-1] if err else ""


def _folders_that_look_complete(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint-*") if is_complete_checkpoint(str(p)))


@pytest.mark.parametrize("moment", ["tokenizer", "packing"])
def test_before_training_one_line_and_nothing_written(tmp_path, monkeypatch, capsys, moment):
    """SIGTERM while the embedded tokenizer is trained (a fresh cache) or the data is packed:
    the run stops there, says so in one line, leaves only the marker; no tokenizer cache entry
    is half-written; the same command then trains the run from the start."""
    overrides = {}
    if moment == "tokenizer":
        monkeypatch.setenv("HF_SPARSE_CACHE", str(tmp_path / "cache"))
        sent = _signal_when_called(monkeypatch, tokenizer, "_train_embedded_tokenizer", delay=0.2)
    else:  # a local text file: packed by datasets.map, batch by batch
        rng = random.Random(0)
        words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
        (tmp_path / "train.jsonl").write_text(
            "\n".join(json.dumps({"text": " ".join(rng.choices(words, k=60))}) for _ in range(400))
        )
        overrides = {"train_files": [str(tmp_path / "train.jsonl")], "validation_split_percentage": 0}
        sent = _signal_when_called(monkeypatch, packing, "_tokenize")
    config = _run_json(tmp_path, **overrides)
    assert run_train_hf_script(monkeypatch, config) == 143
    assert sent
    last = _last_line(capsys)
    assert last.startswith("train_hf.py: stopped by SIGTERM before training started; no checkpoint was written. "
                           "Start again with: python "), last  # fmt: skip
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["preempted.json"]
    marker = read_preemption_marker(str(run_dir))
    assert (marker["signal"], marker["step"], marker["checkpoint"]) == ("SIGTERM", None, None)
    if moment == "tokenizer":
        cache = tmp_path / "cache"
        assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]
        return
    monkeypatch.undo()
    assert run_train_hf_script(monkeypatch, config) == 0
    assert (run_dir / "model.safetensors").exists() and read_preemption_marker(str(run_dir)) is None


@pytest.mark.parametrize("moment", ["evaluation", "lm_eval", "checkpoint_save"])
def test_during_training_a_complete_checkpoint_and_the_resume_line(tmp_path, monkeypatch, capsys, caplog, moment):
    """During an evaluation (SIGUSR1 here, as SLURM's --signal sends it), in-loop lm-eval
    (cut short between batches: no scores at that step) or a periodic checkpoint save: the
    step under way ends, then one more checkpoint and the resume line."""
    caplog.set_level(logging.INFO, logger="train_hf")
    overrides, signum = {}, signal.SIGTERM
    if moment == "evaluation":
        overrides, signum = {"eval_strategy": "steps", "eval_steps": 2}, signal.SIGUSR1
        sent = _signal_when_called(monkeypatch, Trainer, "evaluate", signum)
    elif moment == "lm_eval":
        overrides = {"lm_eval_tasks": ["hf_sparse_heldout"], "lm_eval_limit": 4, "lm_eval_steps": 2}
        from hf_sparse.training.callbacks import lm_eval as lm_eval_callback

        sent = _signal_when_called(monkeypatch, lm_eval_callback, "evaluate_model")
    else:
        sent = _signal_when_called(monkeypatch, Trainer, "_save_checkpoint")
    config = _run_json(tmp_path, **overrides)
    code = run_train_hf_script(monkeypatch, config)
    assert sent and code == 128 + signum
    run_dir = tmp_path / "run"
    stop_step = {"evaluation": 3, "lm_eval": 3, "checkpoint_save": 5}[moment]
    checkpoint = run_dir / f"checkpoint-{stop_step}"
    name = signal.Signals(signum).name
    last = _last_line(capsys)
    assert last.startswith(f"train_hf.py: stopped by {name} after step {stop_step}; {checkpoint} is complete. "
                           "Resume with: "), last  # fmt: skip
    assert _folders_that_look_complete(run_dir) == (
        ["checkpoint-3"] if stop_step == 3 else ["checkpoint-4", "checkpoint-5"]
    )
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "trainer_state.json").exists()
    assert read_preemption_marker(str(run_dir))["step"] == stop_step
    rows = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    if moment == "lm_eval":
        assert "lm-eval stopped: a stop signal arrived" in caplog.text
        assert not [row for row in rows if any(key.startswith("lm_eval/") for key in row)]
    if moment == "evaluation":
        assert [row["step"] for row in rows if "eval_loss" in row] == [2]  # the evaluation it interrupted finished
    # The same command goes on from there and finishes; the marker goes with the stop.
    monkeypatch.undo()
    assert run_train_hf_script(monkeypatch, config) == 0
    assert f"resume_from_checkpoint=auto: resuming from {checkpoint}" in caplog.text
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == STEPS
    assert read_preemption_marker(str(run_dir)) is None


def test_during_the_final_save_the_run_finishes(tmp_path, monkeypatch, capsys, caplog):
    """The run has trained to max_steps and is writing its final model: that is finished
    first (exit 0, a complete final model, no marker), and the log says the signal came."""
    sent = _signal_when_called(monkeypatch, run, "save_final_model")
    assert run_train_hf_script(monkeypatch, _run_json(tmp_path)) == 0
    assert sent
    run_dir = tmp_path / "run"
    assert (run_dir / "model.safetensors").exists() and (run_dir / "config.json").exists()
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == STEPS
    assert read_preemption_marker(str(run_dir)) is None
    assert "SIGTERM arrived during the final save; the run finished it first." in caplog.text
    assert "Traceback" not in capsys.readouterr().err
