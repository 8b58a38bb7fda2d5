"""2:4 selection rules: which 2 of every 4 values a group keeps, and the counts.

Three rules (``SPARSE_METHODS``): ``naive`` keeps the 2 largest (the paper's choice),
``mvue`` draws an unbiased minimum-variance pair (Chmiel et al.), ``soft_threshold``
keeps the 2 largest shrunk by the third (S-STE). MVUE's uniforms are a hash of (key, row,
group index) (``keyed_uniforms``), one key per call from the global RNG, so a slice of the
groups (a tensor-parallel rank's) draws exactly what the whole would. NaN ranks highest
everywhere, so no group ever keeps more than 2 values. The FFN op's stages (``ffn_stages.py``) and the
2:4 weights (``weight_sparse.py``) are built from these pieces; ``sparsify_2to4`` and
``count_2to4_stats`` are the public forms.

Shipped as HF remote code: imports only torch and same-folder modules.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .token_permutation import _MASK31, hash31

SPARSE_METHODS = ("naive", "mvue", "soft_threshold")
# The N:M patterns whose would-drop the telemetry counts beside 2:4 (N kept of every M
# consecutive features). Each M is twice the one before: the counts are pair sums of the
# previous level's (see nm_would_drop).
NM_PATTERNS = ((4, 8), (8, 16))


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


def _nan_to_inf(v: Tensor) -> Tensor:
    """``v`` with NaN replaced by +inf, out of place (the ranking key of every 2:4 choice:
    NaN ranks highest). Compiled as a compare-and-select:
    CPU inductor lowers nan_to_num to a scalar isnan loop per vector."""
    if torch.compiler.is_compiling():
        return torch.where(v != v, math.inf, v)
    return torch.nan_to_num(v, nan=math.inf, posinf=math.inf, neginf=-math.inf)


def _nan_to_inf_(v: Tensor) -> Tensor:
    """In-place :func:`_nan_to_inf` for a tensor the caller owns."""
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


def _group_nonzero_flags(members: tuple[Tensor, ...]) -> Tensor:
    """Non-zeros per 4-feature group, in :func:`_flags`' dtype, shaped like one member."""
    return sum(_flags(m != 0) for m in members)


def nm_would_drop(members: tuple[Tensor, ...]) -> Tensor:
    """For each of ``NM_PATTERNS``: the non-zeros that keeping the N largest of every M
    consecutive features would drop, as an int64 tensor of ``len(NM_PATTERNS)``.

    ``members``: the four member views of the 4-feature groups, groups along the last dim
    in feature order (planar or consecutive layout alike). Keeping the N largest drops
    max(nnz - N, 0) non-zeros of a group of M (zeros rank lowest), so only the per-group
    non-zero counts are needed: an M-group's count is the sum of its M/4 4-groups', built
    level by level from pair sums. A last group with fewer than M features (F not a multiple
    of M) keeps its N largest too. No host sync.
    """
    counts = _group_nonzero_flags(members)
    if not torch.compiler.is_compiling():
        counts = counts.to(torch.int16)  # sums of up to 16 flags, and no uint8 wrap-around below
    dropped, width = [], 4
    for n, m in NM_PATTERNS:
        while width < m:
            if counts.shape[-1] % 2:  # an odd group out: pair it with an empty one
                counts = torch.nn.functional.pad(counts, (0, 1))
            counts = counts.unflatten(-1, (-1, 2)).sum(-1, dtype=counts.dtype)
            width *= 2
        dropped.append((counts - n).clamp(min=0).sum(dtype=torch.int64))
    return torch.stack(dropped)


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
    keys = (_nan_to_inf_(groups.abs()) if by_magnitude else groups).unbind(dim)
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
    keys = _nan_to_inf(groups).unbind(dim)
    return torch.stack(_top2_of_4(*keys), dim)


# ----- MVUE's random numbers -----
# Counter-based: u[r, j] is a hash of (key, row r, global group index j), not a position in
# a generator's stream, so the numbers a group gets do not depend on how many groups a call
# covers or where its slice starts (tensor parallel), nor on the device or compiler (integer
# ops only). The key is the only thing drawn from the global RNG: one number per call.
_ROW_SALT, _GROUP_SALT = 0x5BD1E995 & _MASK31, 0x68E31DA4
_CHUNK_ELEMENTS = 1 << 16  # int64 chunk + scratch: 1 MiB, about one core's L2


def mvue_key(device) -> Tensor:
    """A fresh 31-bit key for :func:`keyed_uniforms`, drawn from the global RNG on ``device``
    (a 0-d int64 tensor: no host sync, and ``torch.manual_seed`` reproduces it)."""
    return torch.randint(0, _MASK31 + 1, (), dtype=torch.int64, device=device)


