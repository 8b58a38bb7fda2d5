"""train_hf.py as two processes (torchrun / accelerate launch, CPU/gloo): every mode of the
model, and every way a run ends (success, preemption, errors, a killed rank), each through
tests/dist_exit_probe.py, which records per rank how it exited and what outlived train_hf:
nothing holding a process group may reach interpreter teardown (a DDP Reducer freed there
deadlocked ranks at exit; a surviving gloo thread aborted them)."""

import json
import os
import signal
import time

import pytest

from hf_sparse.training.callbacks.checkpoints import is_complete_checkpoint, last_complete_checkpoint
from hf_sparse.training.callbacks.preemption import read_preemption_marker
from tests import processes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(REPO_ROOT, "tests", "dist_exit_probe.py")
TORCHRUN = processes.TORCHRUN
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# From a stop signal to every rank gone: within torch elastic's 30 s SIGKILL, with a margin.
EXIT_BUDGET_S = 25
STEPS = 30


def _run_json(folder, **overrides) -> str:
    """The tiny model on the embedded corpus, 30 steps, a checkpoint every 4, and
    resume_from_checkpoint "auto": the same command starts, resumes or says it is done."""
    config = {
        "model_config": os.path.join(REPO_ROOT, "configs", "llama_tiny.json"), "squ_relu": "relu2",
        "wandb_sparsityrelu": True, "max_length": 32, "output_dir": str(folder / "run"), "max_steps": STEPS,
        "per_device_train_batch_size": 4, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "steps",
        "save_steps": 4, "report_to": [], "disable_tqdm": True, "seed": 3, "resume_from_checkpoint": "auto",
        **overrides,
    }  # fmt: skip
    path = folder / "run.json"
    path.write_text(json.dumps(config))
    return str(path)


def _probe_command(folder, config, launcher=TORCHRUN, extra=()) -> list:
    return [*launcher, *extra, PROBE, str(folder), config]


def _records(folder) -> dict:
    return {rank: json.loads((folder / f"exit_rank{rank}.json").read_text()) for rank in ("0", "1")}


def _assert_nothing_holds_a_group(records) -> None:
    for rank, record in records.items():
        assert record["holders"] == {"function_defaults": [], "attributes": [], "run_objects": [], "registry": []}, (
            rank, record)  # fmt: skip
        assert not [name for name in record["threads"] if "gloo" in name], (rank, record)


