"""`activation_l1`: the penalty's gradient, its logging, that it raises sparsity, and that
off (the default) leaves the model exactly as it was."""

import pytest
import torch
from transformers import Trainer
from transformers.loss.loss_utils import LOSS_MAPPING

from hf_sparse import SparseLlamaConfig, SparseLlamaForCausalLM, SparsityCallback
from hf_sparse.model.modeling_sparse_llama import STAT_FORWARDS, STAT_L1
from tests.conftest import tiny_config, tiny_training_args
from tests.test_telemetry import RandomTokens

LAMBDA = 0.3


@pytest.mark.parametrize("squ_relu", ["relu2", "relu"])
def test_gradients_match_autograd_of_the_penalised_loss(squ_relu):
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(tiny_config(squ_relu=squ_relu, activation_l1=LAMBDA)).double().train()
    reference = SparseLlamaForCausalLM(tiny_config(squ_relu=squ_relu)).double().train()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 16))

    captured = []
    for layer in reference.model.layers:
        layer.mlp.up_proj.register_forward_hook(lambda module, args, out: captured.append(out))
    out = reference(input_ids=ids, labels=ids)
    act = torch.relu if squ_relu == "relu" else (lambda y: torch.relu(y) ** 2)
    expected_loss = out.loss + LAMBDA * sum(act(y).mean() for y in captured)
    expected_loss.backward()

    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    assert loss.item() > out.loss.item() + 1e-6  # the penalty is really in the loss
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert all(layer.mlp.l1_penalty is None for layer in model.model.layers)  # added once, then cleared


def test_no_penalty_without_labels_or_in_eval():
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(tiny_config(activation_l1=LAMBDA))
    plain = SparseLlamaForCausalLM(tiny_config())
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 16))
    model.eval(), plain.eval()
    assert torch.equal(model(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss)


def test_off_by_default_leaves_the_loss_and_the_forward_as_they_were():
    assert SparseLlamaConfig().activation_l1 == 0.0
    model = SparseLlamaForCausalLM(tiny_config()).train()
    # Llama's own loss function, unwrapped, and nothing computed or counted in the MLPs.
    assert model.loss_function is LOSS_MAPPING["ForCausalLM"]
    for layer in model.model.layers:
        layer.mlp.ensure_activation_stats("cpu")
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    for layer in model.model.layers:
        assert layer.mlp.l1_penalty is None
        assert layer.mlp.activation_stats[STAT_L1] == 0 and layer.mlp.activation_stats[STAT_FORWARDS] == 0


def _final_row(tmp_path, name, l1):
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(tiny_config(activation_l1=l1))
    args = tiny_training_args(tmp_path / name, max_steps=20, logging_steps=10)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(128), callbacks=[SparsityCallback()])
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r][-1]


def test_logged_and_raises_sparsity(tmp_path):
    plain, penalised = _final_row(tmp_path, "plain", 0.0), _final_row(tmp_path, "l1", 1.0)
    assert "activation_l1/loss" not in plain
    assert 0.0 < penalised["activation_l1/loss"] < 1.0
    assert penalised["sparsity_relu/mean_across_layers"] > plain["sparsity_relu/mean_across_layers"] + 0.02


def test_with_2to4_exact_backward_matches_autograd_of_the_penalised_masked_ffn():
    """With 2:4 on, the penalty is on the 2:4 activation that reaches down_proj; the `exact`
    backward is the gradient of the masked forward, so autograd of a dense masked reference
    (mask fixed from the forward) must give the same loss and every gradient."""
    from tests.test_sparse_ffn import top2_mask_reference

    torch.manual_seed(0)
    keys = dict(activation_2by4=True, activation_backward="exact", permute_2by4=False, activation_dense_warmup_steps=0)
    model = SparseLlamaForCausalLM(tiny_config(activation_l1=LAMBDA, **keys)).double().train()
    reference = SparseLlamaForCausalLM(tiny_config(**keys)).double().train()
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        for layer in m.model.layers:
            layer.mlp.training_step = 5
    ids = torch.randint(0, 128, (2, 16))

    # The reference MLP: relu(up(x))² masked to its top 2 of each 4 features, then down.
    penalties = []

    def masked_ffn(mlp):
        def forward(x):
            y1 = mlp.up_proj(x)
            a = torch.relu(y1) ** 2
            sparse = a * top2_mask_reference(a.detach())
            penalties.append(sparse.mean())
            return mlp.down_proj(sparse)

        return forward

    for layer in reference.model.layers:
        layer.mlp.forward = masked_ffn(layer.mlp)
    out = reference(input_ids=ids, labels=ids)
    expected = out.loss + LAMBDA * sum(penalties)
    expected.backward()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_with_2to4_in_a_trainer_run(tmp_path):
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(
        tiny_config(activation_l1=0.1, activation_2by4=True, activation_dense_warmup_steps=2)
    )
    args = tiny_training_args(tmp_path / "run", max_steps=4, logging_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64), callbacks=[SparsityCallback()])
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert all(0.0 < r["activation_l1/loss"] < 1.0 for r in rows) and len(rows) == 2
    assert all(layer.mlp.sparse_2by4_active for layer in model.model.layers)


def test_refused_with_silu_and_negative():
    with pytest.raises(ValueError, match="activation_l1 needs squ_relu"):
        tiny_config(activation_l1=0.1, squ_relu="silu")
    with pytest.raises(ValueError, match="activation_l1=-1"):
        tiny_config(activation_l1=-1)


@pytest.mark.parametrize("two_to_four", [False, True])
def test_traces_as_one_graph_and_follows_a_deepcopy(two_to_four):
    import copy

    import torch._dynamo

    keys = dict(activation_2by4=True, activation_dense_warmup_steps=0) if two_to_four else {}
    model = SparseLlamaForCausalLM(tiny_config(activation_l1=LAMBDA, **keys)).train()
    for layer in model.model.layers:
        layer.mlp.training_step = 3
    ids = torch.randint(0, 128, (2, 16))
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    twin = copy.deepcopy(model)
    assert twin.loss_function.__self__ is twin  # the copy adds its own MLPs' terms
    assert torch.equal(twin(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)
