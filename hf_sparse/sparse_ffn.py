"""2:4 activation-sparse Squared-ReLU FFN (Haziza et al. 2025, arXiv 2503.16672).

One semantics, two implementations: the reference path below (plain torch ops, any
device/dtype, float64 included) and, on CUDA sm80+ with bf16/fp16 and aligned shapes,
real 2:4 sparse GEMMs through cuSPARSELt (see ``kernels.py``). The mask construction and
every elementwise step are shared, so both paths differ only by GEMM rounding.

Forward, for x (T×d), w_up (F×d), w_down (d×F)::

    y1 = x w_upᵀ;  y2 = relu(y1)²;  y2s = sparsify_2to4(y2);  y3 = y2s w_downᵀ

Backward (D = ∂y2s/∂y2 with mask and scale held constant)::

    dy1 = (D ⊙ dy3 w_down) ⊙ 2 relu(y1);  dx = dy1 w_up            (exact in every mode)
    dW_down = dy3ᵀ y2s';  dW_up = dy1'ᵀ x

where ``'`` is the identity for ``backward="exact"`` and a token-wise 2:4 sparsification
(groups of 4 consecutive rows, keep the 2 largest magnitudes) for ``"naive"``; for
``"split_gemm"`` the densest ``ceil(dense_features·F)`` features stay dense.

This file is shipped as HF remote code: it imports only torch and same-folder modules.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional

import torch
from torch import Tensor

from .kernels import sparse24_mm, use_2to4_kernel

logger = logging.getLogger(__name__)

SPARSE_METHODS = ("naive", "mvue", "soft_threshold")
BACKWARD_MODES = ("split_gemm", "naive", "exact")

__all__ = [
    "SPARSE_METHODS",
    "BACKWARD_MODES",
    "sparsify_2to4",
    "relu2_2to4_ffn",
    "relu2_ffn_reference",
    "count_2to4_stats",
    "make_token_permutation",
    "TokenPermutation",
]


# ----- Selection rules -----
# They work on the four members (a, b, c, d) of every group as separate strided views:
# each op touches a quarter of the data and allocates only quarter-sized temporaries. On
# CPU a topk-based mask made the FFN ~2.3x slower than dense, fresh full-size allocations
# cost more than the arithmetic, and ops mixing bool and float operands take a slow path.
# Hence: duels as bool, win counts in uint8, masks applied as float multiplies in place.


def count_nonzero(t: Tensor) -> Tensor:
    """Exact non-zero count of ``t`` as a 0-d int64 device tensor (no host sync).

    On CPU `torch.count_nonzero` of a float tensor is ~8x slower than casting to bool and
    summing rows in int32 (exact while a row has < 2**31 elements); telemetry counts every
    training forward, so this sits on the hot path.
    """
    return t.bool().sum(-1, dtype=torch.int32).sum()


def _u8(t: Tensor) -> Tensor:
    return t.view(torch.uint8)


def _win_counts(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> tuple[Tensor, ...]:
    """uint8 number of duels each of (a, b, c, d) wins; ties go to the lower index.

    i beats j (i < j) iff v_i >= v_j. That is a total order, so the counts are exactly
    3, 2, 1, 0 in some order: "wins >= 2" keeps exactly the two largest.
    """
    w01, w02, w03 = _u8(a >= b), _u8(a >= c), _u8(a >= d)
    w12, w13, w23 = _u8(b >= c), _u8(b >= d), _u8(c >= d)
    # The constant goes in first so that nothing wraps below zero in uint8.
    return (
        w01 + w02 + w03,
        (w12 + w13).add_(1).sub_(w01),
        (w23 + 2).sub_(w02).sub_(w12),
        torch.rsub(w03 + w13 + w23, 3),
    )


def _top2_of_4(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> list[Tensor]:
    """Bool keep flags of the 2 largest of (a, b, c, d), ties to the lower index."""
    return [s >= 2 for s in _win_counts(a, b, c, d)]


def _top2_of_4_float(a: Tensor, b: Tensor, c: Tensor, d: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """Keep flags as 0/1 in ``dtype``, ready to multiply with (compare and cast in one op)."""
    return [torch.ge(s, 2, out=torch.empty(s.shape, dtype=dtype, device=s.device)) for s in _win_counts(a, b, c, d)]


def _third_largest_of_4(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Second smallest of four values with min/max only (the S-STE threshold)."""
    lo = torch.maximum(torch.minimum(a, b), torch.minimum(c, d))
    hi = torch.minimum(torch.maximum(a, b), torch.maximum(c, d))
    return torch.minimum(lo, hi)