def _losses(run_dir) -> dict:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {row["step"]: row["loss"] for row in state["log_history"] if "loss" in row}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted two-process run the interrupted ones must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    proc = processes.run(_probe_command(folder, _run_json(folder)), env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder


def test_uninterrupted_run_ends_cleanly(reference_run):
    records = _records(reference_run)
    assert [records[r]["exit_code"] for r in ("0", "1")] == [0, 0]
    _assert_nothing_holds_a_group(records)
    rows = json.loads((reference_run / "run" / "trainer_state.json").read_text())["log_history"]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all("sparsity_relu/layer_1" in r for r in rows)
    assert (reference_run / "run" / "model.safetensors").exists()
    assert read_preemption_marker(str(reference_run / "run")) is None


MODES = {
    # 2:4 activations (auto switch after 2 rows below a threshold every row meets) and 2:4
    # weights (S-STE on the MLP) together, with the flip rate.
    "relu2_2by4": {
        "activation_2by4": True,
        "activation_dense_warmup_steps": 100,
        "activation_auto_switch": True,
        "activation_auto_switch_max_drop": 1.0,
        "activation_auto_switch_window": 2,
        "weight_2by4": True,
        "flip_rate": True,
    },
    "low_rank": {
        "loro_scope": "all",
        "loro_attn_rank": 8,
        "loro_mlp_rank": 8,
        "optimizer": "loro_adamw",
        "loro_freq": 2,
        "activation_2by4": True,
        "activation_dense_warmup_steps": 1,
    },
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_process_training(tmp_path, mode):
    config = {
        "model_config": os.path.join(REPO_ROOT, "configs", "llama_tiny.json"),
        "squ_relu": "relu2",
        "wandb_sparsityrelu": True,
        "max_length": 32,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 3,
        "max_eval_samples": 16,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        **MODES[mode],
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    # train_hf.py's own command line, run by a probe that records what outlives it per rank.
    proc = processes.run(_probe_command(tmp_path, str(path)), env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("world_size=2") == 2  # both ranks, one job
    _assert_nothing_holds_a_group(_records(tmp_path))
    for rank in (0, 1):
        left = json.loads((tmp_path / f"exit_rank{rank}.json").read_text())
        assert left["exit_code"] == 0, left
        if config.get("activation_auto_switch"):
            # Decided from the pooled telemetry: the same step on every rank.
            assert left["switch_steps"] == [2], left
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    rows = [r for r in state["log_history"] if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("sparsity_relu/layer_1" in r for r in rows)
    if config.get("activation_2by4"):
        assert "sparsity_24/layer_0" in rows[-1]
    if config.get("activation_auto_switch"):
        assert [r.get("activation_switch_step") for r in rows] == [None, 2, None]
        results = json.loads((tmp_path / "run" / "all_results.json").read_text())
        assert results["activation_switch_step"] == 2
    if config.get("weight_2by4"):
        # counted from both ranks' (identical) 2:4 weights: still the per-matrix fraction
        assert 0.49 < rows[-1]["weight_sparsity/layer_0/mlp_up_proj"] < 0.6
        assert rows[-1]["weight_sparsity/layer_0/attn_q_proj"] < 0.1
        assert all("flip_rate/mean" in r for r in rows)
    if mode == "low_rank":
        assert rows[-1]["loro/exact_steps"] == 1.0
        assert "weight_sparsity/layer_0/mlp_up_proj_in" in rows[-1]
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("variant", ["full", "low_rank", "weight24"])
def test_fsdp_full_shard_telemetry_and_2to4_gradients(tmp_path, variant):
    """FSDP FULL_SHARD (one unit per decoder layer, use_orig_params, as in fsdp.yaml) on CPU:
    weight sparsity is read per original matrix from the shards, activation counts are
    pooled, and the 2:4 op's (and the 2:4 weights') gradients equal the unwrapped model's."""
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = processes.run(
        [
            *processes.TORCHRUN,
            os.path.join(REPO_ROOT, "tests", "fsdp_worker.py"),
            str(out),
            variant,
        ],
        cwd=REPO_ROOT,
        env=env,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["sharded"]  # the parameters really were split across the two ranks
    expected, got = result["expected"], result["got"]
    assert set(got) == set(expected)
    assert any(key.startswith("sparsity_24/") for key in got)
    weight_keys = [key for key in got if key.startswith("weight_sparsity/")]
    assert len(weight_keys) == 2 * (12 if variant == "low_rank" else 6)
    assert all(0.2 < got[key] < 0.4 for key in weight_keys)  # ~30% zeros planted in each matrix
    if variant == "weight24":
        # Sharded 2:4 masters: telemetry falls back to the stored (dense) master's zeros,
        # while the unwrapped model reports its 2:4 weights (~0.5); see README.
        assert all(expected[key] >= 0.49 for key in weight_keys)
        got = {k: v for k, v in got.items() if k not in weight_keys}
        expected = {k: v for k, v in expected.items() if k not in weight_keys}
    assert got == pytest.approx(expected, abs=1e-12)
    assert max(result["grad_errors"].values()) < 1e-5, result["grad_errors"]


# ----- every other way out: errors after the process group exists, preemption, a killed rank

EXIT_PATHS = {
    # Found while the data is packed, after TrainingArguments created the group.
    "config_error": ({"train_files": ["TINY"], "validation_split_percentage": 0}, {},
                     "train_hf.py: error: training data yields no full block"),
    "nonfinite": ({"learning_rate": 1e30, "save_strategy": "no"}, {}, "train_hf.py: error: "),
    "callback_error": ({"save_steps": 2}, {"EXIT_PROBE_RAISE_IN": "hf_sparse.training.callbacks.core:ModelCardCallback.on_save"},
                       "RuntimeError: injected by the exit probe into ModelCardCallback.on_save"),
    # The first in-loop evaluation (step 2) runs on rank 0 while rank 1 waits, and both log
    # its scores; the second (step 4) fails on rank 0 and both ranks learn it.
    "lm_eval_error": ({"lm_eval_tasks": ["hf_sparse_local"], "lm_eval_limit": 2, "lm_eval_steps": 2, "save_steps": 2},
                      {"EXIT_PROBE_RAISE_IN": "hf_sparse.training.callbacks.lm_eval:evaluate_model",
                       "EXIT_PROBE_RAISE_AFTER": "1"},
                      "RuntimeError: lm-eval failed on rank 0: RuntimeError: injected by the exit probe"),
}  # fmt: skip


@pytest.mark.parametrize("path", sorted(EXIT_PATHS))
def test_every_failure_frees_the_run_before_the_group(tmp_path, path):
    """A bad input found after the group exists, the non-finite guard, a callback that raises,
    a failing lm-eval: every rank exits 1 on its own, promptly, and nothing holds a group."""
    overrides, env, expected = EXIT_PATHS[path]
    if overrides.get("train_files") == ["TINY"]:
        (tmp_path / "tiny.txt").write_text("too short\n")
        overrides = dict(overrides, train_files=[str(tmp_path / "tiny.txt")])
    config = _run_json(tmp_path, **overrides)
    proc = processes.run(_probe_command(tmp_path, config), env=dict(ENV, **env), timeout=180)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert expected in proc.stderr, proc.stderr[-4000:]
    records = _records(tmp_path)
    assert [records[r]["exit_code"] for r in ("0", "1")] == [1, 1], records
    _assert_nothing_holds_a_group(records)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    if path == "lm_eval_error":  # rank 0 evaluated at step 2, the row holds its scores
        from tests.test_lm_eval import EXPECTED_KEYS

        state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
        rows = [row for row in state["log_history"] if "loss" in row and row["step"] == 2]
        assert rows and EXPECTED_KEYS <= set(rows[0]), rows


def _send(launched, target: str, signum) -> float:
    launched.wait_for(lambda text: text.count("'loss'") >= 2, 180, "2 log rows")
    ranks = launched.ranks()
    targets = {"launcher": [launched.pid], "rank1": [ranks["1"]], "all": [launched.pid, *ranks.values()]}[target]
    for pid in targets:
        os.kill(pid, signum)
    return time.monotonic()


def _ignore_sigusr1():
    # What `trap '' USR1` does in the shell that starts torchrun: the launcher ignores it
    # (its default action would end it), the ranks install their own handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


@pytest.mark.parametrize("target, signum", [("launcher", signal.SIGTERM), ("rank1", signal.SIGTERM),
                                            ("all", signal.SIGUSR1)])  # fmt: skip
def test_a_stop_signal_stops_every_rank_after_the_same_step(tmp_path, reference_run, target, signum):
    """SIGTERM to the launcher (which passes it on) or to one rank only, and SIGUSR1 to every
    process (what SLURM's --signal=USR1@SECONDS does to a job step; the launcher started with
    USR1 ignored, as README's recipe says): every rank stops after the same step, exits
    128+N on its own well within torch elastic's 30 s, one complete checkpoint, the marker,
    one resume line; the launcher exits 1 (what torchrun and accelerate launch return when a
    worker exits non-zero or they are signalled). Re-running the same command
    (resume_from_checkpoint "auto", as a requeued job does) continues it and reproduces the
    uninterrupted run exactly."""
    config = _run_json(tmp_path)
    command = _probe_command(tmp_path, config)
    code, name = 128 + signum, signal.Signals(signum).name
    preexec = _ignore_sigusr1 if signum == signal.SIGUSR1 else None
    with processes.Launched(command, env=ENV, preexec_fn=preexec) as launched:
        signalled = _send(launched, target, signum)
        # Every rank gone in time; a stop flag that does not reach every rank fails here (the
        # run would finish and exit 0, or hang), not in an outer timeout.
        launched.wait_tree(EXIT_BUDGET_S + 30, f"ranks after {name}")
        took = time.monotonic() - signalled
        launcher_code = launched.wait(30)
    text = launched.output
    records = _records(tmp_path)
    # A stop flag that did not reach every rank shows here: ranks that trained on and exit 0.
    assert [records[r]["exit_code"] for r in ("0", "1")] == [code, code], (records, text[-3000:])
    assert launcher_code == 1, text[-4000:]
    assert took < EXIT_BUDGET_S, f"{took:.1f} s from {name} to every rank gone"
    assert "forcefully exiting" not in text  # nobody needed the launcher's SIGKILL
    _assert_nothing_holds_a_group(records)
    run_dir = tmp_path / "run"
    checkpoint = last_complete_checkpoint(str(run_dir))
    assert checkpoint is not None and [p.name for p in run_dir.glob("checkpoint-*")] == [os.path.basename(checkpoint)]
    step = int(checkpoint.rsplit("-", 1)[1])
    assert f"train_hf.py: stopped by {name} after step {step}; {checkpoint} is complete." in text, text[-4000:]
    assert text.count(f"stopped by {name}") == 1  # said once, by rank 0
    assert not (run_dir / "model.safetensors").exists()
    marker = read_preemption_marker(str(run_dir))
    assert (marker["signal"], marker["exit_code"], marker["step"], marker["checkpoint"]) == (
        name,
        code,
        step,
        checkpoint,
    )
    assert marker["resume_command"].endswith("--resume_from_checkpoint true (with the same launcher: torchrun / "
                                             "accelerate launch ...)")  # fmt: skip
    if target != "launcher":
        return
    # The requeue: the same command again.
    again = processes.run(command, env=ENV, timeout=240)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resume_from_checkpoint=auto: resuming from {checkpoint}" in again.stderr
    expected, got = _losses(reference_run / "run"), _losses(run_dir)
    assert [got[s] for s in range(step + 1, STEPS + 1)] == [expected[s] for s in range(step + 1, STEPS + 1)]
    assert read_preemption_marker(str(run_dir)) is None  # it finished: nothing to resume
    _assert_nothing_holds_a_group(_records(tmp_path))


def test_a_killed_rank_ends_the_group_fast_and_restarts_resume(tmp_path, reference_run):
    """kill -9 one rank mid-run under `torchrun --max-restarts 2`: the other rank is gone
    within seconds (torch elastic stops the group; a rank waiting on a dead peer must not
    hang), the restarted ranks resume from the last complete checkpoint ("auto") and the
    run ends as the uninterrupted one did, loss for loss."""
    run_dir = tmp_path / "run"
    command = _probe_command(tmp_path, _run_json(tmp_path), TORCHRUN, extra=("--max-restarts", "2"))
    # Each attempt its own rendezvous store (train_hf refuses restarts without it: see
    # test_restarts_need_a_store_per_attempt).
    env = dict(ENV, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with processes.Launched(command, env=env) as launched:
        launched.wait_for(lambda _: is_complete_checkpoint(str(run_dir / "checkpoint-4")), 180, "checkpoint-4")
        ranks = launched.ranks()
        os.kill(ranks["1"], signal.SIGKILL)
        killed = time.monotonic()
        while processes.is_running(ranks["0"]):
            assert time.monotonic() - killed < 10, "the surviving rank outlived its dead peer by 10 s"
            time.sleep(0.05)
        code = launched.wait(240)
    if code != 0:  # every attempt's story: the launcher's lines and each rank's first error
        story = [
            line
            for line in launched.output.splitlines()
            if any(k in line for k in ("auto:", "Sending process", "failed (exitcode", "Error", "world_size="))
        ]
        pytest.fail("\n".join(story)[-8000:] + "\n--- last output:\n" + launched.output[-4000:])
    resumed = [line for line in launched.output.splitlines() if "resume_from_checkpoint=auto: resuming from" in line]
    assert resumed, launched.output[-4000:]
    step = int(resumed[-1].rsplit("-", 1)[1])
    assert 4 <= step < STEPS
    expected, got = _losses(reference_run / "run"), _losses(run_dir)
    assert [got[s] for s in range(step + 1, STEPS + 1)] == [expected[s] for s in range(step + 1, STEPS + 1)]
    _assert_nothing_holds_a_group(_records(tmp_path))


def test_restarts_need_a_store_per_attempt():
    """torch elastic's shared rendezvous store breaks restarted groups (pytorch#135712): a
    restart that can happen is refused up front unless each attempt gets its own store."""
    from hf_sparse.training.config.launch_checks import check_launch_environment
    from hf_sparse.training.config.run_args import LaunchError

    worker = {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    with pytest.raises(LaunchError, match=r"max restarts 2.*TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        check_launch_environment({}, env=worker)
    # What the workers see with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, and without restarts:
    check_launch_environment({}, env=dict(worker, TORCHELASTIC_USE_AGENT_STORE="False"))
    check_launch_environment({}, env=dict(worker, TORCHELASTIC_MAX_RESTARTS="0"))
