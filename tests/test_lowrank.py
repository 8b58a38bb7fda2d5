"""LowRankLinear: forward/backward maths, no dense out x in matrix, initialisations."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_sparse.model.lowrank import (
    LOW_RANK_FACTOR_NAMES,
    LowRankLinear,
    init_low_rank_,
    is_low_rank,
    parse_low_rank_init,
)

IN, OUT, RANK = 7, 11, 3  # distinct sizes, so an (OUT, IN) tensor cannot appear by accident
INITS = ("xavier", "auto", "kaiming", "orth", "randn_0.05")


def _layer(bias=True, dtype=torch.float64, **kwargs):
    return LowRankLinear(IN, OUT, RANK, bias=bias, dtype=dtype, **kwargs)


def test_state_dict_keys_and_attributes():
    layer = _layer()
    assert LOW_RANK_FACTOR_NAMES == ("weight_in", "weight_out")
    assert set(layer.state_dict()) == {"weight_in", "weight_out", "bias"}
    assert layer.weight_in.shape == (IN, RANK) and layer.weight_out.shape == (OUT, RANK)
    assert (layer.in_features, layer.out_features, layer.rank) == (IN, OUT, RANK)
    assert set(_layer(bias=False).state_dict()) == {"weight_in", "weight_out"}
    text = repr(layer)
    assert f"in_features={IN}" in text and f"out_features={OUT}" in text and f"rank={RANK}" in text


def test_forward_matches_dense_product():
    layer = _layer()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(5, 2, IN, dtype=torch.float64)
    dense = layer.weight_out @ layer.weight_in.T
    expected = x @ dense.T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.dense_weight(), dense)


def test_factor_gradients_match_hand_formulas():
    layer = _layer()
    x = torch.randn(5, 2, IN, dtype=torch.float64)
    dy = torch.randn(5, 2, OUT, dtype=torch.float64)
    layer(x).backward(dy)
    M, N = layer.weight_out.detach(), layer.weight_in.detach()
    dW = dy.reshape(-1, OUT).T @ x.reshape(-1, IN)  # dL/dW for y = x W^T
    torch.testing.assert_close(layer.weight_out.grad, dW @ N, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight_in.grad, dW.T @ M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, dy.reshape(-1, OUT).sum(0), rtol=1e-12, atol=1e-12)


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _is_dense_shape(shape):
    return len(shape) >= 2 and sorted(shape[-2:]) == sorted((OUT, IN))


def test_dense_matrix_never_materialised():
    layer = _layer()
    x = torch.randn(5, 2, IN, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    recorder = _ShapeRecorder()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
        y = layer(x)
        y.backward(torch.randn_like(y))
    assert saved and recorder.shapes  # the hooks saw the computation
    assert not [s for s in saved if _is_dense_shape(s)], saved
    assert not [s for s in recorder.shapes if _is_dense_shape(s)], recorder.shapes
    # The recorder does catch a dense product when one is formed.
    with _ShapeRecorder() as check:
        layer.dense_weight()
    assert any(_is_dense_shape(s) for s in check.shapes)


@pytest.mark.parametrize("init", INITS)
def test_every_init_runs_and_is_finite(init):
    for dtype in (torch.float32, torch.bfloat16):
        layer = LowRankLinear(64, 96, 16, bias=True, init=init, dtype=dtype)
        for p in layer.parameters():
            assert p.dtype == dtype and torch.isfinite(p).all()
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight_in.float().std() > 0 and layer.weight_out.float().std() > 0


def test_init_statistics():
    n, m, r = 512, 384, 64
    torch.manual_seed(1)
    xavier = LowRankLinear(n, m, r, init="xavier")
    assert xavier.weight_in.std().item() == pytest.approx(math.sqrt(2 / (n + r)), rel=0.05)
    assert xavier.weight_out.std().item() == pytest.approx(math.sqrt(2 / (m + r)), rel=0.05)
    kaiming = LowRankLinear(n, m, r, init="kaiming")
    assert kaiming.weight_in.std().item() == pytest.approx(math.sqrt(2 / r), rel=0.05)
    randn = LowRankLinear(n, m, r, init="randn_0.05")
    assert randn.weight_out.std().item() == pytest.approx(0.05, rel=0.05)
    # `auto` and `orth` target a product with the std of a dense Llama init (0.02).
    for init in ("auto", "orth"):
        layer = LowRankLinear(n, m, r, init=init)
        assert layer.dense_weight().std().item() == pytest.approx(0.02, rel=0.1), init
    wider = LowRankLinear(n, m, r, init="auto", init_range=0.04)
    assert wider.dense_weight().std().item() == pytest.approx(0.04, rel=0.1)


def test_orth_factors_orthonormal_up_to_scale_also_in_bf16():
    n, m, r = 96, 80, 16
    scale_sq = 0.02 * math.sqrt(n * m / r)
    layer = LowRankLinear(n, m, r, init="orth", dtype=torch.float32)
    for f in (layer.weight_in, layer.weight_out):
        torch.testing.assert_close(f.T @ f, scale_sq * torch.eye(r), rtol=0, atol=1e-5)
    bf16 = LowRankLinear(n, m, r, init="orth", dtype=torch.bfloat16)
    for f in (bf16.weight_in, bf16.weight_out):
        assert f.dtype == torch.bfloat16 and torch.isfinite(f).all()
        gram = f.float().T @ f.float() / scale_sq
        # bf16 keeps ~3 significant digits: orthogonal to about 1e-2.
        torch.testing.assert_close(gram, torch.eye(r), rtol=0, atol=3e-2)


@pytest.mark.parametrize("bad", ["foo", "randn", "randn_", "randn_x", "randn_-1", "orthogonal", "", None])
def test_bad_init_raises_naming_loro_init(bad):
    with pytest.raises(ValueError, match="loro_init") as info:
        LowRankLinear(IN, OUT, RANK, init=bad)
    assert "xavier" in str(info.value) and "randn_<std>" in str(info.value)
    if bad is None:  # None means "the layer's own init" for the re-init entry points
        return
    layer = _layer()
    with pytest.raises(ValueError, match="loro_init"):
        layer.reset_parameters(bad)
    with pytest.raises(ValueError, match="loro_init"):
        init_low_rank_(layer, bad)


def test_parse_and_generator_reproducibility():
    assert parse_low_rank_init("randn_0.02") == ("randn", 0.02)
    assert parse_low_rank_init("orth") == ("orth", None)
    for init in INITS:
        a, b = _layer(init=init), _layer(init=init)
        init_low_rank_(a, init, generator=torch.Generator().manual_seed(3))
        init_low_rank_(b, init, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a.weight_in, b.weight_in) and torch.equal(a.weight_out, b.weight_out)
    layer = _layer()
    layer.reset_parameters("randn_0.5")
    assert layer.init == "randn_0.5"


def test_bad_rank_and_is_low_rank():
    for rank in (0, IN + 1, 2.0):
        with pytest.raises(ValueError, match="rank"):
            LowRankLinear(IN, OUT, rank)
    assert is_low_rank(_layer())
    assert not is_low_rank(nn.Linear(IN, OUT))

    class RemoteCopy(nn.Module):  # what a trust_remote_code copy of the class looks like
        def __init__(self):
            super().__init__()
            self.weight_in = nn.Parameter(torch.zeros(IN, RANK))
            self.weight_out = nn.Parameter(torch.zeros(OUT, RANK))

    assert is_low_rank(RemoteCopy())
