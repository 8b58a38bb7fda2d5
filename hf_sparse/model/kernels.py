"""GPU 2:4 sparse GEMM dispatch for the ReLU² FFN (cuSPARSELt through PyTorch).

``sparse24_mm(a, b)`` computes ``a @ b`` where the dense tensor ``a`` already holds a 2:4
pattern along its LAST dim (the reduction dim): every group of 4 consecutive elements of
a row has at most 2 non-zeros. It compresses ``a`` with ``torch._cslt_compress`` and runs
``torch._cslt_sparse_mm``. PyTorch's CUTLASS 2:4 kernels are sm8x-only; cuSPARSELt covers
sm80+ including H100 (sm90), so it is the one backend used here.

``use_2to4_kernel`` decides per call, from metadata only (device, dtype, capability,
aligned shapes; no host sync, so it is safe while torch.compile traces), whether the FFN
takes the cuSPARSELt data path. A structural reason (dtype, capability, a model width that
is not aligned) is warned once; a token count that is not aligned (decode, the last
partial batch) falls back silently, call after call. Within that path each GEMM shape
then runs as a 2:4 GEMM or a dense GEMM on the same masked operands, whichever
``gemm_tuning`` found correct and faster (verified and timed once per shape, eagerly, at
run time). Set ``HF_SPARSE_DISABLE_2TO4_KERNEL=1`` to force the plain path,
``HF_SPARSE_CSLT_ALG_ID`` for the alg id tried first (default 0), and
``HF_SPARSE_2TO4_GEMMS`` (auto | sparse | dense) to override the per-shape verdicts.

``sparse24_mm`` is the custom op ``hf_sparse::sparse24_mm`` (with a fake kernel:
``torch._cslt_compress`` has none), so graphs that contain it trace under torch.compile.

This file is shipped as HF remote code: it imports only torch.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
from torch import Tensor

from .fp8 import apply_scales, dense_fp8_mm, fp8_support_reason
from .gemm_tuning import CsltConfig, GemmShape, _dense_mm, cslt_sparse_mm, gemm_choice, verify_alg_id

logger = logging.getLogger(__name__)

DISABLE_ENV = "HF_SPARSE_DISABLE_2TO4_KERNEL"
ALG_ID_ENV = "HF_SPARSE_CSLT_ALG_ID"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
# cuSPARSELt needs 16-bit sparse operands whose two dims are multiples of 16 (PyTorch's
# own constraint table for the cuSPARSELt backend; dense operands need 8). 16 also covers
# the token-wise groups of 4. Weight-gradient operands whose feature count is not a
# multiple are padded with zero rows (sparse24_padded_rows).
ALIGN = 16
MIN_CAPABILITY = (8, 0)
# Relative Frobenius error above which the self-check calls an alg id broken; bf16 GEMM
# rounding gives ~3e-3, wrong kernels give O(1).
_SELF_CHECK_RTOL = 2e-2

_warned: set[str] = set()
_self_check: dict[tuple, bool] = {}
# None: decide from the hardware. True: take the cuSPARSELt branch on any device/dtype
# whenever shapes are aligned, with every GEMM sparse (tests, with torch._cslt_* replaced
# by a CPU emulation). "cuda": the CUDA decision path (eligibility, per-shape verification
# and timing) on any device, for the same emulated tests. False: never.
_kernel_override: list[Union[None, bool, str]] = [None]
CUDA_RULES = "cuda"


def set_kernel_override(enabled: Union[None, bool, str]) -> None:
    """Force the cuSPARSELt branch on (``True``, e.g. with an emulated backend), follow the
    CUDA rules on any device (``"cuda"``), or never (``False``); ``None`` restores the
    hardware-based decision."""
    if enabled not in (None, True, False, CUDA_RULES):
        raise ValueError(f"kernel override must be None, True, False or {CUDA_RULES!r}, got {enabled!r}")
    _kernel_override[0] = enabled


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def kernel_disabled() -> bool:
    """True when ``HF_SPARSE_DISABLE_2TO4_KERNEL`` is set to a truthy value."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def cusparselt_alg_id() -> int:
    """cuSPARSELt algorithm id to use (``HF_SPARSE_CSLT_ALG_ID``, default 0)."""
    raw = os.environ.get(ALG_ID_ENV, "").strip()
    try:
        return int(raw) if raw else 0
    except ValueError:
        _warn_once("alg_env", "Ignoring %s=%r (not an integer); using alg_id 0", ALG_ID_ENV, raw)
        return 0


def cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except (AttributeError, RuntimeError):
        return False


def ineligibility_reason(x: Tensor, w_up: Tensor, w_down: Tensor) -> Optional[str]:
    """Why the 2:4 GEMM path cannot run these operands, or None if it can.

    Only metadata is inspected (device, dtype, shape, strides, capability): no sync.
    """
    if kernel_disabled():
        return f"disabled by {DISABLE_ENV}"
    emulated = _kernel_override[0] == CUDA_RULES
    if x.device.type != "cuda" and not emulated:
        return f"device is {x.device.type}, needs CUDA"
    if w_up.device != x.device or w_down.device != x.device:
        return "operands on different devices"
    if x.dtype not in SUPPORTED_DTYPES or w_up.dtype != x.dtype or w_down.dtype != x.dtype:
        return f"dtype {x.dtype} (needs bf16/fp16 for all operands)"
    if x.dim() != 2 or w_up.dim() != 2 or w_down.dim() != 2:
        return "operands must be 2-D"
    reason = _shape_reason(x, w_up)
    if reason is not None:
        return reason
    if not cusparselt_available():
        return "PyTorch was built without cuSPARSELt"
    cap = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else MIN_CAPABILITY
    if cap < MIN_CAPABILITY:
        return f"compute capability {cap} < {MIN_CAPABILITY}"
    return None


def _shape_reason(x: Tensor, w_up: Tensor) -> Optional[str]:
    t, d = x.shape
    f = w_up.shape[0]
    if d % ALIGN or f % ALIGN:
        return f"model widths d={d}, F={f} are not multiples of {ALIGN}"
    if t == 0 or t % ALIGN:
        return f"token count T={t} is not a multiple of {ALIGN}"
    return None


def gpu_2to4_eligible(x: Tensor, w_up: Tensor, w_down: Tensor) -> bool:
    """True if ``x``/``w_up``/``w_down`` (T×d, F×d, d×F) can use the 2:4 GEMMs."""
    return ineligibility_reason(x, w_up, w_down) is None


def use_2to4_kernel(x: Tensor, w_up: Tensor, w_down: Tensor) -> bool:
    """Whether the op takes the cuSPARSELt data path: metadata only (no sync, nothing
    cached), so the same answer comes at trace time and at run time. Warns once (on
    CUDA) when a structural reason sends it to the plain path."""
    override = _kernel_override[0]
    if override is True or override is False:
        return override and x.dim() == 2 and _shape_reason(x, w_up) is None
    if x.device.type != "cuda" and override != CUDA_RULES:
        # CPU/MPS: the reference path is the implementation, not a fallback.
        return False
    reason = ineligibility_reason(x, w_up, w_down)
    if reason is not None:
        if reason.startswith("token count"):
            # Decode steps and last partial batches: expected, silent, and frequent.
            return False
        _warn_once(
            "fallback:" + reason.split(" ")[0],
            "2:4 sparse FFN: using the dense reference GEMMs (same semantics, no speed-up): %s",
            reason,
        )
        return False
    return True


# The dense features of a split backward are gathered into T×n_dense operands on the
# cuSPARSELt path; rows of a multiple of 8 elements are 16-byte aligned in bf16/fp16 (the
# alignment cuBLAS's fastest GEMM kernels want), so the count is rounded up to it there.
DENSE_FEATURE_ALIGN = 8


