"""The 2:4 FFN op's cuSPARSELt branch on CPU (emulated backend), its NaN safety, its
compiled stages and its custom-op registration.

The emulator (tests/cslt_emulator.py) refuses every operand the real library would
misread (non-2:4 groups, wrong layouts, unaligned dims), so a pass here means the kernel
branch hands cuSPARSELt only valid operands and reassembles the results correctly.
"""

import logging
import math

import pytest
import torch

import hf_sparse.model.cpu_layout as cpu_layout
import hf_sparse.model.ffn_stages as ffn_stages
import hf_sparse.model.sparse_ffn as sparse_ffn
from hf_sparse.model import gemm_backends, kernels
from hf_sparse.model.sparse_ffn import (
    BACKWARD_MODES,
    SPARSE_METHODS,
    dense_feature_count,
    make_token_permutation,
    relu2_2to4_ffn,
    sparsify_2to4,
)
from tests.conftest import host_sync_calls
from tests.cslt_emulator import emulated_cusparselt, emulated_cusparselt_wide  # noqa: F401  (fixtures)
from tests.test_sparse_ffn import assert_close, groups, make_inputs, reference_grads, run_op

F64 = torch.float64


def reference_path(x, w_up, w_down, dy, kernel_path=True, **kw):
    """The op with plain torch.mm GEMMs, whatever the installed backend, keeping as many
    dense features as the cuSPARSELt path does (it rounds the count up to a multiple of
    kernels.DENSE_FEATURE_ALIGN; the plain path keeps the ceil rule)."""
    if kernel_path and kw.get("backward", "split_gemm") == "split_gemm":
        f = w_up.shape[0]
        ceil = dense_feature_count(f, kw.get("dense_features", 0.05), "split_gemm")
        kw = dict(kw, dense_features=kernels.aligned_dense_count(ceil, f) / f)
    return run_op(x, w_up, w_down, dy, gemms="plain", **kw)


@pytest.fixture
def compiled_stages(monkeypatch):
    monkeypatch.setenv(sparse_ffn.COMPILE_STAGES_ENV, "1")
    monkeypatch.delenv(sparse_ffn.DISABLE_COMPILE_ENV, raising=False)
    assert sparse_ffn.stage_compilation_enabled("cpu")


# ----------------------------------------------------------------------------- kernel branch


@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("backward", BACKWARD_MODES)
def test_kernel_branch_matches_reference_float64(emulated_cusparselt_wide, method, backward, permute):
    # F=64 with dense_features=0.05: ceil(3.2) = 4 dense features, rounded up to 8 on this
    # path (16-byte rows of the gathered dense operands), 56 sparse ones, which the
    # weight-gradient operands pad to 64 rows (cuSPARSELt's 16-alignment).
    x, w_up, w_down, dy = make_inputs(t=48, d=32, f=64, seed=21)
    perm = make_token_permutation(48, seed=2) if permute else None
    kw = dict(method=method, backward=backward, dense_features=0.05, permutation=perm)
    got = run_op(x, w_up, w_down, dy, **kw)
    ref = reference_path(x, w_up, w_down, dy, **kw)
    for name, a, b in zip(("y", "dx", "dw_up", "dw_down"), got, ref):
        assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{method}/{backward}/{name}")
    emu = emulated_cusparselt_wide
    # forward y2s·W_downᵀ and dx = dy1·W_up always; token-sparse modes add the two
    # weight-gradient GEMMs, one of them with a transposed result.
    shapes = {(c.m, c.k, c.n, c.b_layout, c.transpose_result) for c in emu.mm_calls}
    assert (48, 64, 32, "col", False) in shapes  # forward: B = W_downᵀ, a transposed view
    assert (48, 64, 32, "row", False) in shapes  # dx: B = W_up
    if backward == "exact":
        assert len(emu.mm_calls) == 2
    else:
        n_sparse = 56 if backward == "split_gemm" else 64
        padded = kernels.sparse24_padded_rows(n_sparse)
        assert padded == 64
        assert (padded, 48, 32, "row", False) in shapes  # dW_up over the sparse features
        assert (padded, 48, 32, "row", True) in shapes  # dW_down, transposed result
        assert len(emu.mm_calls) == 4


