"""LORO inside train_hf.py: exact steps on schedule, resume reproduces the trajectory, and
the 2:4 FFN in low-rank mode has the dense masked reference's gradients."""

import json
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
import train_hf  # noqa: E402
from hf_sparse import SparseLlamaForCausalLM, set_training_step  # noqa: E402
from hf_sparse.training.config.run_args import ConfigError  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def _config(tmp_path, name, **overrides):
    config = {
        "model_config": os.path.join(REPO_ROOT, "configs", "llama_tiny.json"),
        "squ_relu": "relu2",
        "loro_scope": "all",
        "loro_attn_rank": 8,
        "loro_mlp_rank": 8,
        "optimizer": "loro_adamw",
        "loro_freq": 3,
        "loro_refresh": "all",
        "loro_refresh_freq": 3,
        "scheduler": "cosine_restart",
        "cosine_restart_warmup": 1,
        "max_length": 32,
        "output_dir": str(tmp_path / name),
        "max_steps": 10,
        "per_device_train_batch_size": 8,
        "learning_rate": 0.01,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "steps",
        "save_steps": 4,
        "report_to": [],
        "disable_tqdm": True,
        "seed": 3,
    }
    config.update(overrides)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _rows(run_dir):
    with open(os.path.join(run_dir, "trainer_state.json")) as handle:
        return {r["step"]: r for r in json.load(handle)["log_history"] if "loss" in r}


def test_loro_run_exact_steps_and_resume(tmp_path):
    train_hf.main([_config(tmp_path, "full")])
    rows = _rows(tmp_path / "full")
    exact_at = [s for s in range(1, 11) if rows[s]["loro/last_step_exact"] == 1.0]
    assert exact_at == [3, 6, 9]
    assert rows[10]["loro/exact_steps"] == 3.0
    first, last = rows[1]["loss"], sum(rows[s]["loss"] for s in (8, 9, 10)) / 3
    assert last < first - 0.2  # loss falls
    assert "weight_sparsity/layer_0/attn_q_proj_in" in rows[1]

    resumed_dir = tmp_path / "resumed"
    train_hf.main(
        [
            _config(
                tmp_path,
                "resumed",
                max_steps=10,
                resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"),
                output_dir=str(resumed_dir),
            )
        ]
    )
    resumed = _rows(resumed_dir)
    assert [s for s in range(5, 11) if resumed[s]["loro/last_step_exact"] == 1.0] == [6, 9]
    for step in range(5, 11):
        assert resumed[step]["loss"] == pytest.approx(rows[step]["loss"], rel=1e-5), step


def test_loro_optimizer_needs_low_rank_linears(tmp_path):
    with pytest.raises(ConfigError, match="loro_adamw.*loro_scope"):
        train_hf.main([_config(tmp_path, "bad", loro_scope=None)])
    with pytest.raises(ConfigError, match="loro_mlp_rank=64 is larger"):
        train_hf.main([_config(tmp_path, "bad", loro_mlp_rank=64)])


@pytest.mark.parametrize("backward", ["exact", "split_gemm"])
def test_low_rank_2to4_ffn_gradients_match_dense_masked_reference(backward):
    config = tiny_config(
        activation_2by4=True,
        activation_dense_warmup_steps=0,
        loro_scope="mlp",
        loro_mlp_rank=8,
        activation_backward=backward,
        activation_dense_features=1.0,
    )
    mlp = SparseLlamaForCausalLM(config).model.layers[0].mlp.double().train()
    set_training_step(mlp, 10)
    x = torch.randn(2, 8, 32, dtype=torch.float64, requires_grad=True)
    out = mlp(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    got = {n: p.grad.clone() for n, p in mlp.named_parameters()}
    got_x = x.grad.clone()

    # Reference: plain autograd over the factor products with the forward 2:4 mask held fixed.
    up_in, up_out = (
        mlp.up_proj.weight_in.detach().clone().requires_grad_(),
        mlp.up_proj.weight_out.detach().clone().requires_grad_(),
    )
    dn_in, dn_out = (
        mlp.down_proj.weight_in.detach().clone().requires_grad_(),
        mlp.down_proj.weight_out.detach().clone().requires_grad_(),
    )
    x_ref = x.detach().clone().requires_grad_()
    act = torch.relu(x_ref @ up_in @ up_out.T) ** 2
    groups = act.detach().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    ref = (act * keep.reshape(act.shape)) @ dn_in @ dn_out.T
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    ref.backward(grad_out)
    for name, ref_param in (
        ("up_proj.weight_in", up_in),
        ("up_proj.weight_out", up_out),
        ("down_proj.weight_in", dn_in),
        ("down_proj.weight_out", dn_out),
    ):
        torch.testing.assert_close(got[name], ref_param.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got_x, x_ref.grad, rtol=1e-9, atol=1e-11)