def _mvue_select(mag: Tensor) -> Tensor:
    """Unbiased minimum-variance 2:4 draw (Chmiel et al.) on a (..., 4) magnitude view.

    Keep probabilities p_i ∝ |v_i| with sum(p) = min(2, nnz), capped at 1 (the capped
    member is kept surely, the other mass is spread over the rest). Members are drawn by
    systematic sampling: with u ~ U[0, 1), member i is kept iff its interval
    [c_{i-1}, c_i) of the cumulative p contains u or u + 1, i.e. iff
    ceil(c_i - u) - ceil(c_{i-1} - u) = 1. Each p_i <= 1, so each member is kept with
    probability p_i and at most 2 are kept.

    Returns D = 1/p on kept members, 0 elsewhere, shaped like ``mag``, in float32
    (float64 for float64 input).
    """
    cdtype = torch.float64 if mag.dtype == torch.float64 else torch.float32
    tiny = torch.finfo(cdtype).tiny
    m = mag.to(cdtype)
    # Normalise by the group max: sums of large bf16/fp32 values could overflow.
    n = m / m.amax(-1, keepdim=True).clamp_min(tiny)
    s = n.sum(-1, keepdim=True)
    # The normalised max is exactly 1; it exceeds half the sum iff s < 2 ("capped"): then
    # it is unique, kept surely, and the others share 1 in proportion. Their sum is taken
    # directly (not as s - 1) and p divided rather than multiplied by a reciprocal, so a
    # group that is already 2:4 gets p = 1 exactly and passes through losslessly.
    rest = torch.where(n == 1.0, 0.0, n).sum(-1, keepdim=True)
    denom = torch.where(s < 2.0, rest, s * 0.5).clamp_min(tiny)
    p = (n / denom).clamp_(max=1.0)  # the capped max comes out > 1 and is clamped to 1
    # The clamp keeps rounding from pushing the total past 2 (a third point).
    c = p.cumsum(-1).clamp_(max=2.0)
    # Always drawn in float32 so a given seed selects the same members in every dtype.
    u = torch.rand(m.shape[:-1] + (1,), dtype=torch.float32, device=m.device).to(cdtype)
    keep = (c - u).ceil_()  # ceil(c_0 - u) = 0 for the implicit c_0 = 0
    for i in (3, 2, 1):  # in-place first differences, right to left (no cat/diff copy)
        keep[..., i] -= keep[..., i - 1]
    return keep.clamp_(max=1.0).div_(p.clamp_min(tiny))


def _inv_p_to(inv_p: Tensor, dtype: torch.dtype) -> Tensor:
    # A tiny kept p would give 1/p = inf in a narrow dtype; clamp to the largest finite.
    return inv_p.clamp(max=torch.finfo(dtype).max).to(dtype)


