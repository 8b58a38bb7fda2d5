"""GPU tests of the 2:4 FFN op: the cuSPARSELt path against the reference path.

Run on a CUDA box with ``python -m pytest -q -m gpu tests/test_sparse_ffn_gpu.py`` (see
benchmarks/gpu_check.sh). Skipped without CUDA. Imports only torch and hf_sparse.
"""

import logging
import math

import pytest
import torch

import hf_sparse.model.ffn_stages as ffn_stages
import hf_sparse.model.gemm_tuning as gemm_tuning
import hf_sparse.model.sparse_ffn as sparse_ffn
from hf_sparse.model import gemm_backends, kernels
from hf_sparse.model.gemm_backends import CUSPARSELT, DISABLE_ENV
from hf_sparse.model.gemm_tuning import GemmShape, GemmTuner, verify_alg_id
from hf_sparse.model.sparse_ffn import BACKWARD_MODES, SPARSE_METHODS, make_token_permutation, relu2_2to4_ffn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


@pytest.fixture(autouse=True)
def every_gemm_sparse(monkeypatch):
    """These tests check the cuSPARSELt path itself: every GEMM on it sparse (its alg id
    verified at each shape) rather than the tuned per-shape verdicts, which
    test_tuned_verdicts_at_ffn_shapes covers."""
    monkeypatch.setenv(gemm_tuning.GEMMS_ENV, "sparse")


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


@pytest.fixture
def compressed_operands_are_2to4(monkeypatch):
    """Check every operand handed to cuSPARSELt: 2-D, row-major, <= 2 non-zeros per group
    of 4 along rows (compression does not prune: anything else is silently garbage)."""
    seen = []
    orig = torch._cslt_compress

    def checked(a):
        assert a.dim() == 2 and a.is_contiguous(), (a.shape, a.stride())
        nnz = (a.reshape(a.shape[0], -1, 4) != 0).sum(-1)
        assert int(nnz.max()) <= 2, f"operand {tuple(a.shape)} is not 2:4 along rows"
        seen.append(tuple(a.shape))
        return orig(a)

    monkeypatch.setattr(torch, "_cslt_compress", checked)
    return seen


def test_eligibility():
    kernel_capable()
    x, w_up, w_down, _ = make_inputs(128, 64, 256)
    assert CUSPARSELT.ineligibility_reason(x, w_up, w_down) is None
    assert gemm_backends.select_gemms(x, w_up, w_down) is CUSPARSELT
    assert "token count" in CUSPARSELT.ineligibility_reason(x[:100], w_up, w_down)  # T not aligned
    assert "dtype" in CUSPARSELT.ineligibility_reason(x.float(), w_up.float(), w_down.float())  # fp32


