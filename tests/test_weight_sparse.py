"""Weight 2:4 (hf_sparse/model/weight_sparse.py): masks, S-STE values, the fixed scale, the
straight-through gradients, MVUE, the schedule and the composition with the 2:4 FFN op.

References are written here independently: masks from a stable sort, values and scales
in float64, gradients by hand.
"""

import copy

import pytest
import torch

from hf_sparse import SparseLlamaForCausalLM, set_training_step
from hf_sparse.model.sparse_ffn import relu2_2to4_ffn
from hf_sparse.model.weight_sparse import Sparse24Linear, Sparse24LowRankLinear, next_weight_generation, sparse_linear
from tests.conftest import host_sync_calls, tiny_config
from tests.cslt_emulator import emulated_cusparselt  # noqa: F401  (fixture)

F64 = torch.float64


def reference_2to4(w, method):
    """(S(w), mask): top-2 |w| of each 4 along dim 1 (stable sort: ties to the lower
    index), S-STE shrinks them by the group's third largest |w|."""
    g = w.reshape(w.shape[0], -1, 4)
    order = torch.sort(g.abs(), dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order.indices[..., :2], True)
    mask &= g != 0
    if method == "ste":
        values = g * mask
    else:
        third = order.values[..., 2:3]
        values = torch.sign(g) * (g.abs() - third).clamp(min=0) * mask
    return values.reshape(w.shape), mask.reshape(w.shape)


def reference_scale(w, s):
    return float((w * s).sum() / (s * s).sum())


def max_nonzeros_per_group(w):
    return int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max())


