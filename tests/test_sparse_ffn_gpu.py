"""GPU tests of the 2:4 FFN op: the cuSPARSELt path against the reference path.

Run on a CUDA box with ``python -m pytest -q -m gpu tests/test_sparse_ffn_gpu.py`` (see
benchmarks/gpu_check.sh). Skipped without CUDA. Imports only torch and hf_sparse.
"""

import logging
import math

import pytest
import torch

import hf_sparse.sparse_ffn as sparse_ffn
from hf_sparse import kernels
from hf_sparse.sparse_ffn import BACKWARD_MODES, SPARSE_METHODS, make_token_permutation, relu2_2to4_ffn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def kernel_capable():
    if torch.cuda.get_device_capability() < kernels.MIN_CAPABILITY:
        pytest.skip("2:4 sparse tensor cores need sm80+")
    if not kernels.cusparselt_available():
        pytest.skip("this PyTorch build has no cuSPARSELt")


def make_inputs(t, d, f, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    w_up = torch.randn(f, d, generator=g) / math.sqrt(d)
    w_down = torch.randn(d, f, generator=g) / math.sqrt(f)
    dy = torch.randn(t, d, generator=g)
    return tuple(a.to(DEV, dtype) for a in (x, w_up, w_down, dy))


def run_op(x, w_up, w_down, dy, seed=123, **kw):
    x, w_up, w_down = (a.clone().requires_grad_() for a in (x, w_up, w_down))
    torch.manual_seed(seed)  # same MVUE draws on both paths
    y = relu2_2to4_ffn(x, w_up, w_down, **kw)
    y.backward(dy)
    return y.detach(), x.grad, w_up.grad, w_down.grad


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture
def count_kernel_calls(monkeypatch):
    calls = []
    orig = sparse_ffn.sparse24_mm

    def spy(*args, **kwargs):
        calls.append(kwargs.get("transpose_result", False))
        return orig(*args, **kwargs)

    monkeypatch.setattr(sparse_ffn, "sparse24_mm", spy)
    return calls


def test_eligibility():
    kernel_capable()
    x, w_up, w_down, _ = make_inputs(128, 64, 256)
    assert kernels.gpu_2to4_eligible(x, w_up, w_down), kernels.ineligibility_reason(x, w_up, w_down)
    assert not kernels.gpu_2to4_eligible(x[:100], w_up, w_down)  # T not aligned
    assert not kernels.gpu_2to4_eligible(x.float(), w_up.float(), w_down.float())  # fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_configured_alg_id_is_correct_at_ffn_shapes(dtype):
    """Some cuSPARSELt alg ids have returned wrong results: check the one in use at the
    (m, k, n) of the FFN's sparse GEMMs (130m shape, 4096 tokens) in all layouts."""
    kernel_capable()
    alg = kernels.cusparselt_alg_id()
    ok, detail = kernels.check_alg_id(DEV, dtype, alg, shapes=((4096, 3072, 768), (3072, 4096, 768), (256, 512, 128)))
    assert ok, f"alg_id {alg}: {detail}"
    assert kernels.self_check(DEV, dtype)


def test_probe_alg_ids_reports(caplog):
    kernel_capable()
    res = kernels.probe_alg_ids(DEV, torch.bfloat16, max_alg_id=8)
    bad = {a: d for a, (ok, d) in res.items() if not ok}
    logging.getLogger(__name__).warning("cuSPARSELt alg ids failing the check: %s", bad)
    assert res[0][0], res[0][1]  # the default must be usable


@pytest.mark.parametrize("transpose_result", [False, True])
@pytest.mark.parametrize("b_layout", ["row", "col"])
def test_sparse24_mm_matches_dense(transpose_result, b_layout):
    kernel_capable()
    g = torch.Generator(device=DEV).manual_seed(0)
    m, k, n = 1024, 2048, 512
    a = torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16)
    a, _ = sparse_ffn.sparsify_2to4(a, "naive")
    b = torch.randn(k, n, device=DEV, generator=g, dtype=torch.bfloat16)
    if b_layout == "col":
        b = b.t().contiguous().t()
    out = kernels.sparse24_mm(a, b, transpose_result=transpose_result)
    ref = a.float() @ b.float()
    if transpose_result:
        assert out.shape == (n, m) and out.is_contiguous()
        out = out.t()
    assert out.shape == (m, n)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward", BACKWARD_MODES)
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_kernel_path_matches_reference_path(method, backward, dtype, monkeypatch, count_kernel_calls):
    kernel_capable()
    x, w_up, w_down, dy = make_inputs(1024, 256, 1024, dtype=dtype, seed=1)
    perm = make_token_permutation(1024, seed=3, device=DEV)
    kw = dict(method=method, backward=backward, dense_features=0.05, permutation=perm)
    got = run_op(x, w_up, w_down, dy, **kw)
    # forward, dx, and the two weight gradients (2 for exact/dense only on dx)
    assert len(count_kernel_calls) == (2 if backward == "exact" else 4)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    ref = run_op(x, w_up, w_down, dy, **kw)
    assert len(count_kernel_calls) == (2 if backward == "exact" else 4)  # unchanged
    for name, a, b in zip(("y", "dx", "dw_up", "dw_down"), got, ref):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 2e-2, f"{method}/{backward}/{name}: {rel_err(a, b):.3g}"


def test_split_gemm_full_dense_equals_exact_on_gpu():
    kernel_capable()
    x, w_up, w_down, dy = make_inputs(512, 128, 512, seed=2)
    a = run_op(x, w_up, w_down, dy, backward="split_gemm", dense_features=1.0)
    b = run_op(x, w_up, w_down, dy, backward="exact")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_unaligned_falls_back_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    x, w_up, w_down, dy = make_inputs(100, 64, 256)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        first = run_op(x, w_up, w_down, dy)
        run_op(x, w_up, w_down, dy)
    msgs = [r.getMessage() for r in caplog.records if "reference GEMMs" in r.getMessage()]
    assert len(msgs) == 1, msgs
    # same semantics as the CPU reference (float32 to compare the masks exactly)
    cpu = run_op(*(a.float().cpu() for a in (x, w_up, w_down, dy)))
    gpu32 = run_op(*(a.float() for a in (x, w_up, w_down, dy)))
    for a, b in zip(gpu32, cpu):
        assert rel_err(a.cpu(), b) < 1e-3
    assert all(torch.isfinite(t).all() for t in first)


def test_no_host_sync_on_gpu():
    kernel_capable()
    x, w_up, w_down, dy = make_inputs(1024, 256, 1024, seed=4)
    perm = make_token_permutation(1024, seed=0, device=DEV)
    stats = torch.zeros(3, dtype=torch.float64, device=DEV)
    run_op(x, w_up, w_down, dy, permutation=perm, stats=stats)  # one-off alg-id self-check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for method in SPARSE_METHODS:
            for backward in BACKWARD_MODES:
                run_op(x, w_up, w_down, dy, method=method, backward=backward, permutation=perm, stats=stats)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert stats[1].item() == 10 * 1024 * 1024
