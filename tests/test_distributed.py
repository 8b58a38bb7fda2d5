"""train_hf.py as two processes (torchrun, CPU/gloo) for every mode of the model."""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = {
    "relu2": {},
    # 2:4 activations (auto switch after 2 rows below a threshold every row meets) and 2:4
    # weights (S-STE on the MLP) together, with the flip rate.
    "relu2_2by4": {"activation_2by4": True, "activation_dense_warmup_steps": 100, "activation_auto_switch": True,
                   "activation_auto_switch_max_drop": 1.0, "activation_auto_switch_window": 2,
                   "weight_2by4": True, "flip_rate": True},
    "low_rank": {"loro_scope": "all", "loro_attn_rank": 8, "loro_mlp_rank": 8, "optimizer": "loro_adamw",
                 "loro_freq": 2, "activation_2by4": True, "activation_dense_warmup_steps": 1},
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
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # train_hf.py's own command line, run by a probe that records what outlives it per rank.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(REPO_ROOT, "tests", "dist_exit_probe.py"), str(tmp_path), str(path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("world_size=2") == 2  # both ranks, one job
    for rank in (0, 1):
        # Clean exit: once train_hf closed its process group, nothing holds it and its gloo
        # threads are gone before interpreter teardown (where they aborted ranks now and then).
        left = json.loads((tmp_path / f"exit_rank{rank}.json").read_text())
        assert left["group_defaults"] == [], left
        assert not [name for name in left["threads"] if "gloo" in name], left
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
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(REPO_ROOT, "tests", "fsdp_worker.py"), str(out), variant],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=150,
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


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(p) for p in handle.read().split()]


def _rank_of(pid: int) -> str | None:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    return env.get(b"RANK", b"").decode() or None


@pytest.mark.parametrize("target", ["one_rank", "launcher"])
def test_two_processes_stop_together_on_sigterm(tmp_path, target):
    """SIGTERM to one rank only, or to torchrun (which passes it on): both ranks stop after
    the same step with one complete checkpoint, nobody hangs, rank 0 says how to resume."""
    import signal

    from hf_sparse.training.checkpoints import last_complete_checkpoint

    config = {
        "model_config": os.path.join(REPO_ROOT, "configs", "llama_tiny.json"), "squ_relu": "relu2",
        "max_length": 32, "output_dir": str(tmp_path / "run"), "max_steps": 10000, "per_device_train_batch_size": 4,
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "steps", "save_steps": 100000, "report_to": [],
        "disable_tqdm": True,
    }  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(REPO_ROOT, "train_hf.py"), str(path)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output = []
    for line in proc.stdout:
        output.append(line)
        if sum("'loss'" in seen for seen in output) == 2:
            break
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)
    else:
        workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
        os.kill(workers["1"], signal.SIGTERM)
    output.append(proc.stdout.read())
    proc.wait(timeout=120)  # no rank left waiting in a collective
    text = "".join(output)
    checkpoint = last_complete_checkpoint(str(tmp_path / "run"))
    assert checkpoint is not None, text[-4000:]
    step = int(checkpoint.rsplit("-", 1)[1])
    assert f"train_hf.py: stopped by SIGTERM after step {step}; {checkpoint} is complete." in text, text[-4000:]
    assert text.count("stopped by SIGTERM") == 1  # said once, by rank 0
    assert not (tmp_path / "run" / "model.safetensors").exists()