def keyed_uniforms(key: Tensor, rows: int, groups: int, group_offset: int = 0) -> Tensor:
    """float32 uniforms in [0, 1) of shape (rows, groups) for groups ``group_offset ..
    group_offset + groups - 1``: a pure function of (key, row, global group index).

    Rows and groups are hashed separately (two short vectors) and the full table is one
    more hash of their XOR: ~17 integer ops per element. Compiled, they fuse into one loop;
    eager on CPU the table is made in cache-sized row chunks, in place (whole-table passes
    were ~8x slower than ``torch.rand``; chunked, about as fast). The top 24 bits make the
    float, as float32 ``torch.rand`` has.
    """
    device = key.device
    row = torch.arange(rows, dtype=torch.int64, device=device)
    group = torch.arange(group_offset, group_offset + groups, dtype=torch.int64, device=device)
    h_row = hash31((row * 0x2545F491 + (key ^ _ROW_SALT)) & _MASK31).unsqueeze(1)
    h_group = hash31((group * 0x9E3779B1 + _GROUP_SALT) & _MASK31).unsqueeze(0)
    unit = 1.0 / (1 << 24)
    if torch.compiler.is_compiling() or device.type != "cpu" or rows * groups == 0:
        return (hash31(h_row ^ h_group) >> 7).to(torch.float32) * unit
    out = torch.empty(rows, groups, dtype=torch.float32, device=device)
    step = max(1, _CHUNK_ELEMENTS // groups)
    h = torch.empty(min(step, rows), groups, dtype=torch.int64, device=device)
    scratch = torch.empty_like(h)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        chunk = torch.bitwise_xor(h_row[start : start + n], h_group, out=h[:n])
        hash31(chunk, scratch[:n]).bitwise_right_shift_(7)
        torch.mul(chunk, unit, out=out[start : start + n])
    return out


def _mvue_select(mag: Tensor, u: Tensor, dim: int = -1) -> Tensor:
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

    ``u`` (float32, shaped like ``mag`` with size 1 at ``dim``): one uniform per group, from
    :func:`keyed_uniforms` (the FFN op's stage and :func:`sparsify_2to4` both use it).

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
        # Keyed like the FFN op's draws (rows × groups), so one seed selects the same
        # members here as in the op, in every dtype.
        u = keyed_uniforms(mvue_key(v.device), v.shape[0], v.shape[1]).unsqueeze(-1)
        inv_p = _mvue_select(mag, u)
        # Values from float32/64 (v/p is bounded by the group sum; 1/p alone may not be).
        vals = torch.where(inv_p != 0, v.to(inv_p.dtype) * inv_p, 0.0).to(v.dtype)
        return vals, _inv_p_to(inv_p, v.dtype)
    # Excluding zeros makes M == "kept non-zeros": a group with < 2 non-zeros keeps
    # exactly its non-zeros (and D is 0 on the zeros it could have kept).
    keep = _group_keep(mag, -1) & (mag != 0)
    dmat = keep.to(v.dtype)
    if method == "naive":
        return torch.where(keep, v, 0.0), dmat
    thresh = _third_largest_of_4(*_nan_to_inf(mag).unbind(-1)).unsqueeze(-1)
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


def count_2to4_stats(y2: Tensor, stats: Tensor, method: str = "naive", nm_stats: Tensor | None = None) -> None:
    """Add the telemetry counts of ``y2`` (grouped along its last dim) to ``stats``.

    stats[0] += zeros of y2, stats[1] += numel, stats[2] += non-zeros a 2:4 mask would
    drop. Nothing is sparsified (dense warm-up). Every method keeps min(2, nnz) non-zeros
    per group (MVUE's probabilities sum to min(2, nnz) and systematic sampling draws
    exactly that many, up to float rounding), so the count is the same for all methods.
    ``nm_stats`` (optional, one entry per ``NM_PATTERNS``) += what each N:M pattern would
    drop (:func:`nm_would_drop`). No host sync.
    """
    _check_method(method)
    _check_stats(stats)
    n = y2.shape[-1]
    if n % 4:
        raise ValueError(f"last dim of y2 must be a multiple of 4, got {n}")
    with torch.no_grad():
        members = y2.detach().reshape(-1, n // 4, 4).unbind(-1)
        nnz, dropped = _group_nonzero_counts(members)
        _add_stats(stats, y2.numel(), nnz, dropped)
        if nm_stats is not None:
            nm_stats.add_(nm_would_drop(members))


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