def test_model_width_not_a_multiple_of_16_takes_the_plain_path(emulated_cusparselt):
    # F = 40 is 2:4-able (a multiple of 4) but not cuSPARSELt-aligned: the op must not hand
    # it to the kernel (the emulator, like the library, refuses such operands).
    x, w_up, w_down, dy = make_inputs(t=32, d=32, f=40, dtype=torch.bfloat16, seed=26)
    got = run_op(x, w_up, w_down, dy)
    assert emulated_cusparselt.mm_calls == [] and emulated_cusparselt.compressed == []
    for a, b in zip(got, run_op(x, w_up, w_down, dy, gemms="plain")):
        assert torch.equal(a, b)


def test_nan_in_dy_reaches_every_weight_gradient_row():
    """Token-wise 2:4 of dy1 ranks NaN highest: a NaN in one token's output gradient must
    survive into dW_up (ranked lowest, it would be dropped from any group where two other
    tokens are non-zero, and vanish silently). On the plain path dy1 = dy2 ⊙ g keeps
    0·NaN = NaN, so token 5's whole dy1 row is NaN and so is every row of dW_up."""
    x, w_up, w_down, dy = make_inputs(t=32, d=16, f=64, seed=33)
    dy[5, 3] = float("nan")  # dy2 = dy·W_down is NaN across token 5's row
    for backward in ("naive", "split_gemm"):
        _, _, dw_up, dw_down = run_op(x, w_up, w_down, dy, backward=backward)
        assert bool(dw_up.isnan().any(dim=1).all()), backward
        assert bool(dw_down.isnan().any()), backward


def test_dense_feature_count_is_aligned_on_the_kernel_path():
    # The ceil rule is the lower bound; the cuSPARSELt path rounds up to 8 (16 bytes of bf16).
    assert [kernels.aligned_dense_count(n, 64) for n in (0, 1, 4, 8, 9, 60, 64)] == [0, 8, 8, 8, 16, 64, 64]
    assert kernels.aligned_dense_count(3, 4) == 4  # never more than F
    for f in (32, 64, 100, 3072, 16384):
        ceil = dense_feature_count(f, 0.05, "split_gemm")
        aligned = kernels.aligned_dense_count(ceil, f)
        assert ceil <= aligned < ceil + kernels.DENSE_FEATURE_ALIGN and aligned % kernels.DENSE_FEATURE_ALIGN == 0


