"""Interrupt and resume: SIGKILL mid-run, resume from the last finished checkpoint, same
trajectory; half-written checkpoints are never picked; checkpoints are hub-ready."""

import json
import logging
import os
import signal
import sys
import textwrap
import time

import pytest

from hf_sparse.training.callbacks.checkpoints import is_complete_checkpoint, last_complete_checkpoint
from tests.conftest import WITHOUT_HF_SPARSE  # noqa: E402
from tests import processes  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO_ROOT, "train_hf.py")
MAX_STEPS = 24


def _config(tmp_path, name, **overrides):
    config = {
        "model_config": os.path.join(REPO_ROOT, "configs", "llama_tiny.json"),
        "squ_relu": "relu2",
        "activation_2by4": True,
        "activation_dense_warmup_steps": 10,
        "max_length": 32,
        "output_dir": str(tmp_path / name),
        "max_steps": MAX_STEPS,
        "per_device_train_batch_size": 8,
        "learning_rate": 0.003,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": [],
        "disable_tqdm": True,
        "seed": 1,
    }
    config.update(overrides)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _losses(run_dir):
    with open(os.path.join(run_dir, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    return {row["step"]: row["loss"] for row in history if "loss" in row}


def test_half_written_checkpoints_are_never_last(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False), (8, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text('{"log_hist')  # cut mid-write
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert not is_complete_checkpoint(str(tmp_path / "checkpoint-6"))


def test_sigkill_then_resume_continues_the_same_trajectory(tmp_path, caplog):
    """A run killed outright (SIGKILL, a real process) resumes from its last complete
    checkpoint and follows the uninterrupted run. The uninterrupted run and the resume run
    in this process (no interpreter start each; losses compared to 1e-4, so the thread
    count does not matter)."""
    import train_hf

    caplog.set_level(logging.INFO, logger="train_hf")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train_hf.main([_config(tmp_path, "full")])

    killed_dir = tmp_path / "killed"
    with processes.Launched([sys.executable, TRAIN, _config(tmp_path, "killed")], env=env) as victim:
        victim.wait_for(lambda _: is_complete_checkpoint(str(killed_dir / "checkpoint-4")), 300, "checkpoint-4")
        victim.proc.send_signal(signal.SIGKILL)
        victim.wait(60)
    assert not (killed_dir / "trainer_state.json").exists()  # it really died mid-run
    last = last_complete_checkpoint(str(killed_dir))
    resumed_from = int(last.rsplit("-", 1)[1])
    assert 4 <= resumed_from < MAX_STEPS

    train_hf.main([_config(tmp_path, "killed", resume_from_checkpoint=True)])
    assert f"resuming from {last}" in caplog.text

    expected, got = _losses(tmp_path / "full"), _losses(killed_dir)
    after = [step for step in range(resumed_from + 1, MAX_STEPS + 1)]
    assert [got[s] for s in after] == pytest.approx([expected[s] for s in after], rel=1e-4)

    # A finished run stays finished: resuming it with the same max_steps trains nothing and
    # leaves every file as it was (it used to train step 25 and overwrite the final model).
    full_dir = tmp_path / "full"
    before = {name: (full_dir / name).read_bytes() for name in ("model.safetensors", "trainer_state.json")}
    entries = sorted(os.listdir(full_dir))
    caplog.clear()
    assert train_hf.main([_config(tmp_path, "full", resume_from_checkpoint="last")]) == {}
    said = [r.getMessage() for r in caplog.records if "nothing to train" in r.getMessage()]
    assert len(said) == 1 and f"at step {MAX_STEPS} of max_steps={MAX_STEPS}" in said[0], said
    assert {name: (full_dir / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(full_dir)) == entries  # no checkpoint-25, nothing new
    # A lowered max_steps (the last checkpoint is past it), and "auto" on the finished run
    # (a requeued job that already finished): nothing to train either, nothing touched.
    config = _config(tmp_path, "full")
    assert train_hf.main([config, "--max_steps", "20", "--resume_from_checkpoint", "last"]) == {}
    assert train_hf.main([config, "--resume_from_checkpoint", "auto"]) == {}
    assert train_hf.main([config, "--resume_from_checkpoint", "auto", "--max_steps", "20"]) == {}
    assert {name: (full_dir / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(full_dir)) == entries


def _stop_after_logged_steps(launched, steps: int, signals) -> None:
    """Send ``signals`` (one after the other) once the run has printed ``steps`` log rows."""
    launched.wait_for(lambda text: text.count("'loss'") >= steps, 300, f"{steps} log rows")
    for signum in signals:
        launched.proc.send_signal(signum)
        time.sleep(0.05)


def test_sigterm_stops_after_a_checkpoint_and_a_second_ctrl_c_at_once(tmp_path):
    """A real process and a real SIGTERM (preemption): it finishes the step, writes a
    complete checkpoint, says how to resume in one line and exits 143, no traceback. No
    periodic checkpoints here: the signal's is the only one. A Ctrl-C pressed twice stops
    at once (130, one line, no traceback). (That the resumed run reproduces the
    uninterrupted one exactly: test_distributed.py, 2 processes; every moment a signal can
    land and the resume after it: test_signals.py.)"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    steps = 12
    config = _config(tmp_path, "stopped", max_steps=steps, save_strategy="steps", save_steps=1000)
    with processes.Launched([sys.executable, TRAIN, config], env=env, merge_output=False) as proc:
        _stop_after_logged_steps(proc, 3, [signal.SIGTERM])
        code = proc.wait(120)
    stderr = proc.stderr
    assert code == 143, stderr[-3000:]
    stopped_dir = tmp_path / "stopped"
    checkpoint = last_complete_checkpoint(str(stopped_dir))
    assert checkpoint is not None, stderr[-3000:]
    stopped_at = int(checkpoint.rsplit("-", 1)[1])
    assert 3 <= stopped_at < steps
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"train_hf.py: stopped by SIGTERM after step {stopped_at}; "), last
    assert f"{checkpoint} is complete. Resume with: python " in last and last.endswith("--resume_from_checkpoint true")
    assert "Traceback" not in stderr
    # Nothing looks finished: no final model, no trainer_state.json at the top.
    assert not (stopped_dir / "model.safetensors").exists() and not (stopped_dir / "trainer_state.json").exists()
    assert json.loads((stopped_dir / "preempted.json").read_text())["checkpoint"] == checkpoint

    with processes.Launched([sys.executable, TRAIN, _config(tmp_path, "twice", max_steps=1000)], env=env,
                            merge_output=False) as twice:  # fmt: skip
        _stop_after_logged_steps(twice, 2, [signal.SIGINT, signal.SIGINT])
        code = twice.wait(120)
    stderr = twice.stderr
    # 130, or killed by the SIGINT itself (-2, which a shell also reports as 130) when it
    # arrives once the interpreter is finalizing and has put the default handler back.
    assert code in (130, -signal.SIGINT), stderr[-3000:]
    # The second Ctrl-C lands during the step (stop at once) or, if that step and its
    # checkpoint were quicker, while the process exits: either way one line, no traceback.
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(("second Ctrl-C: stopped at once", "train_hf.py: stopped by SIGINT")), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


def test_resuming_a_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    import train_hf
    from hf_sparse.training.config.run_args import ConfigError

    missing = str(tmp_path / "run" / "checkpoint-999")
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint: '.*checkpoint-999' does not exist; or use true"):
        train_hf.main([_config(tmp_path, "run", resume_from_checkpoint=missing)])
    assert not (tmp_path / "run").exists()


def test_checkpoint_is_hub_ready_and_generates_without_hf_sparse(tmp_path):
    import train_hf

    train_hf.main([_config(tmp_path, "hub", max_steps=2)])  # in this process; the loading below is not
    checkpoint = tmp_path / "hub" / "checkpoint-2"
    names = set(os.listdir(checkpoint))
    assert {
        "config.json",
        "model.safetensors",
        "modeling_sparse_llama.py",
        "configuration_sparse_llama.py",
        "sparse_ffn.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= names
    card = (checkpoint / "README.md").read_text()
    assert "2:4 activation sparsity on the ReLU² output" in card and "warm-up: 10" in card
    assert "auto_map" in json.loads((checkpoint / "config.json").read_text())
    final_card = (tmp_path / "hub" / "README.md").read_text()
    assert "FFN: non-gated relu2" in final_card

    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(checkpoint)!r}
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("def main():", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 5, out.shape
        print("GENERATED", tok.decode(out[0]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = processes.run([sys.executable, "-c", WITHOUT_HF_SPARSE + script], cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GENERATED" in result.stdout


def test_streaming_resume_skips_what_was_consumed(tmp_path):
    # A streamed corpus has no length: the resumed run must skip the batches already
    # trained on (not start the stream again), so its losses match the uninterrupted run.
    import train_hf

    stream = dict(streaming=True, shuffle_buffer_size=64, activation_dense_warmup_steps=3, max_steps=6, save_steps=3)
    train_hf.main([_config(tmp_path, "stream_full", **stream)])
    checkpoint = tmp_path / "stream_full" / "checkpoint-3"
    train_hf.main([_config(tmp_path, "stream_resumed", resume_from_checkpoint=str(checkpoint), **stream)])
    expected, got = _losses(tmp_path / "stream_full"), _losses(tmp_path / "stream_resumed")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's history
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([expected[s] for s in (4, 5, 6)], rel=1e-4)
    # Restarting the stream instead would train steps 4-6 on the blocks of steps 1-3.
    assert got[4] != pytest.approx(expected[1], rel=1e-3)


def test_auto_resume_picks_the_last_checkpoint_or_starts_or_stops(tmp_path):
    """resume_from_checkpoint "auto", decided before anything is built: the last complete
    checkpoint; none -> a new run; a finished run -> nothing to train, or one line when a
    larger max_steps has no checkpoint to continue from."""
    from transformers import TrainingArguments

    from hf_sparse.training.run import already_finished, resolve_resume
    from hf_sparse.training.config.run_args import ConfigError

    out = tmp_path / "run"

    def args(max_steps):
        return TrainingArguments(output_dir=str(out), max_steps=max_steps, resume_from_checkpoint="auto",
                                 use_cpu=True, report_to=[])  # fmt: skip

    assert resolve_resume(args(10)) is None and not already_finished(None, args(10))  # nothing there: a new run
    for step in (4, 8):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (out / "checkpoint-12").mkdir()  # half-written: never picked
    assert resolve_resume(args(10)) == str(out / "checkpoint-8") and not already_finished(
        str(out / "checkpoint-8"), args(10)
    )
    assert already_finished(resolve_resume(args(6)), args(6))  # past a lowered max_steps
    # The run finished at step 10 (final config.json and trainer_state.json in output_dir).
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (out / "config.json").write_text("{}")
    assert resolve_resume(args(10)) is None and already_finished(None, args(10))
    assert resolve_resume(args(20)) == str(out / "checkpoint-8")  # a larger max_steps continues it
    for name in ("checkpoint-4", "checkpoint-8"):
        for file in (out / name).iterdir():
            file.unlink()
        (out / name).rmdir()
    with pytest.raises(ConfigError, match=r"finished at step 10 and no checkpoint to continue it to max_steps=20"):
        already_finished(resolve_resume(args(20)), args(20))