def aligned_dense_count(n_dense: int, f: int) -> int:
    """The cuSPARSELt path's dense-feature count: ``n_dense`` (the ceil rule, a lower
    bound) rounded up to a multiple of ``DENSE_FEATURE_ALIGN``, at most ``f``; 0 stays 0."""
    if n_dense <= 0:
        return 0
    return min(f, -(-n_dense // DENSE_FEATURE_ALIGN) * DENSE_FEATURE_ALIGN)


def sparse24_padded_rows(rows: int) -> int:
    """``rows`` rounded up to the sparse operand's row alignment (padding rows are zeros)."""
    return -(-rows // ALIGN) * ALIGN


def sparse24_mm(a: Tensor, b: Tensor, *, transpose_result: bool = False) -> Tensor:
    """``a @ b`` (or its transpose, contiguous) with ``a`` 2:4-sparse along dim 1.

    ``a`` (m×k) must hold at most 2 non-zeros per group of 4 along k (compression does
    not prune: other values make the result undefined). ``b`` (k×n) may be contiguous or
    the transpose of a contiguous tensor; cuSPARSELt reads both layouts without a copy.
    """
    return torch.ops.hf_sparse.sparse24_mm(a, b, transpose_result)


def compress_2to4(a: Tensor) -> Tensor:
    """cuSPARSELt's compressed form of ``a`` (2:4 along dim 1), for reuse across GEMMs."""
    return torch._cslt_compress(a.contiguous())


def sparse24_mm_packed(
    packed: Tensor,
    b: Tensor,
    *,
    transpose_result: bool = False,
    alg_id: Optional[int] = None,
    config: Optional[CsltConfig] = None,
) -> Tensor:
    """:func:`sparse24_mm` with ``a`` already compressed by :func:`compress_2to4`, run as
    ``config`` (a verdict's alg id and split-k) or else with ``alg_id`` (default: the
    configured one) at the library's default split-k."""
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()
    if config is None:
        config = CsltConfig(cusparselt_alg_id() if alg_id is None else alg_id)
    return cslt_sparse_mm(packed, b, transpose_result, config)


def gemm_verdicts_forced() -> bool:
    """True under a forced kernel override (``True``/``False``): every GEMM on the cuSPARSELt
    path is then sparse, untimed, and nothing is tuned."""
    return _kernel_override[0] is True or _kernel_override[0] is False


def gemm_verdict(a: Tensor, b: Tensor, transpose_result: bool = False, name: str = ""):
    """The per-shape verdict (:func:`gemm_tuning.gemm_choice`) for ``a @ b`` on the
    cuSPARSELt path. Under a forced override (``True``/``False``: tests with an emulated
    backend) every GEMM on that path is sparse, untimed."""
    if gemm_verdicts_forced():
        from .gemm_tuning import GemmChoice

        return GemmChoice(cusparselt_alg_id(), 0.0, 0.0, 1.0, "kernel override", forced=True)
    return gemm_choice(a, b, transpose_result, cusparselt_alg_id(), name)


def sparse24_mm_fp8(a: Tensor, a_scale: Tensor, bt: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``(a·a_scale) @ (bt·b_scale)ᵀ`` in ``out_dtype`` for FP8 ``a`` (m×k, 2:4 along k, row
    scales m×1) and FP8 ``bt`` (n×k row-major, so B = btᵀ is the column-major dense operand
    FP8 sparse tensor cores take; scales per row of bt). A 2:4 FP8 GEMM or a dense scaled
    FP8 GEMM, whichever this shape's verdict says; run-time only (inside the op's kernels)."""
    b = bt.t()
    choice = gemm_verdict(a, b)
    if not choice.use_sparse():
        return dense_fp8_mm(a, a_scale, bt, b_scale, out_dtype)
    out = cslt_sparse_mm(torch._cslt_compress(a), b, False, choice.config)  # bf16 out for FP8 operands
    return apply_scales(out, a_scale, b_scale, out_dtype)


def fp8_ineligibility_reason(device) -> Optional[str]:
    """Why FP8 2:4 GEMMs cannot run on ``device`` (None: they can, or a test forces the
    cuSPARSELt path with an emulated backend)."""
    if _kernel_override[0] in (True, CUDA_RULES):
        return None
    return fp8_support_reason(torch.device(device))


def _sparse24_mm_impl(a: Tensor, b: Tensor, transpose_result: bool) -> Tensor:
    # _cslt_sparse_mm describes B as row-major when contiguous and as the transpose of a
    # row-major tensor otherwise; any other stride pattern would be read wrongly.
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()
    a = a.contiguous()
    choice = gemm_verdict(a, b, transpose_result)
    if not choice.use_sparse():
        # The operand is already 2:4: a dense GEMM gives the same product, faster here.
        return _dense_mm(a, b, transpose_result).contiguous()
    # The compressed form (kept values + metadata) is rebuilt every call: activations
    # change every step, so there is nothing to cache, unlike 2:4 weights.
    packed = torch._cslt_compress(a)
    return cslt_sparse_mm(packed, b, transpose_result, choice.config)


def _sparse24_mm_fake(a: Tensor, b: Tensor, transpose_result: bool) -> Tensor:
    m, n = a.shape[0], b.shape[1]
    return a.new_empty((n, m) if transpose_result else (m, n))


# A second copy of this file (remote code under another module name) reuses the op.
if not hasattr(torch.ops.hf_sparse, "sparse24_mm"):
    torch.library.custom_op(
        "hf_sparse::sparse24_mm",
        _sparse24_mm_impl,
        mutates_args=(),
        schema="(Tensor a, Tensor b, bool transpose_result) -> Tensor",
    ).register_fake(_sparse24_mm_fake)


def check_alg_id(device, dtype: torch.dtype, alg_id: int, shapes=((256, 512, 128),)) -> tuple[bool, str]:
    """Compare ``_cslt_sparse_mm`` with ``alg_id`` against a dense GEMM at each (m, k, n) of
    ``shapes`` in the three layouts the FFN uses: row-major B, transposed B and a
    transposed result (host sync). Returns (ok, detail of the worst case)."""
    dtype_name = str(dtype).replace("torch.", "")
    details = []
    for m, k, n in shapes:
        for layout, transpose_result in (("row", False), ("col", False), ("row", True)):
            ok, detail = verify_alg_id(GemmShape(m, k, n, layout, transpose_result, dtype_name), device, alg_id)
            if not ok:
                return False, detail
            details.append(detail)
    return True, max(details, key=lambda d: float(d.rsplit(" ", 1)[-1]))


def self_check(device, dtype: torch.dtype) -> bool:
    """Cached per (device, dtype, alg id): one sync the first time, none afterwards (a
    diagnostic: the op's GEMMs are verified per shape by ``gemm_tuning``). While
    torch.compile traces it only reads the cache: a sync there would raise, and that
    error must not be cached as a broken alg id."""
    dev = torch.device(device)
    if dev.index is None and dev.type == "cuda":
        dev = torch.device(dev.type, torch.cuda.current_device())
    alg_id = cusparselt_alg_id()
    key = (dev, dtype, alg_id)
    ok = _self_check.get(key)
    if ok is None and torch.compiler.is_compiling():
        return False
    if ok is None:
        ok, detail = check_alg_id(dev, dtype, alg_id)
        _self_check[key] = ok
        if ok:
            logger.info("cuSPARSELt alg_id %d self-check passed on %s/%s (%s)", alg_id, dev, dtype, detail)
        else:
            logger.warning(
                "cuSPARSELt alg_id %d failed its self-check on %s/%s (%s); 2:4 FFN uses the reference GEMMs",
                alg_id,
                dev,
                dtype,
                detail,
            )
    return ok


def probe_alg_ids(device, dtype: torch.dtype, max_alg_id: int = 16, shapes=((256, 512, 128),)) -> dict[int, tuple[bool, str]]:
    """Self-check every alg id in ``[0, max_alg_id)`` (diagnostics and GPU tests)."""
    return {alg: check_alg_id(device, dtype, alg, shapes) for alg in range(max_alg_id)}