def test_kernel_path_keeps_the_aligned_number_of_dense_features(emulated_cusparselt_wide):
    """dW over the dense features is exact (not token-sparsified): with 8 dense features the
    kernel path's dW_up equals the plain path's at dense_features=8/64, not at 4/64."""
    x, w_up, w_down, dy = make_inputs(t=48, d=32, f=64, seed=27)
    got = run_op(x, w_up, w_down, dy, dense_features=0.05)
    eight = run_op(x, w_up, w_down, dy, dense_features=8 / 64, gemms="plain")
    four = run_op(x, w_up, w_down, dy, dense_features=0.05, gemms="plain")
    assert_close(got[2], eight[2], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got[2], four[2], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_kernel_branch_bf16_close_to_reference(emulated_cusparselt, method):
    x, w_up, w_down, dy = make_inputs(t=64, d=32, f=64, dtype=torch.bfloat16, seed=22)
    got = run_op(x, w_up, w_down, dy, method=method)
    ref = reference_path(x, w_up, w_down, dy, method=method)
    # Same masks; only GEMM accumulation order and rounding differ (fp32 accumulate).
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        assert (a.double() - b.double()).norm() <= 2e-2 * b.double().norm()
    assert len(emulated_cusparselt.mm_calls) == 4


@pytest.mark.parametrize("path", ["plain", "kernel"])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("backward", BACKWARD_MODES)
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_frozen_weights_give_dx_and_no_weight_grads(method, backward, permute, path, request):
    """Frozen FFN weights (adapters, partial freezing): the op computes dx only. The forward
    counts no features then, so the split backward must not rank them (it crashed with
    `shape '[F, 1]' is invalid for input of size 0`)."""
    if path == "kernel":
        request.getfixturevalue("emulated_cusparselt_wide")
    x, w_up, w_down, dy = make_inputs(t=32, d=16, f=64, seed=31)
    kw = dict(method=method, backward=backward)
    if permute:
        kw["permutation"] = make_token_permutation(32, seed=0)
    # Reference: the same call with trainable weights (dx does not depend on how the
    # weight gradients are formed), and for the deterministic rules the float64 reference.
    trained = run_op(x, w_up, w_down, dy, **kw)
    xg, wu, wd = x.clone().requires_grad_(), w_up.clone(), w_down.clone()
    torch.manual_seed(123)  # run_op's seed: MVUE draws the same members
    relu2_2to4_ffn(xg, wu, wd, **kw).backward(dy)
    assert wu.grad is None and wd.grad is None
    assert torch.equal(xg.grad, trained[1])
    if method != "mvue":
        ref = reference_grads(x, w_up, w_down, dy, method, backward, 0.05)
        assert_close(xg.grad, ref[1], rtol=1e-12, atol=1e-12)


def test_kernel_branch_frozen_inputs_and_retain_graph(emulated_cusparselt_wide):
    x, w_up, w_down, dy = make_inputs(t=32, d=16, f=32, seed=23)
    # Frozen weights: only dx, and no weight-gradient GEMMs at all.
    xg = x.clone().requires_grad_()
    y = relu2_2to4_ffn(xg, w_up, w_down)
    (dx,) = torch.autograd.grad(y, xg, dy)
    ref = reference_path(x, w_up, w_down, dy)
    assert_close(dx, ref[1], rtol=1e-12, atol=1e-12)
    assert len(emulated_cusparselt_wide.mm_calls) == 2
    # Frozen input, trainable weights; backward twice on one graph gives the same grads.
    emulated_cusparselt_wide.reset()
    wu, wd = w_up.clone().requires_grad_(), w_down.clone().requires_grad_()
    y = relu2_2to4_ffn(x, wu, wd, method="soft_threshold")
    first = torch.autograd.grad(y, (wu, wd), dy, retain_graph=True)
    second = torch.autograd.grad(y, (wu, wd), dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = reference_path(x, w_up, w_down, dy, method="soft_threshold")
    assert_close(first[0], ref[2], rtol=1e-12, atol=1e-12)
    assert_close(first[1], ref[3], rtol=1e-12, atol=1e-12)


def test_unaligned_token_count_falls_back_silently(emulated_cusparselt_wide, caplog):
    # 30 tokens (decode, a last partial batch): reference GEMMs, no warning, same numbers.
    x, w_up, w_down, dy = make_inputs(t=30, d=16, f=32, seed=24)
    with caplog.at_level(logging.DEBUG, logger="hf_sparse"):
        for _ in range(3):
            got = run_op(x, w_up, w_down, dy)
    assert emulated_cusparselt_wide.mm_calls == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    ref = reference_path(x, w_up, w_down, dy, kernel_path=False)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- NaN safety


def nan_inputs(dtype=F64):
    x, w_up, w_down, dy = make_inputs(t=32, d=16, f=32, seed=25, dtype=dtype)
    x[3, 5] = float("nan")  # poisons every feature of token 3
    x[9, :] = float("inf")
    w_up[7, 2] = float("nan")  # poisons feature 7 for every token
    return x, w_up, w_down, dy


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_nan_never_breaks_2to4_and_reaches_the_output(method):
    x, w_up, w_down, _ = nan_inputs()
    with torch.no_grad():
        y1 = x @ w_up.t()
        y2 = torch.relu(y1).square()
        ys, d = sparse_ffn.sparsify_2to4(y2, method)
    assert (groups(ys) != 0).sum(-1).max() <= 2  # NaN counts as non-zero here
    assert (groups(d) != 0).sum(-1).max() <= 2
    # NaN ranks highest: a group holding a NaN keeps it (so it is not hidden).
    nan_groups = groups(y2).isnan().any(-1)
    assert groups(ys).isnan().any(-1)[nan_groups].all()
    stats = torch.zeros(5, dtype=F64)
    out = relu2_2to4_ffn(x, w_up, w_down, method=method, stats=stats)
    assert not torch.isfinite(out).all()  # the numerics guard sees a non-finite output
    assert torch.isfinite(stats[:3]).all()


@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("backward", ["split_gemm", "naive"])
def test_nan_inputs_on_the_kernel_branch(emulated_cusparselt_wide, method, backward):
    # The emulator raises on any operand with a group of > 2 non-zeros (NaN included),
    # forward and backward, token-wise and feature-wise.
    x, w_up, w_down, dy = nan_inputs()
    dy[11, 3] = float("nan")
    y, dx, dwu, dwd = run_op(x, w_up, w_down, dy, method=method, backward=backward)
    assert len(emulated_cusparselt_wide.mm_calls) == 4
    assert y.isnan().any() and dwu.isnan().any()


# ----------------------------------------------------------------------------- dense features


def test_fractional_dense_feature_count_rounds_up():
    # 0.05 · 32 = 1.6 dense features: ceil gives 2. The reference computes 2 on its own;
    # with 1 (floor) the second-densest feature would be token-sparsified and differ.
    x, w_up, w_down, dy = make_inputs(t=32, d=16, f=32, seed=26)
    got = run_op(x, w_up, w_down, dy, backward="split_gemm", dense_features=0.05)
    ref = reference_grads(x, w_up, w_down, dy, "naive", "split_gemm", 0.05)
    for a, b in zip(got, ref):
        assert_close(a, b)
    one_dense = run_op(x, w_up, w_down, dy, backward="split_gemm", dense_features=1 / 32)
    assert math.ceil(0.05 * 32) == 2
    assert not torch.equal(got[2], one_dense[2]) and not torch.equal(got[3], one_dense[3])


# ----------------------------------------------------------------------------- compiled stages


def compiled_vs_eager(method, dtype, with_nan, t=32):
    x, w_up, w_down, dy = make_inputs(t=t, d=16, f=64, dtype=dtype, seed=27)
    if with_nan:
        x[3, 5] = float("nan")
        w_up[7, 2] = float("nan")
    perm = make_token_permutation(t, seed=1)
    stats_c, stats_e = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    got = run_op(x, w_up, w_down, dy, method=method, permutation=perm, stats=stats_c)
    assert not ffn_stages._compile_broken
    assert ffn_stages._forward_stage in ffn_stages._compiled_stages
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(sparse_ffn.DISABLE_COMPILE_ENV, "1")
        eager = run_op(x, w_up, w_down, dy, method=method, permutation=perm, stats=stats_e)
    for a, b in zip(got, eager):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    assert torch.equal(stats_c, stats_e)
    return got


@pytest.mark.parametrize("method, dtype", [("mvue", torch.bfloat16), ("soft_threshold", torch.bfloat16)])
def test_compiled_stages_are_bit_identical_to_eager(compiled_stages, method, dtype):
    # Masks, counts and every elementwise value equal bit for bit (inductor emulates the
    # eager roundings); MVUE's uniforms are an integer hash of a key drawn eagerly, so its
    # draws match too.
    compiled_vs_eager(method, dtype, with_nan=False)


def _tp_halves_in_one_process(monkeypatch, x, w_up, w_down, dy, method, dense_features):
    """The op on each half of the width as a tensor-parallel rank runs it, in one process:
    the global ranking's all-gather replaced by the whole width's counts (what it gathers).
    Returns (y, dx, dW_up, dW_down) assembled from the halves."""
    f = w_up.shape[0]
    y2s, _ = sparsify_2to4(torch.relu(x @ w_up.t()) ** 2, method)
    counts = (y2s != 0).sum(0)
    order = torch.sort(counts, descending=True, stable=True).indices
    n_dense = sparse_ffn.dense_feature_count(f, dense_features, "split_gemm")
    if gemm_backends.select_gemms(x, w_up[: f // 2], w_down[:, : f // 2]).sparse:
        n_dense = kernels.aligned_dense_count(n_dense, f)
    dense = torch.zeros(f, dtype=torch.bool).index_fill_(0, order[:n_dense], True)
    monkeypatch.setattr(sparse_ffn, "tp_group_size", lambda name: 2)

    def gathered_ranking(counts, n, width, offset, group):
        return dense[offset : offset + counts.shape[0]]

    monkeypatch.setattr(sparse_ffn, "global_dense_mask", gathered_ranking)
    n_dense = sparse_ffn.dense_feature_count(f, dense_features, "split_gemm")
    y, dx, dw_up, dw_down = 0, 0, [], []
    for lo in (0, f // 2):
        leaves = [t.clone().requires_grad_() for t in (x, w_up[lo : lo + f // 2], w_down[:, lo : lo + f // 2])]
        out = torch.ops.hf_sparse.relu2_2to4_ffn_fwd(
            *(t.contiguous() for t in leaves), method, "split_gemm", n_dense, False, True, False, f, lo, "fake"
        )[0]
        out.backward(dy)
        y, dx = y + out.detach(), dx + leaves[0].grad
        dw_up.append(leaves[1].grad)
        dw_down.append(leaves[2].grad)
    return y, dx, torch.cat(dw_up), torch.cat(dw_down, 1)


# Eager stages on the emulated cuSPARSELt path (the eager plain path runs in tests/tp_worker.py
# on 2 real ranks). Compiled stages get the same fixed-count/keep-mask inputs; compiling them
# with inductor costs 1-2 minutes on 2 vCPUs with a cold cache, so that variant is not in the
# suite (it passed once by hand when the TP ranking landed).
def test_tensor_parallel_halves_match_the_whole_op(emulated_cusparselt_wide, monkeypatch):
    """Each rank's share of the global dense features is data: the fixed candidate count and
    keep mask must give the whole op's gradients. Dense features crowd into the first half;
    0.75 puts every feature of a half among the candidates (an empty sparse GEMM)."""
    x, w_up, w_down, dy = make_inputs(t=32, d=16, f=64, seed=41)
    x[:, 0] = 1.0
    w_up[:, 0] = torch.linspace(1.5, -1.5, 64, dtype=F64)  # feature j positive less often as j grows
    for dense_features in (0.25, 0.75):
        torch.manual_seed(0)
        whole = run_op(x, w_up, w_down, dy, method="naive", backward="split_gemm", dense_features=dense_features)
        halves = _tp_halves_in_one_process(monkeypatch, x, w_up, w_down, dy, "naive", dense_features)
        for name, a, b in zip(("y", "dx", "dw_up", "dw_down"), halves, whole):
            assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{dense_features}/{name}")
    assert emulated_cusparselt_wide.mm_calls


@pytest.mark.parametrize("t", [32, 30])
def test_compiled_planar_stages_with_nan(compiled_stages, t):
    # The plain-GEMM path (planar feature layout): the compiled stages write member views
    # of their outputs; a token count that is not a multiple of 4 takes the padded route.
    y, dx, dw_up, dw_down = compiled_vs_eager("naive", torch.float32, with_nan=True, t=t)
    assert y.isnan().any() and dw_up.isnan().any()


def test_compiled_stages_on_the_kernel_branch_with_nan(emulated_cusparselt_wide, compiled_stages):
    # One compile covers the cuSPARSELt data flow (transposed, padded weight-gradient
    # operands), NaN safety (the emulator refuses any group with > 2 non-zeros) and
    # bit-equality with eager. The no-sync test below reuses this compiled configuration.
    y, _, dw_up, _ = compiled_vs_eager("naive", torch.float32, with_nan=True)
    assert y.isnan().any() and dw_up.isnan().any()
    assert len(emulated_cusparselt_wide.mm_calls) == 8  # 4 GEMMs, compiled and eager runs


def test_compile_failure_falls_back_to_eager(compiled_stages, monkeypatch, caplog):
    def broken(stage, **_kw):
        def run(*args):
            raise RuntimeError("no working C++ compiler")

        return run

    monkeypatch.setattr(ffn_stages, "_compiled_stages", {})
    monkeypatch.setattr(ffn_stages, "_compile_broken", [])
    monkeypatch.setattr(torch, "compile", broken)
    x, w_up, w_down, dy = make_inputs(t=32, seed=28)
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        got = run_op(x, w_up, w_down, dy)
        run_op(x, w_up, w_down, dy)
    warnings = [r for r in caplog.records if "compiling the elementwise stages failed" in r.getMessage()]
    assert len(warnings) == 1
    monkeypatch.setenv(sparse_ffn.DISABLE_COMPILE_ENV, "1")
    assert not sparse_ffn.stage_compilation_enabled("cuda")
    for a, b in zip(got, run_op(x, w_up, w_down, dy)):
        assert torch.equal(a, b)


def test_stage_compilation_defaults(monkeypatch):
    monkeypatch.delenv(sparse_ffn.COMPILE_STAGES_ENV, raising=False)
    monkeypatch.delenv(sparse_ffn.DISABLE_COMPILE_ENV, raising=False)
    assert sparse_ffn.stage_compilation_enabled("cuda")
    assert not sparse_ffn.stage_compilation_enabled("cpu")  # eager is the CPU default
    monkeypatch.setenv(sparse_ffn.COMPILE_STAGES_ENV, "never")
    assert not sparse_ffn.stage_compilation_enabled("cuda")


def test_compiled_stages_make_no_host_sync(compiled_stages, monkeypatch):
    # Same configuration as the compiled MVUE test above, so its compiled stages are reused.
    x, w_up, w_down, dy = make_inputs(t=32, d=16, f=64, dtype=torch.bfloat16, seed=29)
    perm = make_token_permutation(32, seed=0)
    stats = torch.zeros(3, dtype=F64)
    kw = dict(method="mvue", permutation=perm, stats=stats)
    run_op(x, w_up, w_down, dy, **kw)  # compiles if needed (compilers may sync)
    assert host_sync_calls(monkeypatch, lambda: run_op(x, w_up, w_down, dy, **kw)) == []
    assert not ffn_stages._compile_broken


# ----------------------------------------------------------------------------- custom ops


def test_custom_ops_pass_opcheck():
    x, w_up, w_down, _ = make_inputs(t=32, d=16, f=32, dtype=torch.float32, seed=30)
    w_up.requires_grad_()
    w_down.requires_grad_()
    fwd_args = (x, w_up, w_down, "soft_threshold", "split_gemm", 2, True, True, False)
    torch.library.opcheck(torch.ops.hf_sparse.relu2_2to4_ffn_fwd.default, fwd_args)
    y3, g, y2s, counts, _ = torch.ops.hf_sparse.relu2_2to4_ffn_fwd(*fwd_args)
    bwd_args = (torch.randn_like(y3), x, w_up.detach(), w_down.detach(), g, y2s, counts)
    bwd_args += ("soft_threshold", "split_gemm", 2, True, True, True, False, False)
    torch.library.opcheck(torch.ops.hf_sparse.relu2_2to4_ffn_bwd.default, bwd_args)


def test_op_traces_with_fullgraph():
    x, w_up, w_down, dy = make_inputs(t=32, d=16, f=32, dtype=torch.float32, seed=31)
    stats = torch.zeros(3, dtype=F64)

    def ffn(x, w_up, w_down, perm):
        return relu2_2to4_ffn(x, w_up, w_down, permutation=perm, stats=stats)

    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    perm = make_token_permutation(32, seed=3)
    args = [a.clone().requires_grad_() for a in (x, w_up, w_down)]
    y = compiled(*args, perm)
    y.backward(dy)
    ref = run_op(x, w_up, w_down, dy, permutation=perm)
    assert_close(y.detach(), ref[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(args, ref[1:]):
        assert_close(a.grad, b, rtol=1e-6, atol=1e-6)
    assert stats[1] == 32 * 32  # the compiled forward counted once (the reference had no stats)


# ----------------------------------------------------------------------------- plain path internals


def test_planar_feature_order_round_trips():
    # Row k·F/4 + j of the planar order holds feature 4j + k (member k of group j).
    w = torch.arange(16 * 3, dtype=F64).view(16, 3)
    planar = cpu_layout._planar_rows(w, torch.empty(16, 3, dtype=F64))
    for j in range(4):
        for k in range(4):
            assert torch.equal(planar[k * 4 + j], w[4 * j + k])
    assert torch.equal(cpu_layout._unplanar_rows(planar), w)
    assert torch.equal(cpu_layout._unplanar_cols(planar.t().contiguous()), w.t())
    # The member views of a planar tensor are its four column blocks.
    members = ffn_stages._members(planar.t().contiguous(), "planar")
    assert [tuple(m.shape) for m in members] == [(3, 4)] * 4
    assert torch.equal(members[2], planar[8:12].t())


def two_layer_run(x, layers, dy, **kw):
    """Output and every gradient of two chained ops (the second reads the first's output)."""
    x = x.clone().requires_grad_()
    params = [(u.clone().requires_grad_(), d.clone().requires_grad_()) for u, d in layers]
    h = x
    for w_up, w_down in params:
        h = relu2_2to4_ffn(h, w_up, w_down, **kw)
    h.backward(dy)
    return [h.detach(), x.grad] + [p.grad for pair in params for p in pair]


def test_scratch_buffers_are_reused_and_never_leak_into_results(monkeypatch):
    # Both layers' intermediates share the per-thread scratch buffers; anything saved for
    # backward or returned must not live there (the second layer would overwrite it).
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(32, 16, generator=gen, dtype=F64)
    layers = [
        (torch.randn(64, 16, generator=gen, dtype=F64) / 4, torch.randn(16, 64, generator=gen, dtype=F64) / 8)
        for _ in range(2)
    ]
    dy = torch.randn(32, 16, generator=gen, dtype=F64)
    kw = dict(method="naive", backward="split_gemm", permutation=make_token_permutation(32, seed=3))
    monkeypatch.setattr(cpu_layout, "_scratch_buffers", cpu_layout._ScratchBuffers())
    got = two_layer_run(x, layers, dy, **kw)
    pointers = {k: b.data_ptr() for k, b in cpu_layout._scratch_buffers.buffers.items()}
    assert {slot for slot, _ in pointers} >= {"y1", "y2s", "down", "up", "w_up", "w_down"}
    again = two_layer_run(x, layers, dy, **kw)
    assert {k: b.data_ptr() for k, b in cpu_layout._scratch_buffers.buffers.items()} == pointers
    cpu_layout.release_scratch_buffers()
    assert not cpu_layout._scratch_buffers.buffers
    # Reference: every intermediate freshly allocated (no scratch at all).
    monkeypatch.setattr(sparse_ffn, "_scratch", lambda slot, shape, like: like.new_empty(shape))
    fresh = two_layer_run(x, layers, dy, **kw)
    for a, b, c in zip(got, again, fresh):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_scratch_buffers_are_per_thread():
    # Two threads running the op at once must not share scratch buffers.
    import threading

    cases = [make_inputs(t=64, d=16, f=64, seed=s) for s in (43, 44)]
    expected = [run_op(*c) for c in cases]
    results: dict[int, list] = {}

    def work(i):
        out = None
        for _ in range(20):
            out = run_op(*cases[i])
        results[i] = out

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(2):
        for a, b in zip(results[i], expected[i]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("forward_kernel", [True, False])
def test_backward_follows_the_forward_gemm_path(emulated_cusparselt_wide, forward_kernel):
    # The forward's back-end also fixes the feature order of what it saves (planar on the
    # plain path): another automatic back-end chosen between forward and backward must
    # not change it (the backward looks up the forward's by name).
    x, w_up, w_down, dy = make_inputs(t=48, d=32, f=64, seed=45)
    ref = reference_path(x, w_up, w_down, dy, kernel_path=forward_kernel)
    x, w_up, w_down = (a.clone().requires_grad_() for a in (x, w_up, w_down))
    emu = emulated_cusparselt_wide
    kernel, plain = emu.backend, gemm_backends.PLAIN
    gemm_backends.register_gemm_backend(kernel if forward_kernel else plain, device_type="cpu")
    y = relu2_2to4_ffn(x, w_up, w_down)
    gemm_backends.register_gemm_backend(plain if forward_kernel else kernel, device_type="cpu")
    y.backward(dy)
    assert len(emu.mm_calls) == (4 if forward_kernel else 0)  # forward and dx, then both dW on the kernel path
    for name, a, b in zip(("y", "dx", "dw_up", "dw_down"), (y.detach(), x.grad, w_up.grad, w_down.grad), ref):
        assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_older_callers_of_the_ops_get_the_automatic_back_end(emulated_cusparselt_wide):
    """Calls written before the ``gemms`` argument (older remote code, saved graphs) leave
    it out: the forward takes the device's automatic back-end and the backward the one its
    ``use_kernel`` flag names, exactly as if both had been named."""
    x, w_up, w_down, dy = make_inputs(t=48, d=32, f=64, seed=46)
    emu = emulated_cusparselt_wide
    fwd_args = (x, w_up, w_down, "naive", "split_gemm", 8, False, True, False)

    def bwd_args(g, y2s, counts):
        return (dy, x, w_up, w_down, g, y2s, counts, "naive", "split_gemm", 8, True, True, True)

    old_fwd = torch.ops.hf_sparse.relu2_2to4_ffn_fwd(*fwd_args)
    old_bwd = torch.ops.hf_sparse.relu2_2to4_ffn_bwd(*bwd_args(*old_fwd[1:4]), True, False)
    assert len(emu.mm_calls) == 4  # y3, dx, dW_up, dW_down through the emulated library
    name = emu.backend.name
    new_fwd = torch.ops.hf_sparse.relu2_2to4_ffn_fwd(*fwd_args, 0, 0, "", name)
    new_bwd = torch.ops.hf_sparse.relu2_2to4_ffn_bwd(*bwd_args(*new_fwd[1:4]), True, False, 0, 0, "", name)
    for old, new in zip(old_fwd + old_bwd, new_fwd + new_bwd):
        assert torch.equal(old, new)
