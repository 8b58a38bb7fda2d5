"""train_hf.py as two processes (torchrun, CPU/gloo) for every mode of the model."""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = {
    "relu2": {},
    "relu2_2by4": {"activation_2by4": True, "activation_dense_warmup_steps": 1},
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
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(REPO_ROOT, "train_hf.py"), str(path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("world_size=2") == 2  # both ranks, one job
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    rows = [r for r in state["log_history"] if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("sparsity_relu/layer_1" in r for r in rows)
    if config.get("activation_2by4"):
        assert "sparsity_24/layer_0" in rows[-1]
    if mode == "low_rank":
        assert rows[-1]["loro/exact_steps"] == 1.0
        assert "weight_sparsity/layer_0/mlp_up_proj_in" in rows[-1]
    assert (tmp_path / "run" / "model.safetensors").exists()