def check_alg_id(dtype, alg_id, shapes):
    """``alg_id`` against a dense GEMM at each (m, k, n) in the FFN's three layouts (row-major
    B, transposed B, transposed result): (ok, detail of the first failure or the worst error)."""
    name = str(dtype).replace("torch.", "")
    details = []
    for m, k, n in shapes:
        for layout, transpose_result in (("row", False), ("col", False), ("row", True)):
            ok, detail = verify_alg_id(GemmShape(m, k, n, layout, transpose_result, name), DEV, alg_id)
            if not ok:
                return False, detail
            details.append(detail)
    return True, max(details, key=lambda d: float(d.rsplit(" ", 1)[-1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_configured_alg_id_is_correct_at_ffn_shapes(dtype):
    """Some cuSPARSELt alg ids have returned wrong results: check the one in use at the
    (m, k, n) of the FFN's sparse GEMMs (130m shape, 4096 tokens) in all layouts."""
    kernel_capable()
    alg = kernels.cusparselt_alg_id()
    ok, detail = check_alg_id(dtype, alg, shapes=((4096, 3072, 768), (3072, 4096, 768), (256, 512, 128)))
    assert ok, f"alg_id {alg}: {detail}"


def test_probe_alg_ids_reports(caplog):
    kernel_capable()
    res = {alg: check_alg_id(torch.bfloat16, alg, shapes=((256, 512, 128),)) for alg in range(8)}
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
    out = CUSPARSELT.mm(a, b, transpose_result=transpose_result)
    ref = a.float() @ b.float()
    if transpose_result:
        assert out.shape == (n, m) and out.is_contiguous()
        out = out.t()
    assert out.shape == (m, n)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward", BACKWARD_MODES)
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_kernel_path_matches_reference_path(
    method, backward, dtype, monkeypatch, count_kernel_calls, compressed_operands_are_2to4
):
    kernel_capable()
    x, w_up, w_down, dy = make_inputs(1024, 256, 1024, dtype=dtype, seed=1)
    x[5, 7] = float("nan")  # NaN must not break 2:4 (it ranks highest, the group keeps 2)
    perm = make_token_permutation(1024, seed=3, device=DEV)
    kw = dict(method=method, backward=backward, dense_features=0.05, permutation=perm)
    # Every GEMM sparse (each shape's alg id verified once, on the first call, which also
    # compresses random operands: not counted below).
    monkeypatch.setenv(gemm_tuning.GEMMS_ENV, "sparse")
    run_op(x, w_up, w_down, dy, **kw)
    count_kernel_calls.clear()
    compressed_operands_are_2to4.clear()
    got = run_op(x, w_up, w_down, dy, **kw)
    # forward, dx, and the two weight gradients (2 for exact/dense only on dx)
    assert len(count_kernel_calls) == (2 if backward == "exact" else 4)
    assert len(compressed_operands_are_2to4) == len(count_kernel_calls)
    # The weight-gradient operands cover the sparse features only (F minus ceil(0.05 F)
    # rounded up to 8, then padded to the 16-row alignment), not all F.
    if backward == "split_gemm":
        n_dense = kernels.aligned_dense_count(52, 1024)
        assert (kernels.sparse24_padded_rows(1024 - n_dense), 1024) in compressed_operands_are_2to4
    monkeypatch.setenv(DISABLE_ENV, "1")
    ref = run_op(x, w_up, w_down, dy, **kw)
    assert len(count_kernel_calls) == (2 if backward == "exact" else 4)  # unchanged
    for name, a, b in zip(("y", "dx", "dw_up", "dw_down"), got, ref):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan()), name
        a, b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
        assert rel_err(a, b) < 2e-2, f"{method}/{backward}/{name}: {rel_err(a, b):.3g}"


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_compiled_stages_equal_eager_on_gpu(method, monkeypatch):
    """Triton stages (the CUDA default) against the eager stages: bit-identical masks and
    elementwise values; the GEMMs are the same calls either way."""
    kernel_capable()
    x, w_up, w_down, dy = make_inputs(1024, 256, 1024, seed=5)
    perm = make_token_permutation(1024, seed=3, device=DEV)
    stats_c = torch.zeros(3, dtype=torch.float64, device=DEV)
    stats_e = torch.zeros(3, dtype=torch.float64, device=DEV)
    assert sparse_ffn.stage_compilation_enabled("cuda")
    got = run_op(x, w_up, w_down, dy, method=method, permutation=perm, stats=stats_c)
    assert not ffn_stages._compile_broken, ffn_stages._compile_broken
    monkeypatch.setenv(sparse_ffn.DISABLE_COMPILE_ENV, "1")
    eager = run_op(x, w_up, w_down, dy, method=method, permutation=perm, stats=stats_e)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
    assert torch.equal(stats_c, stats_e)


def test_split_gemm_full_dense_equals_exact_on_gpu():
    kernel_capable()
    x, w_up, w_down, dy = make_inputs(512, 128, 512, seed=2)
    a = run_op(x, w_up, w_down, dy, backward="split_gemm", dense_features=1.0)
    b = run_op(x, w_up, w_down, dy, backward="exact")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_unaligned_falls_back_with_one_warning(caplog, monkeypatch):
    gemm_backends._warn_fallback.cache_clear()
    # An unaligned token count (decode, last partial batch) falls back silently...
    x, w_up, w_down, dy = make_inputs(100, 64, 256)
    with caplog.at_level(logging.WARNING, logger=gemm_backends.__name__):
        first = run_op(x, w_up, w_down, dy)
        run_op(x, w_up, w_down, dy)
    assert not [r for r in caplog.records if "reference GEMMs" in r.getMessage()]
    # ...an unaligned model width is a configuration problem: warned once.
    xw, wuw, wdw, dyw = make_inputs(128, 64, 264)
    with caplog.at_level(logging.WARNING, logger=gemm_backends.__name__):
        run_op(xw, wuw, wdw, dyw)
        run_op(xw, wuw, wdw, dyw)
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
    # Warm-up: the one-off alg-id self-check and the stage compilations may sync.
    for method in SPARSE_METHODS:
        for backward in BACKWARD_MODES:
            run_op(x, w_up, w_down, dy, method=method, backward=backward, permutation=perm)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for method in SPARSE_METHODS:
            for backward in BACKWARD_MODES:
                run_op(x, w_up, w_down, dy, method=method, backward=backward, permutation=perm, stats=stats)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert stats[1].item() == 9 * 1024 * 1024  # the timed loop only (warm-up had no stats)


def test_tuned_verdicts_at_ffn_shapes(monkeypatch, tmp_path, caplog):
    """auto mode at the 130m FFN shapes: every verdict names a verified alg id or dense,
    the table file is written, and the op agrees with the plain path either way."""
    kernel_capable()
    monkeypatch.setenv(gemm_tuning.GEMMS_ENV, "auto")
    monkeypatch.setenv(gemm_tuning.TABLE_PATH_ENV, str(tmp_path / "table.json"))
    monkeypatch.setattr(CUSPARSELT, "tuner", GemmTuner())  # a fresh process's verdicts
    t, d, f = 4096, 768, 3072
    named = sparse_ffn.ffn_gemm_shapes(t, d, f, torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="hf_sparse"):
        choices = [CUSPARSELT.tuner.choice_for(shape, DEV) for _, shape in named]
    print(CUSPARSELT.tuner.format_table(named, DEV))
    assert all(c.alg_id >= 0 or not c.use_sparse() for c in choices)
    assert (tmp_path / "table.json").exists() or not any(c.alg_id >= 0 for c in choices)
    x, w_up, w_down, dy = make_inputs(t, d, f, seed=9)
    got = run_op(x, w_up, w_down, dy)
    monkeypatch.setenv(DISABLE_ENV, "1")
    ref = run_op(x, w_up, w_down, dy)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 2e-2