def _select_generic(v: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """(sparse values, D) for a (R, G, 4) view of any sign (public, not the FFN hot path)."""
    mag = v.abs()
    a, b, c, d = mag.unbind(-1)
    if method == "mvue":
        inv_p = _mvue_select(mag)
        # Values from float32/64 (v/p is bounded by the group sum; 1/p alone may not be).
        return (v.to(inv_p.dtype) * inv_p).to(v.dtype), _inv_p_to(inv_p, v.dtype)
    # Excluding zeros makes M == "kept non-zeros": a group with < 2 non-zeros keeps
    # exactly its non-zeros (and D is 0 on the zeros it could have kept).
    keep = torch.stack(_top2_of_4(a, b, c, d), dim=-1) & (mag != 0)
    dmat = keep.to(v.dtype)
    if method == "naive":
        return v * dmat, dmat
    thresh = _third_largest_of_4(a, b, c, d).unsqueeze(-1)
    return (mag - thresh).clamp_(min=0).mul_(dmat).mul_(v.sign()), dmat


def _check_method(method: str) -> None:
    if method not in SPARSE_METHODS:
        raise ValueError(f"method must be one of {SPARSE_METHODS}, got {method!r}")


def sparsify_2to4(y: Tensor, method: str = "naive", dim: int = -1) -> tuple[Tensor, Tensor]:
    """2:4-sparsify ``y`` along ``dim`` (groups of 4 consecutive elements keep <= 2).

    Returns ``(y_sparse, D)`` where ``D = ∂y_sparse/∂y`` with the mask and scale held
    constant (the mask for naive/soft_threshold, mask/p for mvue), in ``y``'s dtype.
    Values of any sign are ranked by magnitude. Not differentiable itself: it is the
    selection rule that :func:`relu2_2to4_ffn` applies.
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
        v = y2.detach().reshape(-1, n // 4, 4)
        nnz_g = sum(_u8(m != 0) for m in v.unbind(-1))  # uint8 non-zeros per group
        # max(nnz_g - 2, 0) = (nnz_g >= 3) + (nnz_g == 4), without uint8 wrap-around
        dropped = count_nonzero(nnz_g > 2) + count_nonzero(nnz_g == 4)
        # Total non-zeros from the group counts: a pass over F/4 values instead of F.
        _add_stats(stats, y2.numel(), nnz_g.sum(-1, dtype=torch.int32).sum(), dropped)


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


# ----- Token-wise 2:4 (backward weight gradients) -----


def _token_groups_(v: Tensor, nonneg: bool) -> None:
    """In place on a (T/4, 4, F) view: keep the top-2 |values| of each row group per column."""
    members = v.unbind(1)  # each (T/4, F) with contiguous rows
    mags = members if nonneg else [m.abs() for m in members]
    for member, keep in zip(members, _top2_of_4_float(*mags, dtype=v.dtype)):
        member.mul_(keep)


def _token_sparsify_(z: Tensor, nonneg: bool, dense_idx: Optional[Tensor] = None) -> Tensor:
    """Token-wise 2:4 of a contiguous (T, F) tensor, in place; returns ``z``.

    Columns in ``dense_idx`` are left whole: the split GEMM's dense part folded into the
    same operand (saved and written back: cheaper than masking them out of the flags).
    T not divisible by 4: the last partial group is padded with zero rows (on a small
    copy), so it keeps its 2 largest rows.
    """
    t, f = z.shape
    dense = z.index_select(1, dense_idx) if dense_idx is not None else None
    t4 = t - t % 4
    if t4:
        _token_groups_(z[:t4].view(t4 // 4, 4, f), nonneg)
    if t4 < t:
        tail = torch.cat((z[t4:], z.new_zeros(4 - (t - t4), f)))
        _token_groups_(tail.view(1, 4, f), nonneg)
        z[t4:] = tail[: t - t4]
    if dense is not None:
        z.index_copy_(1, dense_idx, dense)
    return z


def _col_nonzero_counts(nz_mask: Tensor) -> Tensor:
    """True entries per column of a (T, F) bool tensor, int64."""
    nz = _u8(nz_mask)
    t = nz.shape[0]
    # Two-level reduction with int16 partials (chunk <= 128 rows cannot overflow): far
    # cheaper on CPU than a dim-0 reduction accumulating in int64.
    chunk = math.gcd(t, 128)
    if chunk > 1:
        return nz.view(t // chunk, chunk, -1).sum(1, dtype=torch.int16).sum(0, dtype=torch.int64)
    return nz.sum(0, dtype=torch.int64)


def _dense_feature_index(counts: Tensor, n_dense: int) -> Tensor:
    """Indices of the ``n_dense`` features with the MOST non-zeros (ties: lower index).

    The research code ranked ascending and kept the sparsest features dense; the dense
    GEMM is meant for the features where token-wise 2:4 would drop the most.
    """
    return torch.sort(counts, descending=True, stable=True).indices[:n_dense]


# ----- The op -----


class _Relu2Sparse24FFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_up, w_down, method, backward, n_dense, stats, use_kernel):
        t, f = x.shape[0], w_up.shape[0]
        dtype = x.dtype
        y1 = torch.mm(x, w_up.t())
        r = y1.clamp_(min=0)  # relu in place: y1 itself is never needed again
        count = stats is not None
        nnz = count_nonzero(r) if count else None  # zeros of y2 = zeros of relu(y1)
        if method == "mvue":
            y2 = r * r
            inv_p = _mvue_select(y2.view(t, f // 4, 4))
            inv_p = inv_p.view(t, f)
            y2s = y2.mul_(inv_p) if inv_p.dtype == dtype else (y2.to(inv_p.dtype) * inv_p).to(dtype)
            r.mul_(_inv_p_to(inv_p, dtype))
        else:
            # Rank on relu(y1) instead of y2 = relu(y1)²: same order (squaring is monotone
            # on r >= 0), and the mask then lands on r before squaring, so y2 is never
            # materialised unmasked. Only two r whose squares round to the same y2 are
            # ranked by r rather than by index; the kept values are the same either way.
            rv = r.view(t, f // 4, 4)
            members = rv.unbind(-1)
            thresh = _third_largest_of_4(*members) if method == "soft_threshold" else None
            for member, keep in zip(members, _top2_of_4_float(*members, dtype=dtype)):
                member.mul_(keep)
            y2s = r * r
        token_sparse = backward != "exact" and n_dense < f and ctx.needs_input_grad[1:3] != (False, False)
        want_counts = token_sparse and n_dense > 0
        kept = counts = None
        if method == "soft_threshold":
            # The stats count what the mask drops, so count before the shift (which also
            # zeroes kept members tied with the threshold).
            kept = count_nonzero(y2s) if count else None
            # Dropped members are 0 and kept ones >= t: clamp(y·M - t, 0) == M ⊙ (y - t).
            y2s.view(t, f // 4, 4).sub_(thresh.square_().unsqueeze(-1)).clamp_(min=0)
        if (count and kept is None) or want_counts:
            nz = y2s != 0  # one bool pass shared by the stats and the dense-feature ranking
            if count and kept is None:
                kept = count_nonzero(nz)
            # per-feature non-zeros: the F integers backward's dense ranking needs
            counts = _col_nonzero_counts(nz) if want_counts else None
        # g = D ⊙ 2·relu(y1): the whole elementwise backward factor in one tensor (2:4
        # sparse along features), so neither y1 nor the mask has to be saved.
        g = r.mul_(2.0)
        y3 = sparse24_mm(y2s, w_down.t()) if use_kernel else torch.mm(y2s, w_down.t())

        if count:
            with torch.no_grad():
                _add_stats(stats, t * f, nnz, nnz - kept)

        # Memory: g always; for naive y2s is recomputed as (g/2)² in backward, which is
        # bitwise identical (g/2 = relu(y1)·M exactly, squared like y2 = r·r), so the
        # naive op keeps ONE T×F activation where the dense autograd FFN keeps two.
        # soft_threshold (shifted values) and mvue (1/p scaling) keep y2s as well.
        keep_y2s = method != "naive"
        ctx.save_for_backward(x, w_up, w_down, g, y2s if keep_y2s else None, counts)
        ctx.keep_y2s = keep_y2s
        ctx.token_sparse = token_sparse
        ctx.n_dense = n_dense
        ctx.use_kernel = use_kernel
        return y3

    @staticmethod
    def backward(ctx, dy3):
        x, w_up, w_down, g, y2s, counts = ctx.saved_tensors
        need_x, need_up, need_down = ctx.needs_input_grad[:3]
        dx = dw_up = dw_down = None
        if not (need_x or need_up or need_down):
            return None, None, None, None, None, None, None, None
        use_kernel = ctx.use_kernel
        dy3 = dy3.contiguous()
        dy1 = torch.mm(dy3, w_down).mul_(g)  # dropped values never reappear: D is 0 there
        if need_x:
            dx = sparse24_mm(dy1, w_up) if use_kernel else torch.mm(dy1, w_up)

        dense_idx = None
        if ctx.token_sparse and counts is not None:
            dense_idx = _dense_feature_index(counts, ctx.n_dense)

        if need_down:
            # Our own copy of y2s when it will be modified (saved tensors stay intact, so
            # a retain_graph second backward still sees the right values).
            if ctx.keep_y2s:
                s, own = y2s, False
            else:
                s, own = g.mul(0.5).square_(), True  # == y2s bitwise (see forward)
            if not ctx.token_sparse:
                dw_down = torch.mm(dy3.t(), s)
            elif use_kernel:
                dw_down = _kernel_weight_grad(s, dy3, dense_idx, nonneg=True, features_first=False, own=own)
            else:
                s = _token_sparsify_(s if own else s.clone(), nonneg=True, dense_idx=dense_idx)
                dw_down = torch.mm(dy3.t(), s)

        if need_up:
            if not ctx.token_sparse:
                dw_up = torch.mm(dy1.t(), x)
            elif use_kernel:
                dw_up = _kernel_weight_grad(dy1, x, dense_idx, nonneg=False, features_first=True, own=True)
            else:
                # dy1 is ours and dx has been computed from it: sparsify in place.
                dw_up = torch.mm(_token_sparsify_(dy1, nonneg=False, dense_idx=dense_idx).t(), x)
        return dx, dw_up, dw_down, None, None, None, None, None


def _kernel_weight_grad(
    z: Tensor, other: Tensor, dense_idx: Optional[Tensor], nonneg: bool, features_first: bool, own: bool
) -> Tensor:
    """Weight gradient zᵀ·other (features_first) or otherᵀ·z with 2:4 sparse GEMMs.

    cuSPARSELt needs the sparse operand row-major with 2:4 along its rows, so the
    token-wise sparsified z is transposed to (F, T). The densest features go through a
    small dense GEMM and overwrite their rows/columns of the sparse result.
    """
    dense_part = None
    if dense_idx is not None:
        zd = z.index_select(1, dense_idx)
        dense_part = torch.mm(zd.t(), other) if features_first else torch.mm(other.t(), zd)
    zs = _token_sparsify_(z if own else z.clone(), nonneg).t().contiguous()
    out = sparse24_mm(zs, other, transpose_result=not features_first)
    if dense_part is not None:
        out.index_copy_(0 if features_first else 1, dense_idx, dense_part)
    return out


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
        dense_features: fraction of the densest features kept dense in ``split_gemm``.
        permutation: optional LongTensor[T]; tokens are permuted before the op and
            un-permuted after, so token-wise 2:4 groups are not neighbouring tokens. It
            must be a permutation (not checked: that would need a host sync).
        stats: optional float64/int64 1-D tensor (len >= 3) receiving, in place and in
            forward only: zeros of y2, numel of y2, non-zeros dropped by the 2:4 mask.

    Computes in the input dtype (under autocast: the autocast dtype, like F.linear).
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
        x2 = x2.index_select(0, permutation)

    # Round before ceil so that e.g. 0.05 * F landing a hair above an integer does not
    # add a feature.
    n_dense = min(f, math.ceil(round(dense_features * f, 6))) if backward == "split_gemm" else 0
    use_kernel = use_2to4_kernel(x2, w_up, w_down)
    # Inputs are already in the autocast dtype; autocast must not recast inside the op.
    ctx = torch.autocast(x2.device.type, enabled=False) if cast is not None else contextlib.nullcontext()
    with ctx:
        y = _Relu2Sparse24FFN.apply(
            x2, w_up.contiguous(), w_down.contiguous(), method, backward, n_dense, stats, use_kernel
        )
    if permutation is not None:
        y = y.new_empty(y.shape).index_copy(0, permutation, y)
    return y.view(*lead, y.shape[-1])


def relu2_ffn_reference(x: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Plain dense ReLU² FFN with autograd (the baseline)."""
    return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w_up)).square(), w_down)


# ----- Token permutation (paper's optimisation 2) -----


def make_token_permutation(num_tokens: int, seed: int, device=None) -> Tensor:
    """Deterministic permutation of ``num_tokens`` from ``seed`` (CPU generator, then moved).

    Generated on CPU so the same seed gives the same permutation on every device and
    the global RNG stream is untouched.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    perm = torch.randperm(int(num_tokens), generator=gen)
    return perm if device is None else perm.to(device)


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
