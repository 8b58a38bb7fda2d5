"""2:4 activation-sparse Squared-ReLU FFN (Haziza et al. 2025, arXiv 2503.16672).

One semantics, two GEMM back-ends: plain ``torch.mm`` (any device/dtype, float64
included) and, on CUDA sm80+ with bf16/fp16 and aligned shapes, real 2:4 sparse GEMMs
through cuSPARSELt (``gemm_backends.py``: chosen once per call, handed to the op). Everything between the GEMMs is a handful of
elementwise *stages* (one pass in, one pass out each) written once in plain torch; they
run eagerly or compiled by ``torch.compile`` (Triton on CUDA, C++ on CPU), and both
GEMM back-ends use the same stages, so the CPU tests exercise the GPU path's data flow.

Forward, for x (T×d), w_up (F×d), w_down (d×F)::

    y1 = x w_upᵀ;  y2 = relu(y1)²;  y2s = sparsify_2to4(y2);  y3 = y2s w_downᵀ

Backward (D = ∂y2s/∂y2 with mask and scale held constant)::

    dy1 = (D ⊙ dy3 w_down) ⊙ 2 relu(y1);  dx = dy1 w_up            (exact in every mode)
    dW_down = dy3ᵀ y2s';  dW_up = dy1'ᵀ x

where ``'`` is the identity for ``backward="exact"`` and a token-wise 2:4 sparsification
(groups of 4 consecutive rows, keep the 2 largest magnitudes) for ``"naive"``; for
``"split_gemm"`` the densest ``ceil(dense_features·F)`` features stay dense: they are
gathered into a small dense GEMM and the sparse GEMMs run over the other features only
(under tensor parallelism F and the ranking are the whole width's: see ``_dense_split``).

Stages (the op's whole non-GEMM traffic, with, in FP8 mode, one scale pass after each FP8
GEMM and the weights quantized by the caller once per optimizer step; see
benchmarks/ffn_traffic.py, which traces it):
  forward   y1 -> relu -> top-2 of each feature group (NaN ranks highest) -> y2s (to the
            GEMM), g = D ⊙ 2·relu(y1) (saved), telemetry counts, per-feature non-zeros
  backward  dy2 = dy3 w_down -> dy1 = D ⊙ dy2 ⊙ ... = where(g≠0, dy2·g, 0), and the
            token-wise top-2 of dy1 / y2s over the sparse features, written in the
            (F_s×T) layout cuSPARSELt reads, plus the dense features gathered (T×n_dense)

Plain-GEMM path (CPU, and GPUs without the kernel): the op works in a *planar* feature
order internally (w_up's rows and w_down's columns permuted so that member k of group j
is feature k·F/4 + j). The GEMMs do not care, and each 2:4 group's members become four
contiguous column blocks, so the selection runs on unit-stride vectors; g, y2s and the
per-feature counts stay in that order between forward and backward, and the weight
gradients are permuted back. On CPU the op's T×F intermediates live in per-thread
scratch buffers (see ``cpu_layout.py``): fresh allocations of that size page-fault on every
call. The cuSPARSELt path keeps the stock order (its 2:4 groups are consecutive).

The op is registered with ``torch.library.custom_op`` (forward and backward ops with
fake implementations, autograd registered), so ``torch.compile(model, fullgraph=True)``
traces it as one node.

Where the parts live (one concern a file): ``select_2to4.py`` the selection rules,
``ffn_stages.py`` the stages and their compilation, ``cpu_layout.py`` the planar order and
scratch buffers, ``gemm_backends.py`` the GEMM back-ends (``kernels.py`` the cuSPARSELt
calls, ``gemm_tuning.py`` the per-shape verdicts), ``ffn_tensor_parallel.py`` DTensor
slicing, ``token_permutation.py`` the permutation; this file: the custom ops, their
autograd, and the public ``relu2_2to4_ffn`` (``__all__`` names the public API of all of them).

Shipped as HF remote code: imports only torch and same-folder modules.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .cpu_layout import _op_weights, _scratch, _unplanar_cols, _unplanar_rows, release_scratch_buffers
from .ffn_stages import (
    COMPILE_STAGES_ENV,
    DISABLE_COMPILE_ENV,
    _backward_stage,
    _FeatureSplit,
    _forward_stage,
    _members,
    _run_stage,
    _up_operand_stage,
    stage_compilation_enabled,
)
from .ffn_tensor_parallel import (
    _is_dtensor,
    _tensor_parallel_slices,
    global_dense_mask,
    tp_group_size,
    tp_sum_backward,
    tp_sum_forward,
)
from .fp8 import quantize_rows
from .fp8 import weight_operands as fp8_weight_operands
from .gemm_backends import (
    CUSPARSELT,
    PLAIN,
    GemmBackend,
    automatic_gemm_backend,
    dense_feature_count,
    ffn_gemm_shapes,
    fp8_ineligibility_reason,
    get_gemm_backend,
    select_gemms,
)
from .kernels import ALIGN
from .select_2to4 import (
    NM_PATTERNS,
    SPARSE_METHODS,
    _check_stats,
    count_2to4_stats,
    count_nonzero,
    mvue_key,
    sparsify_2to4,
)
from .token_permutation import GatherRows, TokenPermutation, make_token_permutation

BACKWARD_MODES = ("split_gemm", "naive", "exact")

# The public names of the 2:4 FFN, wherever they live in this folder.
__all__ = [
    "SPARSE_METHODS",
    "BACKWARD_MODES",
    "DISABLE_COMPILE_ENV",
    "COMPILE_STAGES_ENV",
    "sparsify_2to4",
    "relu2_2to4_ffn",
    "relu2_ffn_reference",
    "ffn_gemm_shapes",
    "dense_feature_count",
    "count_2to4_stats",
    "count_nonzero",
    "make_token_permutation",
    "TokenPermutation",
    "stage_compilation_enabled",
    "release_scratch_buffers",
    "tp_sum_forward",
    "tp_sum_backward",
]


# ----- The op: forward and backward as custom ops -----


def _backend_of(gemms: str, x: Tensor, w_up: Tensor, w_down: Tensor) -> GemmBackend:
    """The back-end a call named; calls written before the argument existed (older remote
    code, saved graphs) pass "" and get the automatic choice for their operands."""
    return get_gemm_backend(gemms) if gemms else select_gemms(x, w_up, w_down)


def _backend_named_by_flag(use_kernel: bool, device: torch.device) -> GemmBackend:
    """The back-end of a backward call that predates the ``gemms`` argument: the device's
    automatic one where it is of the kind the flag names, else the stock one of that kind."""
    automatic = automatic_gemm_backend(device)
    if automatic.planar != use_kernel:
        return automatic
    return CUSPARSELT if use_kernel else PLAIN


def _stat_delta_length(count_nm: bool) -> int:
    """The forward op's telemetry output: zeros, elements, 2:4-dropped [, each N:M's would-drop]."""
    return 3 + len(NM_PATTERNS) * bool(count_nm)


def _ffn_forward_impl(
    x, w_up, w_down, method, backward, n_dense, count, want_feature_counts, fp8, global_features=0, feature_offset=0,
    tp_group="", gemms="", w_down_fp8=None, w_down_scale=None, w_up_fp8=None, w_up_scale=None, count_nm=False,
):  # fmt: skip
    t, f = x.shape[0], w_up.shape[0]
    backend = _backend_of(gemms, x, w_up, w_down)
    # FP8 is a 2:4-GEMM mode with its own alignment: other calls run in bf16.
    fp8 = fp8 and backend.fp8_fits(t, x.shape[1], f)
    # Plain GEMMs work in the planar feature order (see _planar_rows): each 2:4 group's
    # members are then four contiguous planes, so the selection runs on unit-stride
    # vectors (a compiled CPU stage vectorises it; with members 4 apart it emits scalar
    # loops). The GEMMs do not care about the order; cuSPARSELt needs consecutive groups.
    planar = backend.planar
    w_up_op, w_down_op = _op_weights(w_up, w_down, planar)
    y1 = torch.mm(x, w_up_op.t(), out=_scratch("y1", (t, f), x))
    # MVUE: one key per call from the global RNG (eagerly, outside any compiled stage); the
    # stage hashes it with each group's global index, so a TP rank draws what one process
    # draws for the same groups.
    key = mvue_key(x.device) if method == "mvue" else None
    # naive keeps only g: y2s is recomputed from it in backward (bitwise equal), so the op
    # saves ONE T×F activation where the dense autograd FFN saves two, and y2s (read by
    # the down GEMM only) can live in a scratch buffer.
    # Output buffers on the plain path (scratch for y2s where it is not saved); the
    # cuSPARSELt path lets the stage allocate its outputs (the GPU's caching allocator).
    y2s_out = g_out = None
    members = (None, None)
    if planar:
        y2s_out = _scratch("y2s", (t, f), x) if method == "naive" else x.new_empty(t, f)
        g_out = x.new_empty(t, f)
        members = (_members(y2s_out, "planar"), _members(g_out, "planar"))
    y2s, g, relu_nnz, kept_nnz, nm_dropped, feature_counts, *y2s_fp8 = _run_stage(
        _forward_stage, y1, key, method, count, want_feature_counts, planar, y2s_out, g_out, *members, fp8,
        feature_offset // 4, count and count_nm,
    )  # fmt: skip
    del y1
    if fp8:
        # y2s (rows scaled by the stage) against W_down quantized per output channel (once
        # per optimizer step by the caller, else here).
        weight = (w_down_fp8, w_down_scale) if w_down_fp8 is not None else quantize_rows(w_down_op)
        y3 = backend.fp8_mm(*y2s_fp8, *weight, x.dtype)
    else:
        y3 = backend.mm(y2s, w_down_op.t())
    del y2s_fp8
    if count:
        numel = torch.full_like(relu_nnz, t * f)
        stat_delta = torch.stack((numel - relu_nnz, numel, relu_nnz - kept_nnz))
        if count_nm:  # then what each N:M pattern would drop
            stat_delta = torch.cat((stat_delta, nm_dropped))
    else:
        stat_delta = torch.zeros(_stat_delta_length(count_nm), dtype=torch.int64, device=x.device)
    y2s_saved = y2s if method != "naive" else g.new_empty(0)
    if feature_counts is None:
        feature_counts = torch.empty(0, dtype=torch.int64, device=x.device)
    # g, y2s and the feature counts stay in the op's feature order (planar on the plain
    # path): only its backward reads them.
    return y3, g, y2s_saved, feature_counts, stat_delta


def _ffn_forward_fake(
    x, w_up, w_down, method, backward, n_dense, count, want_feature_counts, fp8, global_features=0, feature_offset=0,
    tp_group="", gemms="", w_down_fp8=None, w_down_scale=None, w_up_fp8=None, w_up_scale=None, count_nm=False,
):  # fmt: skip
    t, f = x.shape[0], w_up.shape[0]
    return (
        x.new_empty(t, w_down.shape[0]),
        x.new_empty(t, f),
        x.new_empty(t, f) if method != "naive" else x.new_empty(0),
        x.new_empty(f if want_feature_counts else 0, dtype=torch.int64),
        x.new_empty(_stat_delta_length(count_nm), dtype=torch.int64),
    )


def _dense_split(counts: Tensor, n_dense: int, global_features: int, feature_offset: int, tp_group: str):
    """(feature order, dense mask or None) for the split backward: it keeps the features at
    the head of the order dense.

    The densest features (most non-zeros in y2s) go to the dense GEMM: that is where
    token-wise 2:4 would drop the most. Ties go to the lower feature index (ranked in
    feature order whatever the layout, so both GEMM paths pick the same features). Under
    tensor parallelism the ranking is the global one (one all-gather of the counts), so a
    rank keeps dense exactly the features one process would keep in its slice. How many
    that is varies from call to call, but shapes must not depend on data (no host sync):
    the caller takes a fixed number of candidates from the head of the order (this rank's
    dense features first) and the mask says which of them are really dense; the others
    are token-sparsified like every other feature.
    """
    if not tp_group:
        return torch.sort(counts, descending=True, stable=True).indices, None
    dense = global_dense_mask(counts, n_dense, global_features, feature_offset, tp_group)
    return torch.argsort(~dense, stable=True), dense


def _assemble(sparse_part: Tensor, dense_part: Optional[Tensor], idx: _FeatureSplit, dim: int) -> Tensor:
    """Weight gradient from its sparse-feature and dense-feature parts (``dim``: the feature dim)."""
    if dense_part is None:
        return sparse_part
    shape = list(sparse_part.shape)
    shape[dim] += dense_part.shape[dim]
    out = sparse_part.new_empty(shape)
    out.index_copy_(dim, idx.sparse, sparse_part)
    return out.index_copy_(dim, idx.dense, dense_part)


def _ffn_backward_impl(
    dy3, x, w_up, w_down, g, y2s, feature_counts, method, backward, n_dense, need_x, need_up, need_down, use_kernel,
    fp8, global_features=0, feature_offset=0, tp_group="", gemms="", w_up_fp8=None, w_up_scale=None,
):  # fmt: skip
    # gemms: the forward's back-end (see _setup_context), never re-chosen here: it also
    # fixes the layout of g, y2s and the counts (planar on the plain-GEMM path). Calls that
    # predate the argument name it by use_kernel.
    t, f = g.shape
    backend = get_gemm_backend(gemms) if gemms else _backend_named_by_flag(use_kernel, g.device)
    use_kernel, planar = not backend.planar, backend.planar
    # Tensor parallel: this rank holds features feature_offset.. of global_features, and
    # n_dense counts dense features over the whole width (see _dense_split).
    width = global_features or f
    if use_kernel and (not tp_group or global_features % (tp_group_size(tp_group) * ALIGN) == 0):
        # Gathered T×n_dense rows 16-byte aligned. Under TP only where every rank's slice
        # is aligned, so all ranks take this path and agree on the global count.
        n_dense = backend.dense_count(n_dense, width)
    w_up_op, w_down_op = _op_weights(w_up, w_down, planar)
    dy3 = dy3.contiguous()
    # Token-wise 2:4 only shapes the weight-gradient operands (dx is exact in every mode),
    # and the forward counts features only when a weight needs a gradient: with frozen
    # weights there is nothing to rank and nothing to sparsify.
    token_sparse = backward != "exact" and n_dense < width and (need_up or need_down)
    dense_idx = sparse_idx = dense_mask = dense_keep = None
    n_candidates = 0
    if token_sparse and n_dense > 0:
        counts = _unplanar_rows(feature_counts.view(f, 1)).view(f) if planar else feature_counts
        order, dense_keep = _dense_split(counts, n_dense, global_features, feature_offset, tp_group)
        n_candidates = min(n_dense, f)
        if use_kernel and dense_keep is not None:
            n_candidates = backend.dense_count(n_candidates, f)
        dense_idx = order[:n_candidates]
        if dense_keep is not None:
            dense_keep = dense_keep[dense_idx]
        if planar:
            dense_idx = (dense_idx % 4) * (f // 4) + dense_idx // 4  # feature 4j+k -> k·F/4 + j
            dense_mask = torch.zeros(f, dtype=torch.bool, device=g.device)
            if dense_keep is None:
                dense_mask.index_fill_(0, dense_idx, True)
            else:
                dense_mask.index_copy_(0, dense_idx, dense_keep)
        elif use_kernel:
            sparse_idx = order[n_candidates:].sort().values  # ascending: contiguous reads in the gather
    n_sparse = f - n_candidates if token_sparse else f
    pad_rows = backend.padded_rows(n_sparse) - n_sparse if token_sparse else 0
    # Outputs not asked for are distinct empty tensors (custom-op outputs may not alias).
    dx, dw_up, dw_down = x.new_empty(0), x.new_empty(0), x.new_empty(0)

    dy2 = torch.mm(dy3, w_down_op, out=_scratch("y1", (t, f), dy3))
    scratch = (None, None, None)
    if not use_kernel:
        down_out = _scratch("down", (t, f), dy3)
        scratch = (_scratch("y2s", (t, f), dy3), down_out, _members(down_out, "tokens") if t % 4 == 0 else None)
    fp8 = fp8 and need_x and backend.fp8_fits(t, x.shape[1], f)
    dy1, up, up_dense, down, down_dense, *dy1_fp8 = _run_stage(
        _backward_stage,
        dy2, g, y2s if method != "naive" else None, need_up, need_down, token_sparse,
        dense_idx, sparse_idx, pad_rows, use_kernel, dense_mask, *scratch, fp8, dense_keep,
    )  # fmt: skip
    del dy2
    idx = _FeatureSplit(dense_idx, sparse_idx, pad_rows, use_kernel)
    if fp8:
        # dy1 (rows scaled by the stage) against W_up quantized per output channel of dx.
        weight = (w_up_fp8, w_up_scale) if w_up_fp8 is not None else quantize_rows(w_up_op.t())
        dx = backend.fp8_mm(*dy1_fp8, *weight, dy3.dtype)
    elif need_x:
        dx = backend.mm(dy1, w_up_op)
    del dy1_fp8
    if need_up:
        if not token_sparse:
            dw_up = torch.mm(dy1.t(), x)
        elif use_kernel:
            dense = torch.mm(up_dense.t(), x) if up_dense is not None else None
            part = backend.mm(up, x)[:n_sparse] if n_sparse else x.new_empty(0, x.shape[1])
            dw_up = _assemble(part, dense, idx, 0)
        else:
            up_out = _scratch("up", (t, f), dy1)
            members = _members(up_out, "tokens") if t % 4 == 0 else None
            operand = _run_stage(_up_operand_stage, dy1, dense_idx, dense_mask, up_out, members, dense_keep)
            dw_up = torch.mm(operand.t(), x)
        if planar:
            dw_up = _unplanar_rows(dw_up)
    del dy1, up, up_dense
    if need_down:
        if use_kernel and token_sparse:
            dense = torch.mm(dy3.t(), down_dense) if down_dense is not None else None
            part = dy3.new_empty(dy3.shape[1], 0)  # TP: every feature of the slice a dense candidate
            if n_sparse:
                part = backend.mm(down, dy3, transpose_result=True)[:, :n_sparse]
            dw_down = _assemble(part, dense, idx, 1)
        else:
            dw_down = torch.mm(dy3.t(), down)
            if planar:
                dw_down = _unplanar_cols(dw_down)
    return dx, dw_up, dw_down


def _ffn_backward_fake(
    dy3, x, w_up, w_down, g, y2s, feature_counts, method, backward, n_dense, need_x, need_up, need_down, use_kernel,
    fp8, global_features=0, feature_offset=0, tp_group="", gemms="", w_up_fp8=None, w_up_scale=None,
):  # fmt: skip
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(w_up) if need_up else x.new_empty(0),
        torch.empty_like(w_down) if need_down else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, w_up, w_down, method, backward, n_dense, _count, _want, fp8, *rest = inputs
    _y3, g, y2s, feature_counts, stat_delta = output
    # The FP8 W_upᵀ the caller quantized for this step (dx's dense operand), when it did.
    w_up_fp8 = tuple(rest[6:8]) if len(rest) > 7 and rest[6] is not None else ()
    ctx.save_for_backward(x, w_up, w_down, g, y2s, feature_counts, *w_up_fp8)
    ctx.mark_non_differentiable(g, y2s, feature_counts, stat_delta)
    # Those outputs never get gradients: no T×F zero tensors for them in backward.
    ctx.set_materialize_grads(False)
    ctx.method, ctx.backward_mode, ctx.n_dense, ctx.fp8 = method, backward, n_dense, fp8
    # (global_features, feature_offset, tp_group), then the back-end's name; older callers
    # pass fewer (the schema's defaults fill them in).
    tp = tuple(rest[:3]) + (0, 0, "")[len(rest[:3]) :]
    ctx.tp = tp
    # The back-end the forward ran: the backward looks the same one up, since it also
    # fixes the feature order of g, y2s and the counts.
    ctx.gemms = (rest[3] if len(rest) > 3 else "") or select_gemms(x, w_up, w_down).name


def _ffn_backward(ctx, dy3, *_unused_grads):
    x, w_up, w_down, g, y2s, feature_counts, *w_up_fp8 = ctx.saved_tensors
    need_x, need_up, need_down = ctx.needs_input_grad[:3]
    grads = [None] * len(ctx.needs_input_grad)
    if dy3 is not None and (need_x or need_up or need_down):
        use_kernel = not get_gemm_backend(ctx.gemms).planar  # what the schema's older callers pass
        dx, dw_up, dw_down = torch.ops.hf_sparse.relu2_2to4_ffn_bwd(
            dy3, x, w_up, w_down, g, y2s, feature_counts, ctx.method, ctx.backward_mode, ctx.n_dense,
            need_x, need_up, need_down, use_kernel, ctx.fp8, *ctx.tp, ctx.gemms, *w_up_fp8,
        )  # fmt: skip
        grads[:3] = (dx if need_x else None, dw_up if need_up else None, dw_down if need_down else None)
    return tuple(grads)


def _register_ops() -> None:
    # Remote code may load a second copy of this file under another module name in the
    # same process; the first registration wins (the code is the same).
    if hasattr(torch.ops.hf_sparse, "relu2_2to4_ffn_fwd"):
        return
    # The tensor-parallel arguments and the back-end come last with defaults: calls written
    # before they existed (older remote code, saved graphs) mean "one process" and "the
    # automatic back-end".
    tp_args = "int global_features=0, int feature_offset=0, str tp_group='', str gemms=''"
    # FP8 weights quantized by the caller (once per optimizer step); absent: the op quantizes.
    w_up_fp8 = "Tensor? w_up_fp8=None, Tensor? w_up_scale=None"
    fwd_schema = (
        "(Tensor x, Tensor w_up, Tensor w_down, str method, str backward, int n_dense, bool count, "
        f"bool want_feature_counts, bool fp8, {tp_args}, Tensor? w_down_fp8=None, Tensor? w_down_scale=None, "
        f"{w_up_fp8}, bool count_nm=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    )
    fwd = torch.library.custom_op(
        "hf_sparse::relu2_2to4_ffn_fwd", _ffn_forward_impl, mutates_args=(), schema=fwd_schema
    )
    fwd.register_fake(_ffn_forward_fake)
    bwd_schema = (
        "(Tensor dy3, Tensor x, Tensor w_up, Tensor w_down, Tensor g, Tensor y2s, Tensor feature_counts, "
        "str method, str backward, int n_dense, bool need_x, bool need_up, bool need_down, bool use_kernel, "
        f"bool fp8, {tp_args}, {w_up_fp8}) -> (Tensor, Tensor, Tensor)"
    )
    bwd = torch.library.custom_op(
        "hf_sparse::relu2_2to4_ffn_bwd", _ffn_backward_impl, mutates_args=(), schema=bwd_schema
    )
    bwd.register_fake(_ffn_backward_fake)
    fwd.register_autograd(_ffn_backward, setup_context=_setup_context)


_register_ops()


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def relu2_2to4_ffn(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    *,
    method: str = "naive",
    backward: str = "split_gemm",
    dense_features: float = 0.05,
    permutation: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
    fp8: bool = False,
    gemms: Optional[str] = None,
    weight_generation: Optional[int] = None,
    nm_stats: Optional[Tensor] = None,
) -> Tensor:
    """Non-gated ReLU² FFN ``relu(x w_upᵀ)² w_downᵀ`` with 2:4 activation sparsity.

    Args:
        x: (..., d) input; leading dims are flattened into T tokens and restored.
        w_up: (F, d), w_down: (d, F); F must be a multiple of 4. No biases.
        method: forward 2:4 rule, one of ``SPARSE_METHODS``.
        backward: weight-gradient mode, one of ``BACKWARD_MODES``.
        dense_features: fraction of the densest features kept dense in ``split_gemm``
            (``ceil(dense_features · F)`` features).
        permutation: optional LongTensor[T]; tokens are permuted before the op and
            un-permuted after, so token-wise 2:4 groups are not neighbouring tokens. It
            must be a permutation (not checked: that would need a host sync).
        stats: optional float64/int64 1-D tensor (len >= 3) receiving, in place and in
            forward only: zeros of y2, numel of y2, non-zeros dropped by the 2:4 mask.
        fp8: run the forward and input-gradient 2:4 GEMMs in row-wise scaled FP8 e4m3 with
            bf16 output (see ``fp8.py``); on the cuSPARSELt path only (sm90 GPUs with
            cuSPARSELt >= 0.6.2), refused with one error anywhere else. A call whose token
            count is not aligned runs the plain path in bf16, as every non-FP8 call does.
        gemms: the GEMM back-end by name (``"plain"``, ``"cusparselt"``, or one registered
            with ``gemm_backends.register_gemm_backend``); default: the device's automatic
            one. Chosen once per call (see ``gemm_backends.select_gemms``): under
            ``torch.compile`` that is while tracing, so the choice is a constant of the graph.
        weight_generation: the optimizer step the weights belong to (SparsityCallback's
            counter, see ``weight_sparse.next_weight_generation``): with it, FP8 mode
            quantizes the weights once per step instead of every call.
        nm_stats: optional 1-D tensor of ``len(NM_PATTERNS)`` (with ``stats``) receiving
            what keeping the N largest of every M consecutive features would drop, per
            pattern (4:8, 8:16), from the same forward pass (``select_2to4.nm_would_drop``).

    Computes in the input dtype (under autocast: the autocast dtype, like F.linear).
    Traceable by ``torch.compile(fullgraph=True)``: the work is two custom ops.

    Tensor parallel: with ``w_up`` a column-parallel DTensor (Shard(0)) and ``w_down`` a
    row-parallel one (Shard(1)), as ``tp_plan="auto"`` leaves them, and ``x`` replicated,
    each rank runs the op on its F-slice and the partial outputs are summed across ranks,
    as for the dense MLP; ``x``'s gradient is summed in backward, the weights' gradients
    are their local shards. The result equals the single-process op for every method and
    backward: 2:4 groups lie along F and stay on one rank; ``split_gemm`` ranks the
    features of all ranks (one all-gather of F/N counts per call) and keeps
    ``ceil(dense_features · F)`` of the whole width dense, however they fall on the ranks;
    ``mvue`` hashes each group's global index. ``stats`` then counts this rank's features only,
    and ``nm_stats`` the N:M groups within this rank's slice (the whole width's groups when
    each slice is a multiple of 16 features).
    """
    if method not in SPARSE_METHODS:
        raise ValueError(f"method must be one of {SPARSE_METHODS}, got {method!r}")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    if (
        isinstance(dense_features, bool)
        or not isinstance(dense_features, (int, float))
        or not 0.0 <= dense_features <= 1.0
    ):
        raise ValueError(f"dense_features must be a float in [0.0, 1.0], got {dense_features!r}")
    tp_group, global_features, feature_offset = None, 0, 0
    if _is_dtensor(w_up) or _is_dtensor(w_down):
        global_features = w_up.shape[0]
        w_up, w_down, tp_group, feature_offset = _tensor_parallel_slices(w_up, w_down)
        # Replicated x meets this rank's F-slice only: its gradient is summed across ranks.
        x = tp_sum_backward(x, tp_group)
    if w_up.dim() != 2 or w_down.dim() != 2:
        raise ValueError("w_up and w_down must be 2-D (F×d and d×F)")
    f, d = w_up.shape
    if x.shape[-1] != d or w_down.shape[1] != f:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}")
    if f % 4:
        raise ValueError(f"the FFN width F must be a multiple of 4, got {f}")
    if stats is not None:
        _check_stats(stats)
    if nm_stats is not None and (stats is None or nm_stats.shape != (len(NM_PATTERNS),)):
        raise ValueError(f"nm_stats must be a 1-D tensor of {len(NM_PATTERNS)} counts, given with stats")

    if gemms is not None:
        get_gemm_backend(gemms)  # an unknown name fails here, naming the valid ones
    if fp8:
        reason = get_gemm_backend(gemms).fp8_reason(x.device) if gemms else fp8_ineligibility_reason(x.device)
        if reason is not None:
            raise ValueError(f"activation_2by4_fp8: FP8 2:4 GEMMs cannot run here ({reason}); set it to false.")
    cast = _autocast_dtype(x.device.type)
    w_down_param = w_down  # FP8 weights are kept on it (under autocast w_down is a fresh cast)
    if cast is not None:
        x, w_up, w_down = x.to(cast), w_up.to(cast), w_down.to(cast)
    if not (x.dtype == w_up.dtype == w_down.dtype):
        raise ValueError(f"dtype mismatch: x {x.dtype}, w_up {w_up.dtype}, w_down {w_down.dtype}")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, d).contiguous()
    if permutation is not None:
        if permutation.dim() != 1 or permutation.shape[0] != x2.shape[0]:
            raise ValueError(f"permutation must be a 1-D tensor of length {x2.shape[0]} (tokens)")
        # Both directions are gathers (the inverse is a scatter of T indices): index_select's
        # own backward would be a zero fill plus an index_add over T×d.
        positions = torch.arange(permutation.shape[0], device=permutation.device)
        inverse = torch.empty_like(permutation).index_copy_(0, permutation, positions)
        x2 = GatherRows.apply(x2, permutation, inverse)

    # The dense-feature count is over the whole width, also under tensor parallelism.
    width = global_features or f
    n_dense = dense_feature_count(width, dense_features, backward)
    weights_need_grad = torch.is_grad_enabled() and (w_up.requires_grad or w_down.requires_grad)
    # Per-feature counts only feed the dense-feature ranking of a split backward.
    want_feature_counts = weights_need_grad and 0 < n_dense < width
    w_up, w_down = w_up.contiguous(), w_down.contiguous()
    # Once per call; the op's forward and backward both run this back-end.
    backend = select_gemms(x2, w_up, w_down, gemms)
    fp8_weights = ()
    if fp8 and backend.fp8_fits(x2.shape[0], d, f):
        fp8_weights = fp8_weight_operands(w_up, w_down, w_down_param, weight_generation)
    # Inputs are already in the autocast dtype; autocast must not recast inside the op.
    ctx = torch.autocast(x2.device.type, enabled=False) if cast is not None else contextlib.nullcontext()
    with ctx:
        y, _g, _y2s, _counts, stat_delta = torch.ops.hf_sparse.relu2_2to4_ffn_fwd(
            x2, w_up, w_down, method, backward, n_dense, stats is not None, want_feature_counts,
            fp8, global_features, feature_offset, "" if tp_group is None else tp_group.group_name, backend.name,
            *fp8_weights, count_nm=nm_stats is not None,
        )  # fmt: skip
    if stats is not None:
        with torch.no_grad():
            stats[:3].add_(stat_delta[:3])
            if nm_stats is not None:
                nm_stats.add_(stat_delta[3:])
    if tp_group is not None:
        # Partial sums of the row-parallel down projection (what RowwiseParallel reduces).
        y = tp_sum_forward(y, tp_group)
    if permutation is not None:
        y = GatherRows.apply(y, inverse, permutation)  # row perm[i] of the result is row i of y
    return y.view(*lead, y.shape[-1])


def relu2_ffn_reference(x: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Plain dense ReLU² FFN with autograd (the baseline)."""
    return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w_up)).square(), w_down)
