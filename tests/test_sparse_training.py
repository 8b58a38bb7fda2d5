"""The 2:4 recipe inside the model and the Trainer: dense warm-up, resume, no host syncs."""

import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_sparse import SparseLlamaForCausalLM, SparsityCallback, set_training_step
from tests.conftest import host_sync_calls, tiny_config, tiny_training_args
from tests.test_telemetry import RandomTokens


def _pair(warmup=2):
    """A 2:4 model and a dense relu2 model with identical weights."""
    sparse = SparseLlamaForCausalLM(tiny_config(activation_2by4=True, activation_dense_warmup_steps=warmup))
    dense = SparseLlamaForCausalLM(tiny_config())
    dense.load_state_dict(sparse.state_dict())
    return sparse.train(), dense.train()


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_warmup_is_bitwise_dense_then_switches():
    sparse, dense = _pair(warmup=2)
    ids = torch.randint(0, 128, (2, 16))
    set_training_step(dense, 0)
    ref_loss, ref_grads = _loss_and_grads(dense, ids)
    for step in (0, 1):
        set_training_step(sparse, step)
        loss, grads = _loss_and_grads(sparse, ids)
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    set_training_step(sparse, 2)
    loss, grads = _loss_and_grads(sparse, ids)
    assert not torch.equal(loss, ref_loss)
    assert not torch.equal(grads["model.layers.0.mlp.up_proj.weight"], ref_grads["model.layers.0.mlp.up_proj.weight"])


def test_sparse_forward_matches_masked_dense_reference():
    """After warm-up each MLP computes down(mask ⊙ relu(up x)²) with a 2:4 mask per token."""
    sparse, _ = _pair(warmup=0)
    mlp = sparse.model.layers[0].mlp.double()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    act = torch.relu(x @ mlp.up_proj.weight.T) ** 2
    groups = act.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    expected = (groups * keep).reshape(act.shape) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)


class _RecordSteps(TrainerCallback):
    def __init__(self):
        self.active, self.losses = {}, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # The step that just ran is global_step - 1 in "optimizer steps completed" terms.
        self.active[state.global_step] = model.model.layers[0].mlp.sparse_2by4_active

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def _run(output_dir, max_steps, resume=None, save_steps=2):
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(tiny_config(activation_2by4=True, activation_dense_warmup_steps=3))
    recorder = _RecordSteps()
    args = tiny_training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=save_steps)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64), callbacks=[SparsityCallback(), recorder])
    trainer.train(resume_from_checkpoint=resume)
    return recorder


def test_warmup_switch_survives_resume(tmp_path):
    full = _run(tmp_path / "full", max_steps=6)
    assert [full.active[s] for s in range(1, 7)] == [False, False, False, True, True, True]

    _run(tmp_path / "part", max_steps=6, save_steps=2)  # leaves checkpoint-2 (inside warm-up)
    resumed = _run(tmp_path / "part", max_steps=6, resume=str(tmp_path / "part" / "checkpoint-2"))
    assert [resumed.active[s] for s in range(3, 7)] == [False, True, True, True]
    for step in range(3, 7):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5)


@pytest.mark.parametrize("activation_2by4", [False, True])
def test_no_host_sync_in_forward_and_backward(monkeypatch, activation_2by4):
    """Wrap the syncing Tensor methods: a training step's forward+backward calls none of them.

    Wrapping the methods (not a TorchFunctionMode) also sees what a custom autograd
    Function's backward calls.
    """
    model = SparseLlamaForCausalLM(tiny_config(activation_2by4=activation_2by4, activation_dense_warmup_steps=1))
    model.train()
    set_training_step(model, 5)
    ids = torch.randint(0, 128, (2, 16))
    model(ids, labels=ids).loss.backward()  # first step creates stat tensors and permutation caches

    def step():
        model(ids, labels=ids).loss.backward()

    assert host_sync_calls(monkeypatch, step) == []
