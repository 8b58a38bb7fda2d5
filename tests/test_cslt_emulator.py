"""Tests of the CPU cuSPARSELt emulator (tests/cslt_emulator.py) itself.

Other tests trust it to stand in for the GPU ops, so it must (1) compute the same
product as a dense GEMM in every layout the FFN op uses and (2) refuse every input the
real library would silently misread.
"""

import pytest
import torch

from hf_sparse.model import gemm_backends, kernels
from hf_sparse.model.gemm_tuning import GemmShape, verify_alg_id
from tests.cslt_emulator import (
    NUM_ALG_IDS,
    UNREPORTED_ALG_IDS,
    CompressCall,
    CusparseLtPreconditionError,
    Emulator,
    MmCall,
    compress,
    decompress,
    emulated_cusparselt,  # noqa: F401  (fixture)
    emulated_cusparselt_wide,  # noqa: F401  (fixture)
    install,
    is_compressed,
    sparse_mm,
)

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
TOL = {BF16: dict(rtol=1.6e-2, atol=1e-2), F16: dict(rtol=1e-3, atol=1e-3)}


def random_2to4(m, k, dtype=BF16, seed=0, keep=2):
    """m×k with exactly ``keep`` random non-zeros in each group of 4 along dim 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen, dtype=F64)
    # Rank random keys per group; the `keep` smallest survive: a random keep-pattern.
    keys = torch.rand(m, k // 4, 4, generator=gen)
    order = keys.argsort(dim=-1).argsort(dim=-1)
    x = x * (order < keep).reshape(m, k)
    return x.to(dtype)


def make_b(k, n, layout, dtype=BF16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if layout == "row":
        return torch.randn(k, n, generator=gen, dtype=F64).to(dtype)
    # "col": the transpose of a contiguous n×k tensor, as the FFN passes weights.
    return torch.randn(n, k, generator=gen, dtype=F64).to(dtype).t()


def reference(a, b, dtype):
    # Independent of the emulator: float64 dense GEMM, rounded once to the output dtype.
    return (a.double() @ b.double()).to(dtype)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("transpose_result", [False, True])
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_matches_dense_gemm_16bit(dtype, layout, transpose_result):
    m, k, n = 32, 64, 24
    a, b = random_2to4(m, k, dtype), make_b(k, n, layout, dtype)
    out = sparse_mm(compress(a), b, transpose_result=transpose_result)
    expected = reference(a, b, dtype)
    if transpose_result:
        expected = expected.t()
    assert out.dtype == dtype and out.is_contiguous()
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("transpose_result", [False, True])
@pytest.mark.parametrize("layout", ["row", "col"])
def test_matches_dense_gemm_float64_exact(layout, transpose_result):
    m, k, n = 16, 48, 8
    a, b = random_2to4(m, k, F64), make_b(k, n, layout, F64)
    out = sparse_mm(compress(a, allow_wide_dtypes=True), b, transpose_result=transpose_result, allow_wide_dtypes=True)
    expected = a @ b
    torch.testing.assert_close(out, expected.t() if transpose_result else expected, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous()


def test_float32_with_relaxation():
    a, b = random_2to4(16, 32, F32), make_b(32, 16, "row", F32)
    out = sparse_mm(compress(a, allow_wide_dtypes=True), b, allow_wide_dtypes=True)
    assert out.dtype == F32
    torch.testing.assert_close(out, a @ b)


def test_compressed_buffer_format():
    a = random_2to4(32, 64, BF16)
    buf = compress(a)
    # Like the real op: an opaque 2-D buffer in A's dtype with A's m rows.
    assert buf.dim() == 2 and buf.dtype == BF16 and buf.shape[0] == 32
    assert buf.numel() == 32 * 64
    assert is_compressed(buf) and not is_compressed(buf.clone())
    assert torch.equal(decompress(buf), a)


def test_sparser_groups_roundtrip():
    # Groups with 0 or 1 non-zeros still store two slots; zeros must come back as zeros.
    a = torch.zeros(16, 16, dtype=F64)
    a[0, 1] = 3.0
    a[1, 4:8] = torch.tensor([0.0, 0.0, -2.0, 5.0])
    a[2, 8] = float("inf")
    assert torch.equal(decompress(compress(a, allow_wide_dtypes=True)), a)


def test_bias_is_added_per_row_of_ab():
    m, k, n = 16, 32, 8
    a, b = random_2to4(m, k, F64), make_b(k, n, "col", F64)
    bias = torch.arange(m, dtype=F64)
    buf = compress(a, allow_wide_dtypes=True)
    out = sparse_mm(buf, b, bias=bias, allow_wide_dtypes=True)
    torch.testing.assert_close(out, a @ b + bias[:, None])
    # transpose_result transposes after the bias: it lands on columns of the result.
    out_t = sparse_mm(buf, b, bias=bias, transpose_result=True, allow_wide_dtypes=True)
    torch.testing.assert_close(out_t, (a @ b + bias[:, None]).t())


def test_backward_through_emulated_op_fails():
    # No derivative formula exists for the real ops: the FFN must wrap them in its own
    # autograd.Function rather than differentiate through them.
    a = random_2to4(16, 32, F64).requires_grad_()
    b = make_b(32, 8, "row", F64).requires_grad_()
    out = sparse_mm(compress(a, allow_wide_dtypes=True), b, allow_wide_dtypes=True)
    with pytest.raises(RuntimeError, match="derivative"):
        out.sum().backward()


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "make_a, match",
    [
        (lambda: random_2to4(32, 32).t(), "contiguous"),
        (lambda: random_2to4(32, 64)[:, ::2], "contiguous"),
        (lambda: random_2to4(1, 64).view(64), "2-D"),
        (lambda: random_2to4(32, 32).view(2, 16, 32), "2-D"),
        (lambda: random_2to4(24, 32), "multiples of 16"),
        (lambda: random_2to4(16, 40), "multiples of 16"),
        (lambda: random_2to4(16, 32, F32), "bf16/fp16"),
        (lambda: random_2to4(16, 32, F64), "bf16/fp16"),
        (lambda: random_2to4(16, 32).to(torch.int32), "unsupported dtype"),
    ],
    ids=["transposed", "strided", "1d", "3d", "m24", "k40", "fp32", "fp64", "int32"],
)
def test_compress_refuses_bad_operands(make_a, match):
    with pytest.raises(CusparseLtPreconditionError, match=match):
        compress(make_a())


def test_compress_names_first_group_with_three_nonzeros():
    a = random_2to4(16, 32)
    a[5, 13] = a[5, 14] = a[5, 15] = 1.0  # a fresh 3-of-4 pattern in group 3
    a[9, 0:3] = 1.0
    with pytest.raises(CusparseLtPreconditionError, match=r"row 5, group 3 \(columns 12\.\.15\) has 3"):
        compress(a)


def test_nan_counts_as_nonzero():
    a = random_2to4(16, 32, keep=2)
    row = a[2, 4:8]
    zero = int((row == 0).nonzero()[0])
    a[2, 4 + zero] = float("nan")
    with pytest.raises(CusparseLtPreconditionError, match="row 2, group 1 .* 3 non-zeros"):
        compress(a)


def test_wide_dtypes_still_enforce_2to4():
    a = random_2to4(16, 32, F64, keep=3)
    with pytest.raises(CusparseLtPreconditionError, match="not 2:4"):
        compress(a, allow_wide_dtypes=True)


@pytest.fixture
def packed():
    return compress(random_2to4(32, 64, BF16))


@pytest.mark.parametrize(
    "make_b_, match",
    [
        (lambda: make_b(64, 32, "row")[:, ::2], "neither contiguous"),
        # The transpose of a column slice: row stride 96, not k, which the real op assumes.
        (lambda: torch.randn(16, 96, dtype=BF16)[:, :64].t(), "neither contiguous"),
        (lambda: make_b(64, 12, "row"), "multiple of 8"),
        (lambda: make_b(32, 16, "row"), "k=64"),
        (lambda: make_b(64, 16, "row", F16), "dtype"),
        (lambda: make_b(64, 16, "row").unsqueeze(0), "2-D"),
    ],
    ids=["strided-slice", "sliced-transpose", "n12", "k-mismatch", "dtype-mismatch", "3d"],
)
def test_sparse_mm_refuses_bad_b(packed, make_b_, match):
    with pytest.raises(CusparseLtPreconditionError, match=match):
        sparse_mm(packed, make_b_())


@pytest.mark.parametrize(
    "make_a",
    [
        lambda p: torch.randn(32 * 64, dtype=BF16),  # never compressed
        lambda p: p.clone(),  # a copy loses the marker, as a copy of real metadata could
        lambda p: p[: p.numel()],  # a view is a different tensor too
    ],
    ids=["random", "clone", "view"],
)
def test_sparse_mm_refuses_tensor_not_from_compress(packed, make_a):
    with pytest.raises(CusparseLtPreconditionError, match="not produced by _cslt_compress"):
        sparse_mm(make_a(packed), make_b(64, 16, "row"))


def test_sparse_mm_detects_corrupted_metadata(packed):
    packed[-1] = 7.0  # position codes live at the end of the buffer
    with pytest.raises(CusparseLtPreconditionError, match="corrupted"):
        sparse_mm(packed, make_b(64, 16, "row"))


def test_sparse_mm_refuses_unsupported_arguments(packed):
    b = make_b(64, 16, "row")
    for alg_id in (-1, NUM_ALG_IDS):
        with pytest.raises(RuntimeError, match="alg_id"):
            sparse_mm(packed, b, alg_id=alg_id)
    with pytest.raises(RuntimeError, match="out_dtype"):
        sparse_mm(packed, b, out_dtype=F32)
    with pytest.raises(NotImplementedError, match="alpha"):
        sparse_mm(packed, b, alpha=torch.ones(32))
    with pytest.raises(RuntimeError, match="split_k"):
        sparse_mm(packed, b, split_k=0)
    with pytest.raises(CusparseLtPreconditionError, match="bias"):
        sparse_mm(packed, b, bias=torch.zeros(16, dtype=BF16))  # n entries instead of m
    # Accepted: every in-range alg id and split-k setting computes the same product.
    ref = sparse_mm(packed, b)
    for alg_id in range(NUM_ALG_IDS):
        assert torch.equal(sparse_mm(packed, b, alg_id=alg_id, split_k=2, split_k_mode=1), ref)


def test_mismatched_relaxation_is_refused():
    # A wide buffer multiplied by an emulator without the relaxation is still fp32/fp64.
    buf = compress(random_2to4(16, 32, F64), allow_wide_dtypes=True)
    with pytest.raises(CusparseLtPreconditionError, match="bf16/fp16"):
        sparse_mm(buf, make_b(32, 8, "row", F64))


# ----------------------------------------------------------------------------- recorder / install


def test_recorder_records_compress_and_layouts():
    emu = Emulator()
    a = random_2to4(32, 64)
    buf = emu.compress(a)
    emu.sparse_mm(buf, make_b(64, 16, "row"))
    emu.sparse_mm(buf, make_b(64, 8, "col"), transpose_result=True, alg_id=3)
    assert emu.compressed == [CompressCall((32, 64), BF16)]
    assert emu.mm_calls == [
        MmCall(32, 64, 16, "row", False, BF16, 0, False),
        MmCall(32, 64, 8, "col", True, BF16, 3, False),
    ]
    assert emu.layouts == {("row", False), ("col", True)}
    # Refused calls are not recorded: a record means the product really ran.
    with pytest.raises(CusparseLtPreconditionError):
        emu.sparse_mm(buf, make_b(64, 12, "row"))
    assert len(emu.mm_calls) == 2
    emu.reset()
    assert emu.compressed == [] and emu.mm_calls == []


def test_fixture_patches_torch(emulated_cusparselt):
    assert torch.backends.cusparselt.is_available()
    assert kernels.cusparselt_available()
    out = torch._cslt_sparse_mm(torch._cslt_compress(random_2to4(16, 32)), make_b(32, 8, "col"))
    assert out.shape == (16, 8)
    assert emulated_cusparselt.layouts == {("col", False)}
    # The default fixture keeps the real dtype rule.
    with pytest.raises(CusparseLtPreconditionError):
        torch._cslt_compress(random_2to4(16, 32, F32))


def test_wide_fixture_accepts_float64(emulated_cusparselt_wide):
    a, b = random_2to4(16, 32, F64), make_b(32, 8, "row", F64)
    torch.testing.assert_close(torch._cslt_sparse_mm(torch._cslt_compress(a), b), a @ b)
    assert emulated_cusparselt_wide.compressed == [CompressCall((16, 32), F64)]


@pytest.mark.parametrize("layout, transpose_result", [("row", False), ("col", False), ("row", True)])
def test_alg_id_verification_runs_on_emulator(emulated_cusparselt, layout, transpose_result):
    # gemm_tuning.verify_alg_id in the three layouts the FFN uses, against a dense GEMM:
    # with the emulator it must pass, and an id past the library's range must fail.
    shape = GemmShape(64, 64, 32, layout, transpose_result, "bfloat16")
    ok, detail = verify_alg_id(shape, "cpu", 0)
    assert ok, detail
    assert emulated_cusparselt.layouts == {(layout, transpose_result)}
    ok, detail = verify_alg_id(shape, "cpu", NUM_ALG_IDS)
    assert not ok and "alg_id" in detail


def test_install_undo_restores_everything():
    originals = (torch._cslt_compress, torch._cslt_sparse_mm, torch.backends.cusparselt.is_available)
    x, w = torch.zeros(16, 16, dtype=BF16), torch.zeros(16, 16, dtype=BF16)
    with pytest.MonkeyPatch.context() as mp:
        emu = install(mp)
        assert torch._cslt_compress == emu.compress
        # The emulated back-end is the CPU's automatic choice while installed...
        assert gemm_backends.automatic_gemm_backend("cpu") is emu.backend
        assert gemm_backends.select_gemms(x, w, w.t()) is emu.backend
    # ...and the registry is as it was afterwards.
    assert gemm_backends.automatic_gemm_backend("cpu") is gemm_backends.PLAIN
    with pytest.raises(ValueError, match="not a registered GEMM back-end"):
        gemm_backends.get_gemm_backend(emu.backend.name)
    assert (torch._cslt_compress, torch._cslt_sparse_mm, torch.backends.cusparselt.is_available) == originals


@pytest.mark.parametrize("reported", [True, False], ids=["count reported", "count unreported"])
def test_install_emulates_both_alg_id_counts_and_the_library_search(reported):
    """cuSPARSELt 0.6.2 (torch reports 8 ids) or 0.7/0.8 (torch says None; 12 ids here),
    with the search binding torch._C._cusparselt.mm_search either way."""
    count = NUM_ALG_IDS if reported else UNREPORTED_ALG_IDS
    before = (torch.backends.cusparselt.get_max_alg_id, getattr(torch._C, "_cusparselt", None))
    with pytest.MonkeyPatch.context() as mp:
        emu = install(mp, alg_count_reported=reported)
        assert torch.backends.cusparselt.get_max_alg_id() == (count if reported else None)
        packed, b = torch._cslt_compress(random_2to4(32, 64)), make_b(64, 16, "col")
        emu.search_pick = (count - 1, 4, 1)
        assert torch._C._cusparselt.mm_search(packed, b, None, None, None, True) == (count - 1, 4, 1, count)
        assert emu.search_calls == [MmCall(32, 64, 16, "col", True, BF16, count - 1, False, 4, 1)]
        assert emu.mm_calls == []  # a search is not a product the op ran
        for alg_id in range(count):
            torch._cslt_sparse_mm(packed, b, alg_id=alg_id)
        with pytest.raises(RuntimeError, match="alg_id"):
            torch._cslt_sparse_mm(packed, b, alg_id=count)
        assert emu.refused_alg_ids == [count]
        # The search checks its arguments as a product does.
        with pytest.raises(CusparseLtPreconditionError):
            torch._C._cusparselt.mm_search(packed, make_b(64, 12, "row"), None, None, None, False)
    assert (torch.backends.cusparselt.get_max_alg_id, getattr(torch._C, "_cusparselt", None)) == before


def test_install_without_the_search_binding():
    """As on the CPU wheel (or a build without cuSPARSELt): torch._C has no _cusparselt."""
    with pytest.MonkeyPatch.context() as mp:
        install(mp, alg_count_reported=False, library_search=False)
        assert not hasattr(torch._C, "_cusparselt")
        assert torch.backends.cusparselt.get_max_alg_id() is None


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_alg_ids_return_one_non_finite_value(value):
    emu = Emulator()
    emu.non_finite_alg_ids = {5: value}
    packed, b = emu.compress(random_2to4(32, 64)), make_b(64, 16, "row")
    good, bad = emu.sparse_mm(packed, b, alg_id=4), emu.sparse_mm(packed, b, alg_id=5, split_k=2, split_k_mode=0)
    assert torch.isfinite(good).all() and int((~torch.isfinite(bad)).sum()) == 1
    assert torch.equal(bad.flatten()[1:], good.flatten()[1:])
    assert [(c.alg_id, c.split_k, c.split_k_mode) for c in emu.mm_calls] == [(4, 1, -1), (5, 2, 0)]
