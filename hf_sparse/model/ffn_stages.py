"""The 2:4 FFN op's elementwise stages: everything between its GEMMs.

Forward: y1 -> relu -> top-2 of each feature group (NaN ranks highest) -> y2s (to the
GEMM), g = D ⊙ 2·relu(y1) (saved), telemetry counts, per-feature non-zeros. Backward:
dy1 = D ⊙ dy2 ⊙ 2·relu(y1) and both token-wise 2:4 weight-gradient operands, in one pass.
Each stage is written once in plain torch and runs eagerly or through ``torch.compile``
(``stage_compilation_enabled``: ``HF_SPARSE_COMPILE_STAGES``, ``HF_SPARSE_DISABLE_COMPILE``);
compiled and eager give the same bits. See benchmarks/ffn_traffic.py for their traffic.

Shipped as HF remote code: imports only torch and same-folder modules.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .env_knobs import env_value
from .fp8 import apply_scales, quantize_rows
from .select_2to4 import (
    _INT_OF_SIZE,
    _group_nonzero_counts,
    _inv_p_to,
    _keep_top2_,
    _mvue_select,
    _nan_to_inf,
    _third_largest_of_4,
    _u8,
    _win_counts,
    count_nonzero,
    keyed_uniforms,
    nm_would_drop,
)

logger = logging.getLogger(__name__)

DISABLE_COMPILE_ENV = "HF_SPARSE_DISABLE_COMPILE"
COMPILE_STAGES_ENV = "HF_SPARSE_COMPILE_STAGES"


def stage_compilation_enabled(device_type: str) -> bool:
    """Whether the op's elementwise stages run through ``torch.compile`` on this device.

    ``HF_SPARSE_DISABLE_COMPILE=1`` forces eager everywhere. Otherwise
    ``HF_SPARSE_COMPILE_STAGES`` decides: ``1`` always, ``0`` never, ``auto`` (default)
    on CUDA only: there the eager stages cost several memory passes each, while on CPU
    the C++ compile takes longer than a short run saves (see the README).
    """
    if env_value(DISABLE_COMPILE_ENV):
        return False
    mode = env_value(COMPILE_STAGES_ENV)
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
    mvue_key: Optional[Tensor],
    method: str,
    count: bool,
    want_feature_counts: bool,
    planar: bool = False,
    y2s_out: Optional[Tensor] = None,
    g_out: Optional[Tensor] = None,
    y2s_members: Optional[tuple[Tensor, ...]] = None,
    g_members: Optional[tuple[Tensor, ...]] = None,
    fp8: bool = False,
    group_offset: int = 0,
    count_nm: bool = False,
):
    """y1 (T×F) -> y2s, g = D ⊙ 2·relu(y1), [relu non-zeros, kept non-zeros], [N:M would-drop],
    per-feature non-zeros [, y2s as row-wise FP8 and its row scales when ``fp8`` (cuSPARSELt
    path only)].

    The counts are 0-d int64 tensors (None when not asked for), the N:M ones
    (``count_nm``) one per ``NM_PATTERNS``: telemetry comes out of this pass instead of a
    second read of a T×F tensor. ``planar``: the feature groups lie
    in the planar layout (see :func:`_feature_groups`). y2s and g are written into
    ``y2s_out`` / ``g_out`` when given (buffers the caller chose, see :func:`_scratch`) or
    returned fresh (MVUE, or when not given); ``*_members`` are those buffers' member views
    (:func:`_members`), which the compiled planar stage writes. Eager: in place on y1 (the op's own
    intermediate) and on the outputs; compiled: functional, one fused loop ending in the
    output buffers (mutating y1 would cost a copy back). MVUE's uniforms are hashed here from
    ``mvue_key`` and the global index of each group (``group_offset``: this slice's first),
    integer ops only, so compiled and eager stages draw the same bits.
    """
    compiling = torch.compiler.is_compiling()
    # relu, with NaN mapped to +inf: it ranks highest (a NaN breaks pairwise duels, and a
    # group could keep 3 or 4), stays non-finite for the numerics guard, and every later
    # selection can rank on the values themselves.
    r = _nan_to_inf(y1.clamp(min=0)) if compiling else y1.clamp_(min=0).nan_to_num_(nan=math.inf, posinf=math.inf)
    nm_dropped = None
    if count_nm:  # from r before any masking (the eager top-2 masks it in place)
        groups, dim = _feature_groups(r, planar)
        nm_dropped = nm_would_drop(groups.unbind(dim))
    if compiling and planar and method != "mvue" and y2s_members is not None and g_members is not None:
        y2s, g, relu_nnz, kept_nnz, feature_counts = _planar_forward_by_members(
            r, method, count, want_feature_counts, y2s_out, g_out, y2s_members, g_members
        )
        return y2s, g, relu_nnz, kept_nnz, nm_dropped, feature_counts
    if method == "mvue":
        y2s, g, relu_nnz, kept_nnz = _mvue_forward(y1, r, mvue_key, count, planar, group_offset)
    else:
        y2s, g, relu_nnz, kept_nnz = _top2_forward(y1, r, method, count, planar, y2s_out, g_out, compiling)
    feature_counts = None
    if want_feature_counts:
        feature_counts = _col_nonzero_counts(y2s != 0)  # the dense-feature ranking's input
    if fp8:
        # Each token row's scale comes from the row this stage just made: no extra pass.
        # The bf16 y2s is kept only where the backward reads it (mvue, soft_threshold).
        y2s_q, y2s_scale = quantize_rows(y2s)
        return (y2s if method != "naive" else None, g, relu_nnz, kept_nnz, nm_dropped, feature_counts, y2s_q, y2s_scale)
    return y2s, g, relu_nnz, kept_nnz, nm_dropped, feature_counts


def _mvue_forward(y1: Tensor, r: Tensor, mvue_key: Optional[Tensor], count: bool, planar: bool, group_offset: int):
    """MVUE selection of the forward stage on r = relu(y1): (y2s, g, relu non-zeros, kept
    non-zeros), both outputs fresh (the counts None unless ``count``)."""
    t, f = r.shape
    groups, dim = _feature_groups(r, planar)
    relu_nnz = kept_nnz = None
    y2 = r * r
    u = keyed_uniforms(mvue_key, t, f // 4, group_offset).view((t, 1, f // 4) if planar else (t, f // 4, 1))
    inv_p = _mvue_select(y2.view(groups.shape), u, dim).view(t, f)
    kept = inv_p != 0
    y2s = torch.where(kept, (y2.to(inv_p.dtype) * inv_p).to(y1.dtype), 0.0)
    g = torch.where(kept, r * _inv_p_to(inv_p, y1.dtype) * 2.0, 0.0)
    if count:
        relu_nnz, kept_nnz = count_nonzero(r), count_nonzero(y2s)
    return y2s, g, relu_nnz, kept_nnz


def _top2_forward(
    y1: Tensor, r: Tensor, method: str, count: bool, planar: bool,
    y2s_out: Optional[Tensor], g_out: Optional[Tensor], compiling: bool,
):  # fmt: skip
    """Top-2 selection (naive / soft_threshold) of the forward stage on r = relu(y1):
    (y2s, g, relu non-zeros, kept non-zeros). Eager: masks r in place and writes into
    ``y2s_out`` / ``g_out`` (or fresh tensors); compiled: functional, copied into the
    buffers at the end."""
    t, f = r.shape
    groups, dim = _feature_groups(r, planar)
    relu_nnz = kept_nnz = None
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
    return y2s, g, relu_nnz, kept_nnz


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
        if dense is not None and idx.dense_keep is not None:
            # Candidates that are not dense (tensor parallel, see sparse_ffn._dense_split):
            # token-wise 2:4 inside the dense GEMM's operand (T is a multiple of 16 here).
            c = dense.shape[1]
            sparse = _keep_top2_(z.index_select(1, idx.dense).view(-1, 4, c), 1, by_magnitude).view(-1, c)
            dense = torch.where(idx.dense_keep, dense, sparse)
        return _gathered_token_operand(z, idx, by_magnitude), dense
    t, fs = z.shape
    tail = -t % 4
    if torch.compiler.is_compiling() and out_members is not None and not tail:
        # Member by member into views of ``out``: one fused loop (see _planar_forward_by_members).
        members = _members(z, "tokens")
        keys = members if nonneg else [_nan_to_inf(m.abs()) for m in members]
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
        if idx.dense_keep is not None:  # candidates that are not dense keep their 2:4 values
            dense = torch.where(idx.dense_keep, dense, zs.index_select(1, idx.dense))
        zs.index_copy_(1, idx.dense, dense)
    return zs, None


def _gathered_token_operand(z: Tensor, idx: "_FeatureSplit", by_magnitude: bool) -> Tensor:
    """The sparse features of ``z`` (T×F, T a multiple of 4) gathered straight into the
    (F_s + pad) × T layout, then token-wise 2:4 along rows: the transpose is part of the
    gather, not a separate pass over the result."""
    zt = z.t()  # F × T view
    t = zt.shape[1]
    n_sparse = zt.shape[0] if idx.sparse is None else idx.sparse.shape[0]
    if n_sparse == 0:
        return None  # tensor parallel: every feature of this slice is a dense candidate
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
    ``dense_keep`` (bool, one per index of ``dense``, or None when all are dense): which
    candidates are really dense (tensor parallel; see sparse_ffn._dense_split).
    """

    def __init__(
        self,
        dense: Optional[Tensor],
        sparse: Optional[Tensor],
        pad_rows: int,
        gathered: bool,
        dense_mask: Optional[Tensor] = None,
        dense_keep: Optional[Tensor] = None,
    ):
        self.dense, self.sparse, self.pad_rows, self.gathered = dense, sparse, pad_rows, gathered
        self.dense_mask, self.dense_keep = dense_mask, dense_keep


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
    fp8: bool = False,
    dense_keep: Optional[Tensor] = None,
):
    """One pass over dy2 and g (and y2s): dy1 for dx, and both weight-gradient operands
    [, dy1 as row-wise FP8 and its row scales when ``fp8``, for the FP8 dx GEMM].

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
    idx = _FeatureSplit(dense_idx, sparse_idx, pad_rows, gathered, dense_mask, dense_keep)
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
    if fp8:
        # dx reads dy1 as FP8; the bf16 dy1 is kept only where dW_up reads it whole (exact).
        dy1_q, dy1_scale = quantize_rows(dy1)
        return (None if token_sparse else dy1, up, up_dense, down, down_dense, dy1_q, dy1_scale)
    return dy1, up, up_dense, down, down_dense


def _up_operand_stage(dy1, dense_idx, dense_mask=None, out=None, out_members=None, dense_keep=None) -> Tensor:
    """Plain-GEMM path: dy1's token-wise 2:4 operand, made once dx is done (eager: in
    place on dy1; compiled: into ``out`` through ``out_members``)."""
    idx = _FeatureSplit(dense_idx, None, 0, False, dense_mask, dense_keep)
    return _token_sparse_operand(dy1, False, True, idx, out, out_members)[0]


def _keep_nonzero_(t: Tensor, where: Tensor) -> Tensor:
    """Eager: ``t`` zeroed in place wherever ``where`` is 0 (bit-mask AND, NaN-safe)."""
    int_type = _INT_OF_SIZE[t.element_size()]
    bits = torch.ne(where, 0, out=torch.empty(where.shape, dtype=int_type, device=where.device)).neg_()
    t.view(int_type).bitwise_and_(bits)
    return t


def _fp8_scale_stage(product: Tensor, row_scale: Tensor, col_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """An FP8 2:4 GEMM's product times its row and column scales, in ``dtype``: one pass
    compiled (eagerly, ``apply_scales``' float32 intermediates)."""
    return apply_scales(product, row_scale, col_scale, dtype)