@pytest.mark.parametrize("method", ["s_ste", "ste"])
def test_linear_forward_is_the_scaled_2to4_weight(method):
    torch.manual_seed(0)
    linear = Sparse24Linear(32, 16, method=method).double()
    x = torch.randn(8, 32, dtype=F64)
    y = linear(x)
    s, mask = reference_2to4(linear.weight.detach(), method)
    scale = reference_scale(linear.weight.detach(), s) if method == "s_ste" else 1.0
    assert linear.weight_2by4_scale.item() == pytest.approx(scale, rel=1e-6)
    effective = linear.effective_weight().detach()
    assert max_nonzeros_per_group(effective) <= 2
    torch.testing.assert_close(effective, s * linear.weight_2by4_scale.to(F64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(y, x @ effective.t(), rtol=1e-12, atol=1e-12)
    assert torch.equal(linear.weight_masks()["weight"], mask)


def test_scale_is_fixed_once_and_travels_with_the_state_dict():
    torch.manual_seed(1)
    linear = Sparse24Linear(32, 16).double()
    x = torch.randn(4, 32, dtype=F64)
    linear(x)
    fixed = linear.weight_2by4_scale.clone()
    with torch.no_grad():
        linear.weight.mul_(3.0).add_(0.1)  # an optimizer step's worth of change and more
    linear(x)
    assert torch.equal(linear.weight_2by4_scale, fixed)  # not recomputed from the new weights
    # A fresh module that loads the state dict uses the saved scale, even though a scale
    # computed from the loaded (moved) weights would differ.
    other = Sparse24Linear(32, 16).double()
    other.load_state_dict(linear.state_dict())
    torch.testing.assert_close(other(x), linear(x), rtol=0, atol=0)
    assert torch.equal(other.weight_2by4_scale, fixed)
    recomputed = reference_scale(other.weight.detach(), reference_2to4(other.weight.detach(), "s_ste")[0])
    assert recomputed != pytest.approx(fixed.item(), rel=1e-3)


@pytest.mark.parametrize("decay", [0.0, 0.3])
def test_master_gradient_is_straight_through_plus_masked_decay(decay):
    torch.manual_seed(2)
    linear = Sparse24Linear(32, 16, masked_decay=decay).double()
    x = torch.randn(12, 32, dtype=F64, requires_grad=True)
    dy = torch.randn(12, 16, dtype=F64)
    linear(x).backward(dy)
    w = linear.weight.detach()
    s, mask = reference_2to4(w, "s_ste")
    scale = linear.weight_2by4_scale.to(F64)
    expected = scale * (dy.t() @ x.detach()) + decay * w * (~mask)
    torch.testing.assert_close(linear.weight.grad, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dy @ (s * scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decay", [0.0, 0.3])
def test_effective_weight_path_gives_the_same_master_gradient(decay):
    # The 2:4 FFN op differentiates through effective_weight(), not through linear(x): the
    # straight-through gradient and the masked decay (its sign included) must match there too.
    torch.manual_seed(2)
    linear = Sparse24Linear(32, 16, masked_decay=decay).double()
    grad_effective = torch.randn(16, 32, dtype=F64)
    linear.effective_weight().backward(grad_effective)
    w = linear.weight.detach()
    _, mask = reference_2to4(w, "s_ste")
    expected = linear.weight_2by4_scale.to(F64) * grad_effective + decay * w * (~mask)
    torch.testing.assert_close(linear.weight.grad, expected, rtol=1e-12, atol=1e-12)


def test_mvue_weight_gradient_is_2to4_along_tokens():
    # With x the identity, dW = g2ᵀ: the MVUE-sparsified output gradient itself. Its 2:4
    # groups must run along tokens (4 consecutive tokens of one output feature), not features.
    torch.manual_seed(5)
    tokens = 16
    w = torch.randn(8, tokens, dtype=F64, requires_grad=True)
    dy = torch.randn(tokens, 8, dtype=F64)
    sparse_linear(torch.eye(tokens, dtype=F64), w, torch.ones(()), "ste", grad_mvue=True).backward(dy)
    g2 = w.grad.t()  # (tokens, out)
    along_tokens = (g2.reshape(tokens // 4, 4, 8) != 0).sum(1)
    along_features = (g2.reshape(tokens, 2, 4) != 0).sum(-1)
    assert along_tokens.max() <= 2
    assert along_features.max() > 2  # a dense random gradient is not 2:4 along features


def test_mvue_weight_gradient_is_unbiased():
    torch.manual_seed(3)
    w = torch.randn(8, 16, dtype=F64, requires_grad=True)
    scale = torch.ones((), dtype=torch.float32)
    x = torch.randn(16, 16, dtype=F64)
    dy = torch.randn(16, 8, dtype=F64)
    draws = 3000
    total = torch.zeros_like(w)
    sq = torch.zeros_like(w)
    for _ in range(draws):
        w.grad = None
        sparse_linear(x, w, scale, "ste", grad_mvue=True).backward(dy)
        total += w.grad
        sq += w.grad**2
    mean = total / draws
    sd = ((sq / draws - mean**2).clamp_min(0) / draws).sqrt()
    exact = dy.t() @ x
    z = ((mean - exact) / sd.clamp_min(1e-12)).abs()
    assert z.max() < 5.5, float(z.max())
    # and it is genuinely sparse per draw: a single draw differs from the exact gradient
    assert not torch.allclose(w.grad, exact)


def test_low_rank_factors_are_2to4_along_their_own_input_dims():
    torch.manual_seed(4)
    linear = Sparse24LowRankLinear(32, 24, 8).double()
    x = torch.randn(6, 32, dtype=F64)
    y = linear(x)
    w_in, w_out = (linear.forward_weights()[k].to(F64) for k in ("weight_in", "weight_out"))
    assert max_nonzeros_per_group(w_in.t()) <= 2  # weight_in (in×r): groups along `in`
    assert max_nonzeros_per_group(w_out) <= 2  # weight_out (out×r): groups along r
    torch.testing.assert_close(y, (x @ w_in) @ w_out.t(), rtol=1e-12, atol=1e-12)
    s_in, _ = reference_2to4(linear.weight_in.detach().t(), "s_ste")
    torch.testing.assert_close(w_in, s_in.t() * linear.weight_in_2by4_scale.to(F64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(linear.effective_weight().detach(), w_out @ w_in.t(), rtol=1e-12, atol=1e-12)


def paired_models(**config):
    """A 2:4-weight model and a dense copy with the very same weights."""
    model = SparseLlamaForCausalLM(tiny_config(weight_2by4=True, **config)).train()
    dense_config = copy.deepcopy(model.config)
    dense_config.weight_2by4 = False
    dense = SparseLlamaForCausalLM(dense_config).train()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.endswith("2by4_scale") for k in unexpected)
    return model, dense


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("step, dense_expected", [(0, True), (1, True), (2, False), (7, False), (8, True), (9, True)])
def test_schedule_start_step_and_dense_tail(step, dense_expected):
    # start at step 2, dense for the last 2 of 10 steps: steps 0-1 and 8-9 are dense.
    model, dense = paired_models(weight_2by4_start_step=2, sparse_dense_finetune_steps=2, weight_2by4_scope="all")
    set_training_step(model, step, 10)
    set_training_step(dense, step, 10)
    ids = torch.randint(0, 128, (2, 16))
    loss, grads = loss_and_grads(model, ids)
    loss_d, grads_d = loss_and_grads(dense, ids)
    if dense_expected:
        assert torch.equal(loss, loss_d)
        assert all(torch.equal(grads[n], grads_d[n]) for n in grads)
    else:
        assert not torch.equal(loss, loss_d)


def test_without_a_trainer_the_model_runs_as_the_run_ended():
    sparse_end = SparseLlamaForCausalLM(tiny_config(weight_2by4=True))
    dense_tail = SparseLlamaForCausalLM(tiny_config(weight_2by4=True, sparse_dense_finetune_steps=5))
    assert sparse_end.model.layers[0].mlp.up_proj.sparse_weight_on
    assert not dense_tail.model.layers[0].mlp.up_proj.sparse_weight_on
    set_training_step(dense_tail, 3, 100)
    assert dense_tail.model.layers[0].mlp.up_proj.sparse_weight_on
    set_training_step(dense_tail, None)
    assert not dense_tail.model.layers[0].mlp.up_proj.sparse_weight_on


def test_activation_dense_tail():
    model = SparseLlamaForCausalLM(
        tiny_config(
            weight_2by4=True,
            activation_2by4=True,
            activation_dense_warmup_steps=0,
            sparse_dense_finetune_steps=2,
            activation_dense_finetune=True,
        )
    )
    set_training_step(model, 5, 10)
    assert model.model.layers[0].mlp.sparse_2by4_active
    set_training_step(model, 8, 10)
    assert not model.model.layers[0].mlp.sparse_2by4_active
    assert not model.model.layers[0].mlp.up_proj.sparse_weight_on


@pytest.mark.parametrize("low_rank", [False, True])
def test_the_2to4_ffn_op_receives_the_effective_weights(low_rank):
    extra = dict(loro_scope="mlp", loro_mlp_rank=8) if low_rank else {}
    config = tiny_config(
        weight_2by4=True, activation_2by4=True, activation_dense_warmup_steps=0, permute_2by4=False, **extra
    )
    model = SparseLlamaForCausalLM(config).double().train()
    set_training_step(model, 3, 100)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 8, 32, dtype=F64)
    got = mlp(x)
    up, down = mlp.up_proj.effective_weight().detach(), mlp.down_proj.effective_weight().detach()
    assert max_nonzeros_per_group(down) <= 2 or low_rank
    expected = relu2_2to4_ffn(x, up, down, method=config.activation_sparse_method, backward=config.activation_backward)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert mlp.up_proj.weight_in.grad is not None if low_rank else mlp.up_proj.weight.grad is not None


def test_no_host_sync_in_a_weight_2to4_training_step(monkeypatch):
    model = SparseLlamaForCausalLM(
        tiny_config(weight_2by4=True, weight_2by4_scope="all", weight_grad_mvue=True, weight_masked_decay=1e-4)
    )
    model.train()
    set_training_step(model, 5, 100)
    ids = torch.randint(0, 128, (2, 16))
    model(ids, labels=ids).loss.backward()  # first step fixes the scales

    def step():
        model(ids, labels=ids).loss.backward()

    assert host_sync_calls(monkeypatch, step) == []


def test_bad_weight_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="weight_sparse_method='topk' is not valid; choose one of 's_ste', 'ste'"):
        tiny_config(weight_2by4=True, weight_sparse_method="topk")
    with pytest.raises(ValueError, match="weight_2by4_scope='ffn' is not valid"):
        tiny_config(weight_2by4=True, weight_2by4_scope="ffn")
    # A low-rank FFN's weight_out is 2:4 along the rank: rank 6 cannot be split into fours.
    with pytest.raises(ValueError, match="mlp weight_out has input width 6"):
        tiny_config(weight_2by4=True, loro_scope="mlp", loro_mlp_rank=6)
    tiny_config(weight_2by4=False, loro_scope="mlp", loro_mlp_rank=6)  # fine without weight 2:4


def test_kernel_forward_compresses_once_per_optimizer_step(emulated_cusparselt):
    torch.manual_seed(5)
    linear = Sparse24Linear(64, 32).to(torch.bfloat16)
    opt = torch.optim.SGD(linear.parameters(), lr=0.1)
    next_weight_generation(linear)  # what SparsityCallback does at train begin
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    y = linear(x)
    y2 = linear(x)  # a second micro-batch: the compressed weight is reused
    assert len(emulated_cusparselt.compressed) == 1 and emulated_cusparselt.compressed[0].shape == (32, 64)
    assert [(c.m, c.k, c.n, c.b_layout, c.transpose_result) for c in emulated_cusparselt.mm_calls] == [
        (32, 64, 32, "col", True)
    ] * 2  # yᵀ = W̃·xᵀ with xᵀ read as the transpose of the contiguous x
    reference = torch.nn.functional.linear(x.float(), linear.effective_weight().detach().float())
    assert (y.float() - reference).norm() <= 1e-2 * reference.norm()
    assert torch.equal(y, y2)
    (y.float().sum() + y2.float().sum()).backward()
    opt.step()
    next_weight_generation(linear)  # what SparsityCallback does after each optimizer step
    linear(x)
    assert len(emulated_cusparselt.compressed) == 2
    # Unaligned token counts use the plain GEMM, without compressing anything.
    linear(torch.randn(3, 64, dtype=torch.bfloat16))
    assert len(emulated_cusparselt.compressed) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weight_2to4_forward_on_cusparselt(monkeypatch):
    from hf_sparse.model import kernels

    if torch.cuda.get_device_capability() < kernels.MIN_CAPABILITY or not kernels.cusparselt_available():
        pytest.skip("needs sm80+ and a PyTorch build with cuSPARSELt")
    seen = []
    original = torch._cslt_compress

    def checked(a):
        seen.append(tuple(a.shape))
        assert int((a.reshape(a.shape[0], -1, 4) != 0).sum(-1).max()) <= 2  # 2:4 along rows
        return original(a)

    monkeypatch.setattr(torch, "_cslt_compress", checked)
    monkeypatch.setenv("HF_SPARSE_2TO4_GEMMS", "sparse")  # the cuSPARSELt GEMM, whatever is faster
    torch.manual_seed(6)
    linear = Sparse24Linear(1024, 512).to("cuda", torch.bfloat16)
    x = torch.randn(8, 256, 1024, device="cuda", dtype=torch.bfloat16)
    linear(x)  # the first call verifies the alg id at this shape (compressing random operands)
    seen.clear()
    y = linear(x)
    assert seen == [(512, 1024)]
    reference = torch.nn.functional.linear(x.float(), linear.effective_weight().detach().float())
    assert ((y.float() - reference).norm() / reference.norm()).item() < 1e-2


@pytest.mark.parametrize("with_generation", [False, True])
def test_cached_2to4_weight_follows_a_fused_optimizer(with_generation):
    # Fused AdamW updates weights without bumping their version counters: the per-step
    # cache must be invalidated by the generation bump, and is off without one.
    torch.manual_seed(7)
    linear = Sparse24Linear(32, 16)
    opt = torch.optim.AdamW(linear.parameters(), lr=0.5, fused=True)
    if with_generation:
        next_weight_generation(linear)
    x = torch.randn(8, 32)
    for _ in range(3):
        linear(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        if with_generation:
            next_weight_generation(linear)
        expected = x @ linear.effective_weight().detach().t()
        fresh = reference_2to4(linear.weight.detach(), "s_ste")[0] * linear.weight_2by4_scale
        torch.testing.assert_close(linear.effective_weight().detach(), fresh, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(linear(x).detach(), expected, rtol=1e-6, atol=1e-6)
