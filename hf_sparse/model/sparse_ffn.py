"""2:4 activation-sparse Squared-ReLU FFN (Haziza et al. 2025, arXiv 2503.16672).

One semantics, two GEMM back-ends: plain ``torch.mm`` (any device/dtype, float64
included) and, on CUDA sm80+ with bf16/fp16 and aligned shapes, real 2:4 sparse GEMMs
through cuSPARSELt (see ``kernels.py``). Everything between the GEMMs is a handful of
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
gathered into a small dense GEMM and the sparse GEMMs run over the other features only.

Stages (the op's whole non-GEMM traffic; see benchmarks/ffn_traffic.py):
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
scratch buffers (see ``_scratch``): fresh allocations of that size page-fault on every
call. The cuSPARSELt path keeps the stock order (its 2:4 groups are consecutive).

The op is registered with ``torch.library.custom_op`` (forward and backward ops with
fake implementations, autograd registered), so ``torch.compile(model, fullgraph=True)``
traces it as one node.

This file is shipped as HF remote code: it imports only torch and same-folder modules.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import sparse24_mm, sparse24_padded_rows, use_2to4_kernel

logger = logging.getLogger(__name__)

SPARSE_METHODS = ("naive", "mvue", "soft_threshold")
BACKWARD_MODES = ("split_gemm", "naive", "exact")
DISABLE_COMPILE_ENV = "HF_SPARSE_DISABLE_COMPILE"
COMPILE_STAGES_ENV = "HF_SPARSE_COMPILE_STAGES"

__all__ = [
    "SPARSE_METHODS",
    "BACKWARD_MODES",
    "sparsify_2to4",
    "relu2_2to4_ffn",
    "relu2_ffn_reference",
    "count_2to4_stats",
    "make_token_permutation",
    "TokenPermutation",
    "stage_compilation_enabled",
    "release_scratch_buffers",
]


# ----- Selection rules -----
# Duels between the four members (a, b, c, d) of each group: i beats j (i < j) iff
# v_i >= v_j. Ranking keys have NaN replaced by +inf first: a NaN compares false both
# ways and would break the total order (a group could keep 3 or 4 members, which is
# not 2:4 and undefined for cuSPARSELt). With the keys, NaN ranks highest, ties go to
# the lower index, and the NaN itself is kept, so it still reaches the output and the
# numerics guard.


def count_nonzero(t: Tensor) -> Tensor:
    """Exact non-zero count of ``t`` as a 0-d int64 device tensor (no host sync).

    On CPU `torch.count_nonzero` of a float tensor is ~8x slower than casting to bool and
    summing rows in int32 (exact while a row has < 2**31 elements); telemetry counts every
    training forward, so this sits on the hot path.
    """
    return t.bool().sum(-1, dtype=torch.int32).sum()


def _u8(t: Tensor) -> Tensor:
    return t.view(torch.uint8)


def _rank_keys(v: Tensor) -> Tensor:
    """``v`` with NaN replaced by +inf (for ranking only; the values themselves are kept)."""
    return _nan_to_inf(v)


def _nan_to_inf(v: Tensor) -> Tensor:
    """``v`` with NaN replaced by +inf, out of place. Compiled as a compare-and-select:
    CPU inductor lowers nan_to_num to a scalar isnan loop per vector."""
    if torch.compiler.is_compiling():
        return torch.where(v != v, math.inf, v)
    return torch.nan_to_num(v, nan=math.inf, posinf=math.inf, neginf=-math.inf)


def _rank_keys_(v: Tensor) -> Tensor:
    """In-place :func:`_rank_keys` for a tensor the caller owns."""
    return v.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)


def _flags(cond: Tensor) -> Tensor:
    """0/1 flags of a bool tensor for small per-group counts (0..4): uint8 eager (a quarter
    of the bytes); float32 when compiled, because CPU inductor emits scalar loops for uint8
    arithmetic (a compiled selection stage measured ~4x slower with uint8 counts)."""
    return cond.to(torch.float32) if torch.compiler.is_compiling() else _u8(cond)


def _group_nonzero_counts(members: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """(non-zeros, non-zeros a 2:4 mask drops) of groups given as four member views.

    Every rule keeps min(2, nnz) of a group (NaN is a non-zero and ranks highest), so the
    drop count is sum(max(nnz_g - 2, 0)). Works on small per-group counts: a pass over F/4
    values instead of F, and no float->int conversion of a full-size tensor.
    """
    if torch.compiler.is_compiling():
        # Two independent expressions, one per reduction: a per-group count read by both
        # would be written to memory and read back (inductor realises shared producers);
        # duplicated, each folds into its reduction and the loop computes it once.
        relu_nnz = sum(_flags(m != 0) for m in members).sum(dtype=torch.int64)
        dropped = (sum(_flags(m != 0) for m in members) - 2).clamp(min=0).sum(dtype=torch.int64)
        return relu_nnz, dropped
    nnz_g = sum(_flags(m != 0) for m in members)
    # max(nnz_g - 2, 0) = (nnz_g >= 3) + (nnz_g == 4), without uint8 wrap-around
    dropped = count_nonzero(nnz_g > 2) + count_nonzero(nnz_g == 4)
    return nnz_g.sum(-1, dtype=torch.int32).sum(), dropped


def _win_counts(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> tuple[Tensor, ...]:
    """Number of duels each of (a, b, c, d) wins (in :func:`_flags`' dtype); ties go to the
    lower index.

    i beats j (i < j) iff v_i >= v_j. For NaN-free keys that is a total order, so the
    counts are exactly 3, 2, 1, 0 in some order: "wins >= 2" keeps exactly the two largest.
    """
    w01, w02, w03 = _flags(a >= b), _flags(a >= c), _flags(a >= d)
    w12, w13, w23 = _flags(b >= c), _flags(b >= d), _flags(c >= d)
    # The constant goes in first so that nothing wraps below zero in uint8.
    return (
        w01 + w02 + w03,
        (w12 + w13) + 1 - w01,
        (w23 + 2) - w02 - w12,
        3 - (w03 + w13 + w23),
    )


def _top2_of_4(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> list[Tensor]:
    """Bool keep flags of the 2 largest of (a, b, c, d) (NaN-free keys), ties to the lower index."""
    return [s >= 2 for s in _win_counts(a, b, c, d)]


def _third_largest_of_4(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Second smallest of four values with min/max only (the S-STE threshold)."""
    lo = torch.maximum(torch.minimum(a, b), torch.minimum(c, d))
    hi = torch.minimum(torch.maximum(a, b), torch.maximum(c, d))
    return torch.minimum(lo, hi)


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keep_top2_(groups: Tensor, dim: int, by_magnitude: bool) -> Tensor:
    """``groups`` with all but the top 2 of each group of 4 along ``dim`` zeroed.

    Ranks by value (``groups`` must then be NaN-free, e.g. relu outputs with NaN mapped to
    +inf) or by |value| with NaN as +inf. Eager: in place on ``groups`` (the caller owns
    it), zeroing by an AND with an all-ones/all-zeros bit mask: the same bits as
    masked_fill (+0.0 where dropped, Inf included, which a multiply by 0/1 flags would
    turn into NaN and so break the 2:4 pattern), ~4x faster on CPU. Compiled: functional
    (a select), which inductor fuses into one loop; in-place writes to strided views
    would split it into several.
    """
    # |values| is a fresh tensor: its NaN -> +inf replacement can go in place.
    keys = (_rank_keys_(groups.abs()) if by_magnitude else groups).unbind(dim)
    wins = _win_counts(*keys)
    if torch.compiler.is_compiling():
        # Select per member and stack the values (a stacked bool mask gets written out).
        return torch.stack([torch.where(w >= 2, m, 0.0) for m, w in zip(groups.unbind(dim), wins)], dim)
    int_type = _INT_OF_SIZE[groups.element_size()]
    for member, w in zip(groups.unbind(dim), wins):
        bits = torch.ge(w, 2, out=torch.empty(w.shape, dtype=int_type, device=w.device)).neg_()
        member.view(int_type).bitwise_and_(bits)
    return groups


def _group_keep(groups: Tensor, dim: int) -> Tensor:
    """Bool top-2 keep mask of ``groups`` (magnitudes, NaN allowed) along ``dim`` (size 4)."""
    keys = _rank_keys(groups).unbind(dim)
    return torch.stack(_top2_of_4(*keys), dim)


def _mvue_select(mag: Tensor, u: Optional[Tensor] = None, dim: int = -1) -> Tensor:
    """Unbiased minimum-variance 2:4 draw (Chmiel et al.) on a magnitude view whose ``dim``
    (size 4) holds the groups.

    Keep probabilities p_i ∝ |v_i| with sum(p) = min(2, nnz), capped at 1 (the capped
    member is kept surely, the other mass is spread over the rest). Members are drawn by
    systematic sampling: with u ~ U[0, 1), member i is kept iff its interval
    [c_{i-1}, c_i) of the cumulative p contains u or u + 1, i.e. iff
    ceil(c_i - u) - ceil(c_{i-1} - u) = 1. Each p_i <= 1, so each member is kept with
    probability p_i and at most 2 are kept. A group holding a non-finite value has no
    valid probabilities: it keeps its top-2 (NaN highest) with D = 1, so the NaN/Inf
    flows on to the output instead of spreading over the whole group.

    ``u`` (float32, shaped like ``mag`` with size 1 at ``dim``) is drawn here from the global RNG
    when not given; the FFN op draws it eagerly and passes it in, so a compiled stage
    selects exactly what the eager one does.

    Returns D = 1/p on kept members, 0 elsewhere, shaped like ``mag``, in float32
    (float64 for float64 input).
    """
    cdtype = torch.float64 if mag.dtype == torch.float64 else torch.float32
    tiny = torch.finfo(cdtype).tiny
    m = mag.to(cdtype)
    finite = torch.isfinite(m.sum(dim, keepdim=True))
    m = torch.where(finite, m, 0.0)
    # Normalise by the group max: sums of large bf16/fp32 values could overflow.
    n = m / m.amax(dim, keepdim=True).clamp_min(tiny)
    s = n.sum(dim, keepdim=True)
    # The normalised max is exactly 1; it exceeds half the sum iff s < 2 ("capped"): then
    # it is unique, kept surely, and the others share 1 in proportion. Their sum is taken
    # directly (not as s - 1) and p divided rather than multiplied by a reciprocal, so a
    # group that is already 2:4 gets p = 1 exactly and passes through losslessly.
    rest = torch.where(n == 1.0, 0.0, n).sum(dim, keepdim=True)
    denom = torch.where(s < 2.0, rest, s * 0.5).clamp_min(tiny)
    p = (n / denom).clamp(max=1.0)  # the capped max comes out > 1 and is clamped to 1
    # The clamp keeps rounding from pushing the total past 2 (a third point).
    c = p.cumsum(dim).clamp(max=2.0)
    if u is None:
        # Always drawn in float32 so a given seed selects the same members in every dtype.
        u_shape = list(m.shape)
        u_shape[dim] = 1
        u = torch.rand(u_shape, dtype=torch.float32, device=m.device)
    hits = (c - u.to(cdtype)).ceil()  # ceil(c_0 - u) = 0 for the implicit c_0 = 0
    first, step = hits.narrow(dim, 0, 1), hits.narrow(dim, 1, 3) - hits.narrow(dim, 0, 3)
    keep = torch.cat((first, step), dim).clamp(max=1.0)
    inv_p = keep / p.clamp_min(tiny)
    return torch.where(finite, inv_p, _group_keep(mag, dim).to(cdtype))


def _inv_p_to(inv_p: Tensor, dtype: torch.dtype) -> Tensor:
    # A tiny kept p would give 1/p = inf in a narrow dtype; clamp to the largest finite.
    return inv_p.clamp(max=torch.finfo(dtype).max).to(dtype)


def _select_generic(v: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """(sparse values, D) for a (R, G, 4) view of any sign (public, not the FFN hot path)."""
    mag = v.abs()
    if method == "mvue":
        inv_p = _mvue_select(mag)
        # Values from float32/64 (v/p is bounded by the group sum; 1/p alone may not be).
        vals = torch.where(inv_p != 0, v.to(inv_p.dtype) * inv_p, 0.0).to(v.dtype)
        return vals, _inv_p_to(inv_p, v.dtype)
    # Excluding zeros makes M == "kept non-zeros": a group with < 2 non-zeros keeps
    # exactly its non-zeros (and D is 0 on the zeros it could have kept).
    keep = _group_keep(mag, -1) & (mag != 0)
    dmat = keep.to(v.dtype)
    if method == "naive":
        return torch.where(keep, v, 0.0), dmat
    thresh = _third_largest_of_4(*_rank_keys(mag).unbind(-1)).unsqueeze(-1)
    return torch.where(keep, (mag - thresh).clamp(min=0) * v.sign(), 0.0), dmat


def _check_method(method: str) -> None:
    if method not in SPARSE_METHODS:
        raise ValueError(f"method must be one of {SPARSE_METHODS}, got {method!r}")


def sparsify_2to4(y: Tensor, method: str = "naive", dim: int = -1) -> tuple[Tensor, Tensor]:
    """2:4-sparsify ``y`` along ``dim`` (groups of 4 consecutive elements keep <= 2).

    Returns ``(y_sparse, D)`` where ``D = ∂y_sparse/∂y`` with the mask and scale held
    constant (the mask for naive/soft_threshold, mask/p for mvue), in ``y``'s dtype.
    Values of any sign are ranked by magnitude; NaN ranks highest. Not differentiable
    itself: it is the selection rule that :func:`relu2_2to4_ffn` applies.
    """
    _check_method(method)
    if y.dim() == 0:
        raise ValueError("sparsify_2to4 needs at least one dimension")
    n = y.shape[dim]
    if n % 4:
        raise ValueError(f"size of dim {dim} must be a multiple of 4, got {n}")
    with torch.no_grad():
        yl = y.detach().movedim(dim, -1).contiguous()
        vals, dmat = _select_generic(yl.view(-1, n // 4, 4), method)
        return vals.view(yl.shape).movedim(-1, dim), dmat.view(yl.shape).movedim(-1, dim)


def count_2to4_stats(y2: Tensor, stats: Tensor, method: str = "naive") -> None:
    """Add the telemetry counts of ``y2`` (grouped along its last dim) to ``stats``.

    stats[0] += zeros of y2, stats[1] += numel, stats[2] += non-zeros a 2:4 mask would
    drop. Nothing is sparsified (dense warm-up). Every method keeps min(2, nnz) non-zeros
    per group (MVUE's probabilities sum to min(2, nnz) and systematic sampling draws
    exactly that many, up to float rounding), so the count is the same for all methods.
    No host sync.
    """
    _check_method(method)
    _check_stats(stats)
    n = y2.shape[-1]
    if n % 4:
        raise ValueError(f"last dim of y2 must be a multiple of 4, got {n}")
    with torch.no_grad():
        nnz, dropped = _group_nonzero_counts(y2.detach().reshape(-1, n // 4, 4).unbind(-1))
        _add_stats(stats, y2.numel(), nnz, dropped)


def _check_stats(stats: Tensor) -> None:
    if not isinstance(stats, Tensor) or stats.dim() != 1 or stats.shape[0] < 3:
        raise ValueError("stats must be a 1-D tensor of length >= 3")
    if stats.dtype not in (torch.float64, torch.int64):
        raise ValueError(f"stats must be float64 or int64, got {stats.dtype}")


def _add_stats(stats: Tensor, numel: int, nnz: Tensor, dropped: Tensor) -> None:
    # Python-int operands become kernel scalars: no host<->device transfer, no sync.
    stats[0].add_(numel - nnz)
    stats[1].add_(numel)
    stats[2].add_(dropped)


# ----- Stages: compiled or eager -----


def stage_compilation_enabled(device_type: str) -> bool:
    """Whether the op's elementwise stages run through ``torch.compile`` on this device.

    ``HF_SPARSE_DISABLE_COMPILE=1`` forces eager everywhere. Otherwise
    ``HF_SPARSE_COMPILE_STAGES`` decides: ``1`` always, ``0`` never, ``auto`` (default)
    on CUDA only: there the eager stages cost several memory passes each, while on CPU
    the C++ compile takes longer than a short run saves (see the README).
    """
    if os.environ.get(DISABLE_COMPILE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return False
    mode = os.environ.get(COMPILE_STAGES_ENV, "auto").strip().lower()
    if mode in ("1", "true", "yes", "on", "always"):
        return True
    if mode in ("0", "false", "no", "off", "never"):
        return False
    return device_type == "cuda"


_compiled_stages: dict[Callable, Callable] = {}
_compile_broken: list[str] = []  # first failure, kept so every later call goes eager
_STAGE_RECOMPILE_LIMIT = 64


def _run_stage(stage: Callable, *args):
    """Run one stage, compiled when enabled; a failing compiler falls back to eager (warned once)."""
    if not _compile_broken and stage_compilation_enabled(args[0].device.type):
        compiled = _compiled_stages.get(stage)
        if compiled is None:
            # dynamic=None: a second token count (eval, last partial batch) makes the
            # stage shape-generic once instead of recompiling for every count.
            compiled = _compiled_stages[stage] = torch.compile(
                stage, fullgraph=True, dynamic=None, options={"emulate_precision_casts": True}
            )
        try:
            # Each stage is compiled once per combination of its static arguments (method,
            # mode flags, dtype): more than dynamo's default of 8 per function in a process
            # that uses several configurations (the tests do).
            with torch._dynamo.config.patch(recompile_limit=_STAGE_RECOMPILE_LIMIT):
                return compiled(*args)
        except Exception as exc:  # no C++ compiler, no Triton, an inductor bug: all mean "run eager"
            _compile_broken.append(f"{type(exc).__name__}: {exc}")
            logger.warning(
                "2:4 FFN: compiling the elementwise stages failed (%s); running them eagerly "
                "(same results, more memory traffic). Set %s=1 to skip compilation.",
                _compile_broken[0].splitlines()[0][:300],
                DISABLE_COMPILE_ENV,
            )
    return stage(*args)


def _col_nonzero_counts(nz_mask: Tensor) -> Tensor:
    """True entries per column of a (T, F) bool tensor, int64."""
    if torch.compiler.is_compiling():
        # One fused column reduction (T < 2**31 rows: int32 is exact).
        return nz_mask.sum(0, dtype=torch.int32).to(torch.int64)
    nz = _u8(nz_mask)
    t = nz.shape[0]
    # Two-level reduction with int16 partials (chunk <= 128 rows cannot overflow): far
    # cheaper on CPU than a dim-0 reduction accumulating in int64.
    chunk = math.gcd(t, 128)
    if chunk > 1:
        return nz.view(t // chunk, chunk, -1).sum(1, dtype=torch.int16).sum(0, dtype=torch.int64)
    return nz.sum(0, dtype=torch.int64)


def _feature_groups(r: Tensor, planar: bool) -> tuple[Tensor, int]:
    """(grouped view, group dim) of a (T, F) tensor whose feature groups of 4 lie in
    ``planar`` layout (member k of group j at column k·F/4 + j) or consecutively."""
    t, f = r.shape
    return (r.view(t, 4, f // 4), 1) if planar else (r.view(t, f // 4, 4), 2)


def _forward_stage(
    y1: Tensor,
    u: Optional[Tensor],
    method: str,
    count: bool,
    want_feature_counts: bool,
    planar: bool = False,
    y2s_out: Optional[Tensor] = None,
    g_out: Optional[Tensor] = None,
    y2s_members: Optional[tuple[Tensor, ...]] = None,
    g_members: Optional[tuple[Tensor, ...]] = None,
):
    """y1 (T×F) -> y2s, g = D ⊙ 2·relu(y1), [relu non-zeros, kept non-zeros], per-feature non-zeros.

    The counts are 0-d int64 tensors (None when not asked for): telemetry comes out of
    this pass instead of a second read of a T×F tensor. ``planar``: the feature groups lie
    in the planar layout (see :func:`_feature_groups`). y2s and g are written into
    ``y2s_out`` / ``g_out`` when given (buffers the caller chose, see :func:`_scratch`) or
    returned fresh (MVUE, or when not given); ``*_members`` are those buffers' member views
    (:func:`_members`), which the compiled planar stage writes. Eager: in place on y1 (the op's own
    intermediate) and on the outputs; compiled: functional, one fused loop ending in the
    output buffers (mutating y1 would cost a copy back).
    """
    t, f = y1.shape
    compiling = torch.compiler.is_compiling()
    # relu, with NaN mapped to +inf: it ranks highest (a NaN breaks pairwise duels, and a
    # group could keep 3 or 4), stays non-finite for the numerics guard, and every later
    # selection can rank on the values themselves.
    r = _nan_to_inf(y1.clamp(min=0)) if compiling else y1.clamp_(min=0).nan_to_num_(nan=math.inf, posinf=math.inf)
    if compiling and planar and method != "mvue" and y2s_members is not None and g_members is not None:
        return _planar_forward_by_members(r, method, count, want_feature_counts, y2s_out, g_out, y2s_members, g_members)
    groups, dim = _feature_groups(r, planar)
    relu_nnz = kept_nnz = feature_counts = None
    if method == "mvue":
        y2 = r * r
        u = u.view((t, 1, f // 4) if planar else (t, f // 4, 1))
        inv_p = _mvue_select(y2.view(groups.shape), u, dim).view(t, f)
        kept = inv_p != 0
        y2s = torch.where(kept, (y2.to(inv_p.dtype) * inv_p).to(y1.dtype), 0.0)
        g = torch.where(kept, r * _inv_p_to(inv_p, y1.dtype) * 2.0, 0.0)
        if count:
            relu_nnz, kept_nnz = count_nonzero(r), count_nonzero(y2s)
    else:
        # Rank on relu(y1) instead of y2 = relu(y1)²: same order (squaring is monotone on
        # r >= 0), so y2 is never materialised unmasked. Only two r whose squares round to
        # the same y2 are ranked by r rather than by index; the kept values are the same.
        if count:
            # zeros of y2 = zeros of relu(y1); the mask keeps min(2, nnz) per group. Counted
            # before the S-STE shift, which also zeroes kept members tied with the threshold.
            relu_nnz, dropped = _group_nonzero_counts(groups.unbind(dim))
            kept_nnz = relu_nnz - dropped
        thresh = None
        if method == "soft_threshold":
            thresh = _third_largest_of_4(*groups.unbind(dim)).unsqueeze(dim)
        r = _keep_top2_(groups, dim, by_magnitude=False).view(t, f)
        if compiling:
            y2s = r * r
        else:
            y2s = torch.mul(r, r, out=y1.new_empty(t, f) if y2s_out is None else y2s_out)
        if thresh is not None:
            # Dropped members are 0 and kept ones >= t²: clamp(y·M - t², 0) == M ⊙ (y - t²).
            # Inf - Inf (an infinite threshold) stays +inf: y2s is never NaN.
            if compiling:
                y2s = _nan_to_inf((y2s.view(groups.shape) - thresh * thresh).clamp(min=0).view(t, f))
            else:
                y2s.view(groups.shape).sub_(thresh * thresh).clamp_(min=0)
                y2s.nan_to_num_(nan=math.inf, posinf=math.inf)
        # g = D ⊙ 2·relu(y1) with D = M (r is masked)
        if compiling:
            g = r * 2.0
            y2s = y2s if y2s_out is None else y2s_out.copy_(y2s)
            g = g if g_out is None else g_out.copy_(g)
        else:
            g = torch.mul(r, 2.0, out=y1.new_empty(t, f) if g_out is None else g_out)
    if want_feature_counts:
        feature_counts = _col_nonzero_counts(y2s != 0)  # the dense-feature ranking's input
    return y2s, g, relu_nnz, kept_nnz, feature_counts


def _members(t: Tensor, layout: str) -> tuple[Tensor, ...]:
    """The four member views of a (T, F) tensor's 2:4 groups: feature groups in the
    ``planar`` order (four T × F/4 column blocks) or token groups (``tokens``: rows 4i + m)."""
    rows, cols = t.shape
    if layout == "planar":
        return t.view(rows, 4, cols // 4).unbind(1)
    return t.view(rows // 4, 4, cols).unbind(1)


def _planar_forward_by_members(r, method, count, want_feature_counts, y2s_out, g_out, y2s_members, g_members):
    """Compiled forward stage (naive / soft_threshold) on the planar layout, written
    member by member.

    Each output member is its own ``copy_`` into a member view that is an *input* of the
    compiled function, so inductor emits one loop over (T, F/4) that reads the four
    members once and stores all eight results. Stacking the members, or taking the views
    inside the function, makes it realise the result in a temporary first (measured 3-5x
    slower on CPU). (The interleaved layout of the cuSPARSELt path keeps the stacked form:
    its member views are 4 elements apart, and on CPU writing them one by one was slower
    than the stack; unmeasured on a GPU.)
    """
    members = _members(r, "planar")
    wins = _win_counts(*members)
    thresh = _third_largest_of_4(*members) if method == "soft_threshold" else None
    feature_counts = []
    for m, w, y_out, g_dst in zip(members, wins, y2s_members, g_members):
        kept = torch.where(w >= 2, m, 0.0)
        y2s = kept * kept
        if thresh is not None:
            # As in the eager stage: M ⊙ (y - t²) with Inf - Inf kept at +inf.
            y2s = _nan_to_inf((y2s - thresh * thresh).clamp(min=0))
        y_out.copy_(y2s)
        g_dst.copy_(kept * 2.0)
        if want_feature_counts:
            feature_counts.append((y2s != 0).sum(0, dtype=torch.int32))
    relu_nnz = kept_nnz = None
    if count:
        relu_nnz, dropped = _group_nonzero_counts(members)
        kept_nnz = relu_nnz - dropped
    # Per-member column counts, concatenated: the planar feature order.
    fc = torch.cat(feature_counts).to(torch.int64) if want_feature_counts else None
    return y2s_out, g_out, relu_nnz, kept_nnz, fc


def _token_sparse_operand(
    z: Tensor, nonneg: bool, own: bool, idx: "_FeatureSplit", out: Optional[Tensor] = None, out_members=None
):
    """Token-wise 2:4 of a (T, F) tensor as the weight-gradient GEMM wants it.

    Per feature, each group of 4 consecutive tokens keeps its 2 largest |values| (NaN
    highest); a last partial group is zero-padded. The densest features stay whole.
    ``idx.gathered`` (cuSPARSELt): returns the sparse features only, written as
    (F_s + pad) × T row-major (2:4 along rows, zero rows up to the kernel's alignment),
    plus the dense features gathered (T × n_dense). Otherwise (plain GEMMs): one T × F
    operand with the dense features kept whole, which costs a CPU GEMM less than an
    odd-width gathered one. ``own``: ``z`` may be overwritten (eager); ``out``: where a
    plain operand that is not made in place goes, ``out_members``: its token-member views
    (written by the compiled stage, see :func:`_planar_forward_by_members`).
    """
    by_magnitude = not nonneg  # y2s holds no NaN (see _forward_stage); dy1 ranks NaN highest
    if idx.gathered:
        dense = z.index_select(1, idx.dense) if idx.dense is not None else None
        return _gathered_token_operand(z, idx, by_magnitude), dense
    t, fs = z.shape
    tail = -t % 4
    if torch.compiler.is_compiling() and out_members is not None and not tail:
        # Member by member into views of ``out``: one fused loop (see _planar_forward_by_members).
        members = _members(z, "tokens")
        keys = members if nonneg else [_rank_keys(m.abs()) for m in members]
        wins = _win_counts(*keys)
        for m, w, dst in zip(members, wins, out_members):
            kept = torch.where(w >= 2, m, 0.0)
            dst.copy_(kept if idx.dense_mask is None else torch.where(idx.dense_mask, m, kept))
        return out, None
    if torch.compiler.is_compiling():
        zs = F.pad(z, (0, 0, 0, tail)) if tail else z
        zs = _keep_top2_(zs.view(-1, 4, fs), 1, by_magnitude).view(-1, fs)[:t]
        if idx.dense_mask is not None:
            zs = torch.where(idx.dense_mask, z, zs)
        return (zs if out is None else out.copy_(zs)), None
    # Eager: selection in place; the dense columns are saved first and restored after.
    dense = z.index_select(1, idx.dense) if idx.dense is not None else None
    zs = z if own else (z.clone() if out is None else out.copy_(z))
    if tail:
        zs = F.pad(zs, (0, 0, 0, tail))
    zs = _keep_top2_(zs.view(-1, 4, fs), 1, by_magnitude).view(-1, fs)[:t]
    if dense is not None:
        zs.index_copy_(1, idx.dense, dense)
    return zs, None


def _gathered_token_operand(z: Tensor, idx: "_FeatureSplit", by_magnitude: bool) -> Tensor:
    """The sparse features of ``z`` (T×F, T a multiple of 4) gathered straight into the
    (F_s + pad) × T layout, then token-wise 2:4 along rows: the transpose is part of the
    gather, not a separate pass over the result."""
    zt = z.t()  # F × T view
    t = zt.shape[1]
    n_sparse = zt.shape[0] if idx.sparse is None else idx.sparse.shape[0]
    if torch.compiler.is_compiling():
        zs = zt if idx.sparse is None else zt.index_select(0, idx.sparse)
        if idx.pad_rows:
            zs = F.pad(zs, (0, 0, 0, idx.pad_rows))
    else:
        zs = zt.new_zeros(n_sparse + idx.pad_rows, t)
        if idx.sparse is None:
            zs[:n_sparse].copy_(zt)
        else:
            torch.index_select(zt, 0, idx.sparse, out=zs[:n_sparse])
    return _keep_top2_(zs.reshape(-1, t // 4, 4), -1, by_magnitude).view(-1, t)


class _FeatureSplit:
    """Which features the weight-gradient GEMMs treat as dense, and the operand layout.

    ``dense_mask`` (bool, F): the dense features as a mask, for compiled plain-GEMM stages
    (a broadcast select fuses into the selection loop; an index_copy would not).
    """

    def __init__(
        self,
        dense: Optional[Tensor],
        sparse: Optional[Tensor],
        pad_rows: int,
        gathered: bool,
        dense_mask: Optional[Tensor] = None,
    ):
        self.dense, self.sparse, self.pad_rows, self.gathered = dense, sparse, pad_rows, gathered
        self.dense_mask = dense_mask


def _backward_stage(
    dy2: Tensor,
    g: Tensor,
    saved_y2s: Optional[Tensor],
    need_up: bool,
    need_down: bool,
    token_sparse: bool,
    dense_idx: Optional[Tensor],
    sparse_idx: Optional[Tensor],
    pad_rows: int,
    gathered: bool,
    dense_mask: Optional[Tensor] = None,
    dy1_out: Optional[Tensor] = None,
    down_out: Optional[Tensor] = None,
    down_members: Optional[tuple[Tensor, ...]] = None,
):
    """One pass over dy2 and g (and y2s): dy1 for dx, and both weight-gradient operands.

    dy1 = D ⊙ dy2 ⊙ 2·relu(y1) = dy2 ⊙ g is 2:4 along features. On the cuSPARSELt path a
    non-finite dy2 at a dropped position must not leave NaN = Inf·0 there (the operand
    must stay 2:4), so dropped positions are zeroed explicitly; plain GEMMs take the
    product as it is (0·NaN = NaN, as a dense GEMM would propagate it).
    y2s is recomputed from g when not saved (naive): (g/2)² is bitwise the forward's y2s.
    Plain GEMMs: dy1 goes to ``dy1_out`` and the y2s operand to ``down_out`` where given
    (eager: dy1 is made in place on dy2, which the op discards).
    """
    compiling = torch.compiler.is_compiling()
    if compiling:
        dy1 = dy2 * g
        if gathered:
            dy1 = torch.where(g != 0, dy1, 0.0)
        elif dy1_out is not None:
            dy1 = dy1_out.copy_(dy1)
    else:
        dy1 = dy2.mul_(g)
        if gathered:
            _keep_nonzero_(dy1, g)
    idx = _FeatureSplit(dense_idx, sparse_idx, pad_rows, gathered, dense_mask)
    up = up_dense = down = down_dense = None
    if need_up and token_sparse and gathered:
        # (Plain GEMMs: dy1's operand is made after dx, see _up_operand_stage.)
        up, up_dense = _token_sparse_operand(dy1, False, False, idx)
    if need_down:
        own = saved_y2s is None
        if not own:
            y2s = saved_y2s
        elif compiling:
            y2s = (g * 0.5).square()
            if down_out is not None and not token_sparse:
                y2s = down_out.copy_(y2s)
        elif down_out is None:
            y2s = (g * 0.5).square_()
        else:
            y2s = torch.mul(g, 0.5, out=down_out).square_()
        if token_sparse:
            down, down_dense = _token_sparse_operand(y2s, True, own, idx, down_out, down_members)
        else:
            down = y2s
    return dy1, up, up_dense, down, down_dense


def _up_operand_stage(dy1, dense_idx, dense_mask=None, out=None, out_members=None) -> Tensor:
    """Plain-GEMM path: dy1's token-wise 2:4 operand, made once dx is done (eager: in
    place on dy1; compiled: into ``out`` through ``out_members``)."""
    idx = _FeatureSplit(dense_idx, None, 0, False, dense_mask)
    return _token_sparse_operand(dy1, False, True, idx, out, out_members)[0]


def _keep_nonzero_(t: Tensor, where: Tensor) -> Tensor:
    """Eager: ``t`` zeroed in place wherever ``where`` is 0 (bit-mask AND, NaN-safe)."""
    int_type = _INT_OF_SIZE[t.element_size()]
    bits = torch.ne(where, 0, out=torch.empty(where.shape, dtype=int_type, device=where.device)).neg_()
    t.view(int_type).bitwise_and_(bits)
    return t


# ----- CPU scratch buffers and the planar feature layout -----


class _ScratchBuffers(threading.local):
    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}


_scratch_buffers = _ScratchBuffers()


def _scratch(slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised buffer for an intermediate that never leaves the op.

    CPU only: glibc serves allocations this large with fresh mmaps, and the first-touch
    page faults cost several times the writes themselves (a new 50 MB fp32 tensor: ~16 ms
    to fault in, ~2.5 ms to write once warm, on the benchmark machine). Each slot keeps
    one buffer per thread and dtype, reused by every layer and step while the shape stays
    the same. Other devices have caching allocators: a plain empty tensor.

    Exactly the requested shape, never a view into a larger buffer: compiled stages take
    member views of these buffers as inputs, and the aliasing base inductor sees must be
    the buffer itself (a hidden larger base failed inductor's size asserts).
    """
    shape = tuple(shape)
    if like.device.type != "cpu":
        return like.new_empty(shape)
    key = (slot, like.dtype)
    buf = _scratch_buffers.buffers.get(key)
    if buf is None or tuple(buf.shape) != shape:
        _scratch_buffers.buffers.pop(key, None)  # free the old one before allocating
        buf = _scratch_buffers.buffers[key] = like.new_empty(shape)
    return buf


def release_scratch_buffers() -> None:
    """Free this thread's CPU scratch buffers (the next call of the op allocates anew).

    They hold up to four T×F intermediates and two F×d weight copies per dtype for as
    long as the thread lives; call this after training to return the memory.
    """
    _scratch_buffers.buffers.clear()


def _planar_rows(w: Tensor, out: Tensor) -> Tensor:
    """``w`` (F×n) with its rows in the planar feature order, written into ``out``: member
    k of feature group j (row 4j + k) goes to row k·F/4 + j."""
    f = w.shape[0]
    out.view(4, f // 4, -1).copy_(w.view(f // 4, 4, -1).transpose(0, 1))
    return out


def _unplanar_rows(w: Tensor) -> Tensor:
    """Inverse of :func:`_planar_rows` (a new tensor)."""
    f = w.shape[0]
    return w.view(4, f // 4, -1).transpose(0, 1).reshape(f, -1)


def _unplanar_cols(w: Tensor) -> Tensor:
    """``w`` (n×F) with planar-ordered columns back in feature order (a new tensor)."""
    n, f = w.shape
    return w.view(n, 4, f // 4).transpose(1, 2).reshape(n, f)


def _op_weights(w_up: Tensor, w_down: Tensor, planar: bool) -> tuple[Tensor, Tensor]:
    """(w_up, w_down) as the op's GEMMs use them: in the planar feature order on the
    plain-GEMM path (rows of w_up, columns of w_down; copies into scratch buffers), as
    given on the cuSPARSELt path (its 2:4 groups must be consecutive)."""
    if not planar:
        return w_up, w_down
    f, d = w_up.shape
    up = _planar_rows(w_up, _scratch("w_up", (f, d), w_up))
    # Columns permuted within each row of w_down (reads and writes stay row by row); the
    # GEMMs then see w_down in its stock (d, F) row-major layout, as the dense FFN does.
    down = _scratch("w_down", (d, f), w_down)
    down.view(d, 4, f // 4).copy_(w_down.view(d, f // 4, 4).transpose(1, 2))
    return up, down


# ----- The op: forward and backward as custom ops -----


# g's data pointer -> the GEMM path its forward took. The backward is told the path by
# setup_context (see there); under torch.compile that ran at trace time, so a switch
# flipped after compiling could disagree with the forward's runtime choice and mix
# feature orders. A live g's pointer is unique, so a recorded disagreement is real.
_forward_paths: dict[int, bool] = {}
_MAX_FORWARD_PATHS = 4096  # forwards without a backward (inference) leave entries: bounded


def _record_forward_path(g: Tensor, use_kernel: bool) -> None:
    if g.device.type == "meta":
        return
    if len(_forward_paths) >= _MAX_FORWARD_PATHS:
        _forward_paths.clear()
    _forward_paths[g.data_ptr()] = use_kernel


def _check_forward_path(g: Tensor, use_kernel: bool) -> None:
    recorded = _forward_paths.pop(g.data_ptr(), None) if g.device.type != "meta" else None
    if recorded is not None and recorded != use_kernel:
        raise RuntimeError(
            "2:4 FFN: this backward was set up for the "
            f"{'cuSPARSELt' if use_kernel else 'plain-GEMM'} path but its forward took the "
            f"{'cuSPARSELt' if recorded else 'plain-GEMM'} one; HF_SPARSE_DISABLE_2TO4_KERNEL or "
            "set_kernel_override changed after torch.compile traced the model. Call torch._dynamo.reset() "
            "after changing them."
        )


def _ffn_forward_impl(x, w_up, w_down, method, backward, n_dense, count, want_feature_counts):
    t, f = x.shape[0], w_up.shape[0]
    use_kernel = use_2to4_kernel(x, w_up, w_down)
    # Plain GEMMs work in the planar feature order (see _planar_rows): each 2:4 group's
    # members are then four contiguous planes, so the selection runs on unit-stride
    # vectors (a compiled CPU stage vectorises it; with members 4 apart it emits scalar
    # loops). The GEMMs do not care about the order; cuSPARSELt needs consecutive groups.
    planar = not use_kernel
    w_up_op, w_down_op = _op_weights(w_up, w_down, planar)
    y1 = torch.mm(x, w_up_op.t(), out=_scratch("y1", (t, f), x))
    # MVUE's uniforms are drawn here, eagerly, so compiled and eager stages keep the same members.
    u = torch.rand((t, f // 4), dtype=torch.float32, device=x.device) if method == "mvue" else None
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
    y2s, g, relu_nnz, kept_nnz, feature_counts = _run_stage(
        _forward_stage, y1, u, method, count, want_feature_counts, planar, y2s_out, g_out, *members
    )
    del y1, u
    _record_forward_path(g, use_kernel)
    y3 = sparse24_mm(y2s, w_down_op.t()) if use_kernel else torch.mm(y2s, w_down_op.t())
    if count:
        numel = torch.full_like(relu_nnz, t * f)
        stat_delta = torch.stack((numel - relu_nnz, numel, relu_nnz - kept_nnz))
    else:
        stat_delta = torch.zeros(3, dtype=torch.int64, device=x.device)
    y2s_saved = y2s if method != "naive" else y2s.new_empty(0)
    if feature_counts is None:
        feature_counts = torch.empty(0, dtype=torch.int64, device=x.device)
    # g, y2s and the feature counts stay in the op's feature order (planar on the plain
    # path): only its backward reads them.
    return y3, g, y2s_saved, feature_counts, stat_delta


def _ffn_forward_fake(x, w_up, w_down, method, backward, n_dense, count, want_feature_counts):
    t, f = x.shape[0], w_up.shape[0]
    return (
        x.new_empty(t, w_down.shape[0]),
        x.new_empty(t, f),
        x.new_empty(t, f) if method != "naive" else x.new_empty(0),
        x.new_empty(f if want_feature_counts else 0, dtype=torch.int64),
        x.new_empty(3, dtype=torch.int64),
    )


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
    dy3, x, w_up, w_down, g, y2s, feature_counts, method, backward, n_dense, need_x, need_up, need_down, use_kernel
):
    # use_kernel: the forward's decision (see _setup_context), never re-read here: it also
    # fixes the layout of g, y2s and the counts (planar on the plain-GEMM path).
    t, f = g.shape
    _check_forward_path(g, use_kernel)
    planar = not use_kernel
    w_up_op, w_down_op = _op_weights(w_up, w_down, planar)
    dy3 = dy3.contiguous()
    token_sparse = backward != "exact" and n_dense < f
    dense_idx = sparse_idx = dense_mask = None
    if token_sparse and n_dense > 0:
        # The densest features (most non-zeros in y2s) go to the dense GEMM: that is where
        # token-wise 2:4 would drop the most. Ties go to the lower feature index (ranked
        # in feature order whatever the layout, so both paths pick the same features).
        counts = _unplanar_rows(feature_counts.view(f, 1)).view(f) if planar else feature_counts
        order = torch.sort(counts, descending=True, stable=True).indices
        dense_idx = order[:n_dense]
        if planar:
            dense_idx = (dense_idx % 4) * (f // 4) + dense_idx // 4  # feature 4j+k -> k·F/4 + j
            dense_mask = torch.zeros(f, dtype=torch.bool, device=g.device).index_fill_(0, dense_idx, True)
        elif use_kernel:
            sparse_idx = order[n_dense:].sort().values  # ascending: contiguous reads in the gather
    n_sparse = f - n_dense if token_sparse else f
    pad_rows = sparse24_padded_rows(n_sparse) - n_sparse if (token_sparse and use_kernel) else 0
    # Outputs not asked for are distinct empty tensors (custom-op outputs may not alias).
    dx, dw_up, dw_down = x.new_empty(0), x.new_empty(0), x.new_empty(0)

    dy2 = torch.mm(dy3, w_down_op, out=_scratch("y1", (t, f), dy3))
    scratch = (None, None, None)
    if not use_kernel:
        down_out = _scratch("down", (t, f), dy3)
        scratch = (_scratch("y2s", (t, f), dy3), down_out, _members(down_out, "tokens") if t % 4 == 0 else None)
    dy1, up, up_dense, down, down_dense = _run_stage(
        _backward_stage,
        dy2, g, y2s if method != "naive" else None, need_up, need_down, token_sparse,
        dense_idx, sparse_idx, pad_rows, use_kernel, dense_mask, *scratch,
    )  # fmt: skip
    del dy2
    idx = _FeatureSplit(dense_idx, sparse_idx, pad_rows, use_kernel)
    mm = sparse24_mm if use_kernel else torch.mm
    if need_x:
        dx = mm(dy1, w_up_op)
    if need_up:
        if not token_sparse:
            dw_up = torch.mm(dy1.t(), x)
        elif use_kernel:
            dense = torch.mm(up_dense.t(), x) if up_dense is not None else None
            dw_up = _assemble(sparse24_mm(up, x)[:n_sparse], dense, idx, 0)
        else:
            up_out = _scratch("up", (t, f), dy1)
            members = _members(up_out, "tokens") if t % 4 == 0 else None
            operand = _run_stage(_up_operand_stage, dy1, dense_idx, dense_mask, up_out, members)
            dw_up = torch.mm(operand.t(), x)
        if planar:
            dw_up = _unplanar_rows(dw_up)
    del dy1, up, up_dense
    if need_down:
        if use_kernel and token_sparse:
            dense = torch.mm(dy3.t(), down_dense) if down_dense is not None else None
            part = sparse24_mm(down, dy3, transpose_result=True)[:, :n_sparse]
            dw_down = _assemble(part, dense, idx, 1)
        else:
            dw_down = torch.mm(dy3.t(), down)
            if planar:
                dw_down = _unplanar_cols(dw_down)
    return dx, dw_up, dw_down


def _ffn_backward_fake(
    dy3, x, w_up, w_down, g, y2s, feature_counts, method, backward, n_dense, need_x, need_up, need_down, use_kernel
):
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(w_up) if need_up else x.new_empty(0),
        torch.empty_like(w_down) if need_down else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, w_up, w_down, method, backward, n_dense, _count, _want = inputs
    _y3, g, y2s, feature_counts, stat_delta = output
    ctx.save_for_backward(x, w_up, w_down, g, y2s, feature_counts)
    ctx.mark_non_differentiable(g, y2s, feature_counts, stat_delta)
    # Those outputs never get gradients: no T×F zero tensors for them in backward.
    ctx.set_materialize_grads(False)
    ctx.method, ctx.backward_mode, ctx.n_dense = method, backward, n_dense
    # The forward just decided this from the same tensors and switches (run right after
    # it, or at trace time under torch.compile): the backward must follow it even if a
    # switch (HF_SPARSE_DISABLE_2TO4_KERNEL, set_kernel_override) changes in between,
    # because the decision also fixes the feature order of g, y2s and the counts.
    ctx.use_kernel = use_2to4_kernel(x, w_up, w_down)


def _ffn_backward(ctx, dy3, *_unused_grads):
    x, w_up, w_down, g, y2s, feature_counts = ctx.saved_tensors
    need_x, need_up, need_down = ctx.needs_input_grad[:3]
    grads = [None] * 8
    if dy3 is not None and (need_x or need_up or need_down):
        dx, dw_up, dw_down = torch.ops.hf_sparse.relu2_2to4_ffn_bwd(
            dy3, x, w_up, w_down, g, y2s, feature_counts,
            ctx.method, ctx.backward_mode, ctx.n_dense, need_x, need_up, need_down, ctx.use_kernel,
        )  # fmt: skip
        grads[:3] = (dx if need_x else None, dw_up if need_up else None, dw_down if need_down else None)
    return tuple(grads)


def _register_ops() -> None:
    # Remote code may load a second copy of this file under another module name in the
    # same process; the first registration wins (the code is the same).
    if hasattr(torch.ops.hf_sparse, "relu2_2to4_ffn_fwd"):
        return
    fwd_schema = (
        "(Tensor x, Tensor w_up, Tensor w_down, str method, str backward, int n_dense, bool count, "
        "bool want_feature_counts) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    )
    fwd = torch.library.custom_op("hf_sparse::relu2_2to4_ffn_fwd", _ffn_forward_impl, mutates_args=(), schema=fwd_schema)
    fwd.register_fake(_ffn_forward_fake)
    bwd_schema = (
        "(Tensor dy3, Tensor x, Tensor w_up, Tensor w_down, Tensor g, Tensor y2s, Tensor feature_counts, "
        "str method, str backward, int n_dense, bool need_x, bool need_up, bool need_down, bool use_kernel) "
        "-> (Tensor, Tensor, Tensor)"
    )
    bwd = torch.library.custom_op("hf_sparse::relu2_2to4_ffn_bwd", _ffn_backward_impl, mutates_args=(), schema=bwd_schema)
    bwd.register_fake(_ffn_backward_fake)
    fwd.register_autograd(_ffn_backward, setup_context=_setup_context)


_register_ops()


# ----- Tensor parallelism (weights arriving as DTensors, e.g. from tp_plan="auto") -----
# Megatron's two conjugate collectives; the modeling file's low-rank TP styles use them too.


class _SumForward(torch.autograd.Function):
    """All-reduce (sum) across `group` in forward, identity in backward: joins the partial
    results of a row-parallel product (every rank then holds the same replicated output,
    whose gradient is already the full one on every rank)."""

    @staticmethod
    def forward(ctx, t, group):
        # A copy: the input must not change under autograd's feet.
        out = t.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumBackward(torch.autograd.Function):
    """Identity in forward, all-reduce (sum) of the gradient in backward: for a replicated
    tensor consumed by rank-local (column-parallel) products, whose gradient each rank only
    holds a part of."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def tp_sum_forward(t: Tensor, group) -> Tensor:
    """Sum `t` across the ranks of `group` (gradient passes through unchanged)."""
    return _SumForward.apply(t, group)


def tp_sum_backward(t: Tensor, group) -> Tensor:
    """`t` unchanged; its gradient is summed across the ranks of `group`."""
    return _SumBackward.apply(t, group) if torch.is_grad_enabled() and t.requires_grad else t


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def _tensor_parallel_slices(w_up: Tensor, w_down: Tensor):
    """(local w_up, local w_down, process group) of a column-parallel `w_up` (Shard(0)) and a
    row-parallel `w_down` (Shard(1)) on one 1-D mesh: this rank's F-slice of the FFN."""
    if not (_is_dtensor(w_up) and _is_dtensor(w_down)):
        raise ValueError(
            "tensor parallel 2:4 FFN: w_up and w_down must both be DTensors (column-parallel up, row-parallel "
            f"down), got {type(w_up).__name__} and {type(w_down).__name__}"
        )
    mesh = w_up.device_mesh

    def sharded_on(w, dim):
        return len(w.placements) == 1 and w.placements[0].is_shard() and w.placements[0].dim % w.dim() == dim

    if mesh.ndim != 1 or w_down.device_mesh != mesh or not (sharded_on(w_up, 0) and sharded_on(w_down, 1)):
        raise ValueError(
            "tensor parallel 2:4 FFN: needs w_up sharded on the FFN width (Shard(0), 'colwise') and w_down on it "
            f"too (Shard(1), 'rowwise') over one 1-D mesh; got {tuple(w_up.placements)} and "
            f"{tuple(w_down.placements)} on meshes of {mesh.ndim} and {w_down.device_mesh.ndim} dims"
        )
    # Shards are torch.chunk slices of ceil(F / n) features: a multiple of 4 keeps every
    # 2:4 group on one rank. Decided from global sizes, so all ranks agree (none hangs).
    f, n = w_up.shape[0], mesh.size()
    if math.ceil(f / n) % 4:
        raise ValueError(
            f"tensor parallel 2:4 FFN: each rank's slice of the FFN width must be a multiple of 4 so that no 2:4 "
            f"group straddles two ranks; width {f} over {n} ranks gives {math.ceil(f / n)}. Use a width that is "
            f"a multiple of {4 * n}."
        )
    return w_up.to_local(), w_down.to_local(), mesh.get_group()


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

    Computes in the input dtype (under autocast: the autocast dtype, like F.linear).
    Traceable by ``torch.compile(fullgraph=True)``: the work is two custom ops.

    Tensor parallel: with ``w_up`` a column-parallel DTensor (Shard(0)) and ``w_down`` a
    row-parallel one (Shard(1)), as ``tp_plan="auto"`` leaves them, and ``x`` replicated,
    each rank runs the op on its F-slice and the partial outputs are summed across ranks,
    as for the dense MLP; ``x``'s gradient is summed in backward, the weights' gradients
    are their local shards. The result equals the single-process op wherever the recipe
    is split-invariant: the forward (2:4 groups lie along F and stay on one rank) and the
    ``exact`` and ``naive`` backwards; ``split_gemm`` picks its dense features per rank,
    ``mvue`` draws per rank. ``stats`` then counts this rank's features only.
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
    tp_group = None
    if _is_dtensor(w_up) or _is_dtensor(w_down):
        w_up, w_down, tp_group = _tensor_parallel_slices(w_up, w_down)
        # Replicated x meets this rank's F-slice only: its gradient is summed across ranks.
        x = tp_sum_backward(x, tp_group)
    if w_up.dim() != 2 or w_down.dim() != 2:
        raise ValueError("w_up and w_down must be 2-D (F×d and d×F)")
    f, d = w_up.shape
    if x.shape[-1] != d or w_down.shape[1] != f:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}"
        )
    if f % 4:
        raise ValueError(f"the FFN width F must be a multiple of 4, got {f}")
    if stats is not None:
        _check_stats(stats)

    cast = _autocast_dtype(x.device.type)
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
        x2 = _GatherRows.apply(x2, permutation, inverse)

    # Round before ceil so that e.g. 0.05 * F landing a hair above an integer does not
    # add a feature.
    n_dense = min(f, math.ceil(round(dense_features * f, 6))) if backward == "split_gemm" else 0
    weights_need_grad = torch.is_grad_enabled() and (w_up.requires_grad or w_down.requires_grad)
    # Per-feature counts only feed the dense-feature ranking of a split backward.
    want_feature_counts = weights_need_grad and 0 < n_dense < f
    # Inputs are already in the autocast dtype; autocast must not recast inside the op.
    ctx = torch.autocast(x2.device.type, enabled=False) if cast is not None else contextlib.nullcontext()
    with ctx:
        y, _g, _y2s, _counts, stat_delta = torch.ops.hf_sparse.relu2_2to4_ffn_fwd(
            x2, w_up.contiguous(), w_down.contiguous(), method, backward, n_dense, stats is not None, want_feature_counts
        )
    if stats is not None:
        with torch.no_grad():
            stats[:3].add_(stat_delta)
    if tp_group is not None:
        # Partial sums of the row-parallel down projection (what RowwiseParallel reduces).
        y = tp_sum_forward(y, tp_group)
    if permutation is not None:
        y = _GatherRows.apply(y, inverse, permutation)  # row perm[i] of the result is row i of y
    return y.view(*lead, y.shape[-1])


class _GatherRows(torch.autograd.Function):
    """``t[index]`` along dim 0 for a permutation ``index`` whose inverse is ``inverse``:
    the gradient is gathered back with the inverse (no scatter-add)."""

    @staticmethod
    def forward(ctx, t, index, inverse):
        ctx.save_for_backward(inverse)
        return t.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def relu2_ffn_reference(x: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Plain dense ReLU² FFN with autograd (the baseline)."""
    return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w_up)).square(), w_down)


# ----- Token permutation (paper's optimisation 2) -----

_MASK31 = (1 << 31) - 1
# Odd multipliers below 2**30: a 31-bit value times one stays below 2**61 (no int64
# overflow on any device or compiler).
_HASH_MULTIPLIERS = (0x2C1B3C6D, 0x297A2D39, 0x3B4F9E25)


def make_token_permutation(num_tokens: int, seed: int, device=None) -> Tensor:
    """Deterministic pseudo-random permutation of ``num_tokens`` from ``seed``.

    The argsort of an integer hash of (token index, seed): pure tensor ops, so it is the
    same on every device, traceable by torch.compile (no torch.Generator), and leaves the
    global RNG stream untouched. Hash ties are broken by index (stable sort).
    """
    seed_key = (int(seed) * 0x9E3779B1 + 0x7F4A7C15) & _MASK31  # spread small seeds apart
    h = (torch.arange(int(num_tokens), dtype=torch.int64, device=device) ^ seed_key) & _MASK31
    for mult in _HASH_MULTIPLIERS:
        h = ((h ^ (h >> 15)) * mult) & _MASK31
    return torch.argsort(h ^ (h >> 13), stable=True)


class TokenPermutation:
    """Per-(T, device) cache of :func:`make_token_permutation` for one seed.

    A model holds one per module; the cache avoids regenerating and re-uploading the
    permutation every step. Only a few token counts occur in practice (train, eval, the
    last partial batch); the cache is cleared past ``max_entries`` to stay bounded.
    """

    def __init__(self, seed: int, max_entries: int = 8):
        self.seed = int(seed)
        self.max_entries = max_entries
        self._cache: dict[tuple[int, torch.device], Tensor] = {}

    def __call__(self, num_tokens: int, device) -> Tensor:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        key = (int(num_tokens), dev)
        perm = self._cache.get(key)
        if perm is None:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            perm = make_token_permutation(num_tokens, self.seed, dev)
            self._cache[key] = perm
        return perm

    def __repr__(self) -> str:
        return f"TokenPermutation(seed={self.seed})"
