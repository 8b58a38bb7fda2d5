"""GPU 2:4 sparse GEMM dispatch for the ReLU² FFN (cuSPARSELt through PyTorch).

``sparse24_mm(a, b)`` computes ``a @ b`` where the dense tensor ``a`` already holds a 2:4
pattern along its LAST dim (the reduction dim): every group of 4 consecutive elements of
a row has at most 2 non-zeros. It compresses ``a`` with ``torch._cslt_compress`` and runs
``torch._cslt_sparse_mm``. PyTorch's CUTLASS 2:4 kernels are sm8x-only; cuSPARSELt covers
sm80+ including H100 (sm90), so it is the one backend used here.

``use_2to4_kernel`` decides per call (pure Python checks, no host sync) whether the FFN
may use it; otherwise the reference GEMMs run. A structural reason (dtype, capability, a
model width that is not aligned) is warned once; a token count that is not aligned (decode,
the last partial batch) falls back silently, call after call. The
first use per (device, dtype) runs a one-off numerical self-check of the configured
``alg_id`` against a dense GEMM (some alg ids have returned wrong results), the only
host sync in this module. Set ``HF_SPARSE_DISABLE_2TO4_KERNEL=1`` to force the reference
path, ``HF_SPARSE_CSLT_ALG_ID`` to pick another cuSPARSELt algorithm (default 0).

``sparse24_mm`` is the custom op ``hf_sparse::sparse24_mm`` (with a fake kernel:
``torch._cslt_compress`` has none), so graphs that contain it trace under torch.compile.

This file is shipped as HF remote code: it imports only torch.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor

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
# whenever shapes are aligned (tests, with torch._cslt_* replaced by a CPU emulation).
# False: never.
_kernel_override: list[Optional[bool]] = [None]


def set_kernel_override(enabled: Optional[bool]) -> None:
    """Force the cuSPARSELt branch on (``True``, e.g. with an emulated backend) or off
    (``False``); ``None`` restores the hardware-based decision."""
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
    if x.device.type != "cuda":
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
    cap = torch.cuda.get_device_capability(x.device)
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
    """Eligibility + one-off self-check; warns once (on CUDA) when falling back."""
    override = _kernel_override[0]
    if override is not None:
        return override and x.dim() == 2 and _shape_reason(x, w_up) is None
    if x.device.type != "cuda":
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
    return self_check(x.device, x.dtype)


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


def sparse24_mm_packed(packed: Tensor, b: Tensor, *, transpose_result: bool = False) -> Tensor:
    """:func:`sparse24_mm` with ``a`` already compressed by :func:`compress_2to4`."""
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()
    return torch._cslt_sparse_mm(packed, b, transpose_result=transpose_result, alg_id=cusparselt_alg_id())


def _sparse24_mm_impl(a: Tensor, b: Tensor, transpose_result: bool) -> Tensor:
    # _cslt_sparse_mm describes B as row-major when contiguous and as the transpose of a
    # row-major tensor otherwise; any other stride pattern would be read wrongly.
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()
    # The compressed form (kept values + metadata) is rebuilt every call: activations
    # change every step, so there is nothing to cache, unlike 2:4 weights.
    packed = torch._cslt_compress(a.contiguous())
    return torch._cslt_sparse_mm(packed, b, transpose_result=transpose_result, alg_id=cusparselt_alg_id())


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


def _prune_2to4_rows(a: Tensor) -> Tensor:
    """Keep the 2 largest |a| of each 4 along rows (test-data helper, not hot path)."""
    v = a.view(a.shape[0], -1, 4)
    idx = v.abs().topk(2, dim=-1).indices
    return torch.zeros_like(v).scatter_(-1, idx, v.gather(-1, idx)).view_as(a)


def check_alg_id(device, dtype: torch.dtype, alg_id: int, shapes=((256, 512, 128),)) -> tuple[bool, str]:
    """Compare ``_cslt_sparse_mm`` with ``alg_id`` against a dense GEMM (host sync).

    Covers the three layouts the FFN uses: row-major B, transposed B and a transposed
    result. Uses a private generator so the global RNG stream (MVUE) is untouched.
    Returns (ok, detail).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    worst = 0.0
    try:
        for m, k, n in shapes:
            a = _prune_2to4_rows(torch.randn(m, k, device=device, generator=gen)).to(dtype)
            bt = torch.randn(n, k, device=device, generator=gen).to(dtype)
            ref = a.float() @ bt.float().t()
            packed = torch._cslt_compress(a)
            # Row-major B, transposed B and a transposed result: the FFN uses all three.
            outs = (
                torch._cslt_sparse_mm(packed, bt.t().contiguous(), alg_id=alg_id),
                torch._cslt_sparse_mm(packed, bt.t(), alg_id=alg_id),
                torch._cslt_sparse_mm(packed, bt.t().contiguous(), transpose_result=True, alg_id=alg_id).t(),
            )
            for out in outs:
                err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                worst = max(worst, err if err == err else float("inf"))
    except RuntimeError as exc:  # invalid alg id, missing library, unsupported arch
        return False, f"{type(exc).__name__}: {exc}"
    return worst <= _SELF_CHECK_RTOL, f"max relative error {worst:.3g}"


def self_check(device, dtype: torch.dtype) -> bool:
    """Cached per (device, dtype, alg id): one sync the first time, none afterwards."""
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device(dev.type, torch.cuda.current_device())
    alg_id = cusparselt_alg_id()
    key = (dev, dtype, alg_id)
    ok = _self_check.get(key)
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
