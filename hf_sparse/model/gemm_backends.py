"""The GEMM back-ends of the 2:4 FFN, one chosen per call and handed to the op.

The op (``sparse_ffn``) runs the same elementwise stages around one of two kinds of GEMMs:

- :class:`PlainGemms` (``"plain"``): ``torch.mm`` on any device and dtype, float64
  included. The op then works in the planar feature order (``cpu_layout``) and the split
  backward keeps its dense features by a mask. The implementation on CPU, the fallback
  elsewhere.
- :class:`CusparseltGemms` (``"cusparselt"``): cuSPARSELt 2:4 GEMMs (CUDA sm80+, bf16/fp16,
  16-aligned shapes; FP8 on sm90), the stock feature order, the dense features of a split
  backward gathered into T×n_dense operands with an aligned count. Each GEMM shape runs
  sparse or dense as its verdict says (``gemm_tuning``); the back-end holds the process's
  :class:`GemmTuner`.

:func:`select_gemms` picks the back-end of one call from metadata only (device, dtype,
shapes; no host sync). ``relu2_2to4_ffn`` calls it once and passes the back-end's *name*
to its custom op (an op argument must be a schema type); the forward and, through its
saved inputs, the backward look the same object up, so they cannot disagree about the
feature order or the gathered operands.

Back-ends are registered by name (:func:`register_gemm_backend`); per device type one is
the automatic choice (``cuda`` -> ``cusparselt``, every other type -> ``plain``).
``relu2_2to4_ffn(gemms="plain")`` asks for one by name; another library, or an emulation
of cuSPARSELt on CPU (the tests), is added by registering it.

Under ``torch.compile`` the choice is made while dynamo traces and is a constant of the
graph. Its inputs are shapes, dtypes and devices, which the graph is guarded on anyway,
plus ``HF_SPARSE_DISABLE_2TO4_KERNEL`` and the registry, which it is not: call
``torch._dynamo.reset()`` after changing those. The per-shape sparse-or-dense verdicts are
*not* baked in: the op's kernels read them at run time.

Shipped as HF remote code: imports only torch and same-folder modules.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import torch
from torch import Tensor

from .env_knobs import env_value
from .ffn_stages import _fp8_scale_stage, _run_stage
from .fp8 import FP8, FP8_ALIGN, dense_fp8_mm, fp8_support_reason
from .gemm_tuning import GemmChoice, GemmShape, GemmTuner, _dense_mm, cslt_sparse_mm
from .kernels import (
    ALIGN,
    MIN_CAPABILITY,
    SUPPORTED_DTYPES,
    aligned_dense_count,
    cusparselt_alg_id,
    cusparselt_available,
    sparse24_padded_rows,
)

logger = logging.getLogger(__name__)

DISABLE_ENV = "HF_SPARSE_DISABLE_2TO4_KERNEL"


class GemmBackend:
    """What the op asks of a back-end. ``sparse``: it runs 2:4 GEMMs (else every GEMM is
    dense); ``planar``: the op works in the planar feature order around its GEMMs."""

    name = ""
    sparse = False
    planar = True

    def ineligibility_reason(self, x: Tensor, w_up: Tensor, w_down: Tensor) -> Optional[str]:
        """Why this back-end cannot run these operands (T×d, F×d, d×F), or None."""
        return None

    def fp8_reason(self, device: torch.device) -> Optional[str]:
        """Why FP8 2:4 GEMMs cannot run on ``device`` with this back-end, or None."""
        return fp8_support_reason(device)

    def mm(self, a: Tensor, b: Tensor, transpose_result: bool = False) -> Tensor:
        """``a @ b`` (or its transpose, contiguous) for ``a`` 2:4 along dim 1."""
        return _dense_mm(a, b, transpose_result)

    def fp8_mm(self, a: Tensor, a_scale: Tensor, bt: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
        """``(a·a_scale) @ (bt·b_scale)ᵀ`` for FP8 ``a`` (2:4 along k, row scales) and ``bt``."""
        return dense_fp8_mm(a, a_scale, bt, b_scale, out_dtype)

    def fp8_fits(self, t: int, d: int, f: int) -> bool:
        """Whether a call of T tokens on d×F weights runs its y3 and dx GEMMs in FP8."""
        return False

    def weight_mm(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x @ weightᵀ`` (T×out) for a 2:4 ``weight`` (out×in, 2:4 along in)."""
        return torch.mm(x, weight.t())

    def dense_count(self, n_dense: int, width: int) -> int:
        """How many dense features a split backward keeps, from the ceil rule's ``n_dense``."""
        return n_dense

    def padded_rows(self, rows: int) -> int:
        """Rows of a token-wise 2:4 operand of ``rows`` features, padding included."""
        return rows

    def verdict(self, a: Tensor, b: Tensor, transpose_result: bool = False, name: str = "") -> GemmChoice:
        """Sparse or dense for ``a @ b`` (run time only)."""
        nan = float("nan")
        return GemmChoice(-1, nan, nan, nan, f"{self.name} back-end: dense GEMMs")

    def prepare(self, named_shapes: list[tuple[str, GemmShape]], device) -> list[tuple[str, GemmShape]]:
        """Make the verdicts of ``named_shapes`` now (eagerly); returns those it made."""
        return []


class PlainGemms(GemmBackend):
    """``torch.mm`` on the masked operands: same numbers, no 2:4 speed-up."""

    name = "plain"


class CusparseltGemms(GemmBackend):
    """cuSPARSELt 2:4 GEMMs where each shape's verdict says so, dense GEMMs elsewhere."""

    name = "cusparselt"
    sparse = True
    planar = False

    def __init__(self, tuner: Optional[GemmTuner] = None):
        self.tuner = tuner or GemmTuner()

    def device_reason(self, device: torch.device) -> Optional[str]:
        """Why ``device`` has no cuSPARSELt 2:4 GEMMs, or None."""
        if device.type != "cuda":
            return f"device is {device.type}, needs CUDA"
        if not cusparselt_available():
            return "PyTorch was built without cuSPARSELt"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return f"compute capability {capability} < {MIN_CAPABILITY}"
        return None

    def ineligibility_reason(self, x: Tensor, w_up: Tensor, w_down: Tensor) -> Optional[str]:
        if w_up.device != x.device or w_down.device != x.device:
            return "operands on different devices"
        if x.dtype not in SUPPORTED_DTYPES or w_up.dtype != x.dtype or w_down.dtype != x.dtype:
            return f"dtype {x.dtype} (needs bf16/fp16 for all operands)"
        if x.dim() != 2 or w_up.dim() != 2 or w_down.dim() != 2:
            return "operands must be 2-D"
        return shape_reason(x, w_up) or self.device_reason(x.device)

    def mm(self, a: Tensor, b: Tensor, transpose_result: bool = False) -> Tensor:
        # A custom op (its fake kernel gives the shape): torch._cslt_compress has none.
        return torch.ops.hf_sparse.sparse24_mm(a, b, transpose_result, self.name)

    def mm_now(self, a: Tensor, b: Tensor, transpose_result: bool) -> Tensor:
        """The kernel behind :meth:`mm`, run with real tensors."""
        # _cslt_sparse_mm describes B as row-major when contiguous and as the transpose of
        # a row-major tensor otherwise; any other stride pattern would be read wrongly.
        if not (b.is_contiguous() or b.t().is_contiguous()):
            b = b.contiguous()
        a = a.contiguous()
        choice = self.verdict(a, b, transpose_result)
        if not choice.use_sparse():
            # The operand is already 2:4: a dense GEMM gives the same product, faster here.
            return _dense_mm(a, b, transpose_result).contiguous()
        # The compressed form is rebuilt every call: activations change every step, so
        # there is nothing to cache, unlike 2:4 weights.
        return cslt_sparse_mm(torch._cslt_compress(a), b, transpose_result, choice.config)

    def fp8_mm(self, a: Tensor, a_scale: Tensor, bt: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
        # FP8 sparse tensor cores take the dense operand column-major: B = btᵀ.
        b = bt.t()
        choice = self.verdict(a, b)
        if not choice.use_sparse():
            if choice.alg_id >= 0:  # measured, and slower than dense (not merely untuned)
                _say_fp8_dense(GemmShape.of(a, b, False).label(), choice.reason)
            return dense_fp8_mm(a, a_scale, bt, b_scale, out_dtype)
        out = cslt_sparse_mm(torch._cslt_compress(a), b, False, choice.config)  # bf16 out for FP8 operands
        # Both scales in one compiled pass over the product (the dense FP8 GEMM applies
        # them in its epilogue).
        return _run_stage(_fp8_scale_stage, out, a_scale, b_scale, out_dtype)

    def fp8_fits(self, t: int, d: int, f: int) -> bool:
        return t > 0 and not (t % FP8_ALIGN or d % FP8_ALIGN or f % FP8_ALIGN)

    def weight_mm(self, x: Tensor, weight: Tensor) -> Tensor:
        # A custom op, like the activation GEMMs: the verdict is read when it runs, not
        # while dynamo traces, so a compiled model follows verdicts made after compiling.
        return torch.ops.hf_sparse.sparse_weight_mm(x, weight, self.name)

    def weight_mm_now(self, x: Tensor, weight: Tensor) -> Tensor:
        """The kernel behind :meth:`weight_mm`: yᵀ = W·xᵀ with the 2:4 weight as the sparse
        operand, the result transposed back (contiguous T×out)."""
        b = x.t() if x.is_contiguous() else x.contiguous().t()  # xᵀ: the transpose of a row-major tensor
        choice = self.verdict(weight, b, transpose_result=True)
        # A 2:4 weight is compressed once per optimizer step, not per call.
        if not choice.use_sparse(amortised_compression=True):
            return torch.mm(x, weight.t())
        return cslt_sparse_mm(_packed_weight(weight), b, True, choice.config)

    def dense_count(self, n_dense: int, width: int) -> int:
        return aligned_dense_count(n_dense, width)

    def padded_rows(self, rows: int) -> int:
        return sparse24_padded_rows(rows)

    def verdict(self, a: Tensor, b: Tensor, transpose_result: bool = False, name: str = "") -> GemmChoice:
        return self.tuner.gemm_choice(a, b, transpose_result, cusparselt_alg_id(), name)

    def prepare(self, named_shapes: list[tuple[str, GemmShape]], device) -> list[tuple[str, GemmShape]]:
        for label, shape in named_shapes:
            self.tuner.choice_for(shape, device, cusparselt_alg_id(), label)
        if named_shapes:
            logger.info(self.tuner.format_table(named_shapes, device))
        return list(named_shapes)


def _packed_weight(weight: Tensor) -> Tensor:
    """cuSPARSELt's compressed form of a 2:4 weight, kept on the tensor while it is
    unchanged. Eagerly the tensor is ``weight_sparse``'s 2:4 weight of the current optimizer
    step, so every micro-batch and evaluation of the step reuses one compression; a
    compiled graph hands in a fresh buffer per call, which is compressed per call."""
    cached = getattr(weight, "_hf_sparse_packed", None)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    packed = torch._cslt_compress(weight.contiguous())
    weight._hf_sparse_packed = (weight._version, packed)
    return packed


def shape_reason(x: Tensor, w_up: Tensor) -> Optional[str]:
    """Why a T×d input and an F×d weight do not fit cuSPARSELt's alignment, or None."""
    t, d = x.shape
    f = w_up.shape[0]
    if d % ALIGN or f % ALIGN:
        return f"model widths d={d}, F={f} are not multiples of {ALIGN}"
    if t == 0 or t % ALIGN:
        return f"token count T={t} is not a multiple of {ALIGN}"
    return None


PLAIN = PlainGemms()
CUSPARSELT = CusparseltGemms()
_BACKENDS: dict[str, GemmBackend] = {PLAIN.name: PLAIN, CUSPARSELT.name: CUSPARSELT}
_AUTOMATIC: dict[str, str] = {"cuda": CUSPARSELT.name}  # device type -> back-end name


def dense_feature_count(f: int, dense_features: float, backward: str) -> int:
    """How many of the F features the split backward keeps dense: ceil(dense_features·F)."""
    # Round before ceil so that e.g. 0.05 * F landing a hair above an integer does not
    # add a feature.
    return min(f, math.ceil(round(dense_features * f, 6))) if backward == "split_gemm" else 0


def ffn_gemm_shapes(
    tokens: int,
    d: int,
    f: int,
    dtype: torch.dtype,
    dense_features: float = 0.05,
    backward: str = "split_gemm",
    fp8: bool = False,
) -> list[tuple[str, GemmShape]]:
    """The 2:4 GEMMs the op runs on the cuSPARSELt path for T = ``tokens``, named as in
    the module docstring (y3, dx, dW_up, dW_down), as ``gemm_tuning`` keys them; ``fp8``:
    y3 and dx in FP8 where the shape allows (one shape: both read a T×F FP8 operand against
    a column-major FP8 weight). The tuner prepares these shapes before training."""
    name = str(dtype).replace("torch.", "")
    shapes = [("y3", GemmShape(tokens, f, d, "col", False, name)), ("dx", GemmShape(tokens, f, d, "row", False, name))]
    if fp8 and CUSPARSELT.fp8_fits(tokens, d, f):
        fp8_name = str(FP8).replace("torch.", "")
        shapes = [(gemm, GemmShape(tokens, f, d, "col", False, fp8_name)) for gemm in ("y3", "dx")]
    n_dense = aligned_dense_count(dense_feature_count(f, dense_features, backward), f)
    if backward != "exact" and n_dense < f:
        rows = sparse24_padded_rows(f - n_dense)  # the sparse features, padded to the alignment
        shapes += [("dW_up", GemmShape(rows, tokens, d, "row", False, name)),
                   ("dW_down", GemmShape(rows, tokens, d, "row", True, name))]  # fmt: skip
    return shapes


def register_gemm_backend(backend: GemmBackend, device_type: Optional[str] = None) -> None:
    """Make ``backend`` available by its name; with ``device_type``, the automatic choice
    on that device type from now on."""
    if not backend.name:
        raise ValueError("a GEMM back-end needs a name")
    _BACKENDS[backend.name] = backend
    if device_type is not None:
        _AUTOMATIC[device_type] = backend.name


def get_gemm_backend(name: str) -> GemmBackend:
    """The registered back-end called ``name``."""
    backend = _BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"gemms={name!r} is not a registered GEMM back-end; choose one of {sorted(_BACKENDS)}.")
    return backend


def automatic_gemm_backend(device) -> GemmBackend:
    """The back-end chosen on ``device`` when none is asked for."""
    return _BACKENDS[_AUTOMATIC.get(torch.device(device).type, PLAIN.name)]


def kernel_disabled() -> bool:
    """True when ``HF_SPARSE_DISABLE_2TO4_KERNEL`` is set to a truthy value."""
    return env_value(DISABLE_ENV)


@functools.lru_cache(maxsize=None)
def _say_fp8_dense(shape: str, detail: str) -> None:
    logger.warning(
        "2:4 FFN, FP8: the 2:4 GEMM %s (with its compression and scale pass) measured slower than the dense "
        "FP8 GEMM (%s); this shape runs dense FP8 GEMMs.", shape, detail,
    )  # fmt: skip


@functools.lru_cache(maxsize=None)
def _warn_fallback(kind: str, reason: str) -> None:
    logger.warning("2:4 sparse FFN: using the dense reference GEMMs (same semantics, no speed-up): %s", reason)


def select_gemms(x: Tensor, w_up: Tensor, w_down: Tensor, requested: Optional[str] = None) -> GemmBackend:
    """The back-end for one call on ``x`` (T×d), ``w_up`` (F×d), ``w_down`` (d×F): the one
    ``requested`` by name, else the device's automatic one; plain GEMMs where that one
    cannot run these operands. Metadata only (no sync), so it gives the same answer while
    torch.compile traces as at run time. A structural reason is warned once; a token count
    that is not aligned (decode, a last partial batch) falls back silently, call after call."""
    if kernel_disabled():
        return PLAIN
    backend = get_gemm_backend(requested) if requested else automatic_gemm_backend(x.device)
    if not backend.sparse:
        return backend
    reason = backend.ineligibility_reason(x, w_up, w_down)
    if reason is None:
        return backend
    if not reason.startswith("token count"):
        _warn_fallback(reason.split(" ")[0], reason)
    return PLAIN


def fp8_ineligibility_reason(device) -> Optional[str]:
    """Why FP8 2:4 GEMMs cannot run on ``device`` (None: they can)."""
    device = torch.device(device)
    return automatic_gemm_backend(device).fp8_reason(device)


def _sparse24_mm_impl(a: Tensor, b: Tensor, transpose_result: bool, gemms: str = CUSPARSELT.name) -> Tensor:
    return get_gemm_backend(gemms).mm_now(a, b, transpose_result)


def _sparse24_mm_fake(a: Tensor, b: Tensor, transpose_result: bool, gemms: str = CUSPARSELT.name) -> Tensor:
    m, n = a.shape[0], b.shape[1]
    return a.new_empty((n, m) if transpose_result else (m, n))


def _sparse_weight_mm_impl(x: Tensor, weight: Tensor, gemms: str) -> Tensor:
    return get_gemm_backend(gemms).weight_mm_now(x, weight)


def _sparse_weight_mm_fake(x: Tensor, weight: Tensor, gemms: str) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


# A second copy of this file (remote code under another module name) reuses the ops.
if not hasattr(torch.ops.hf_sparse, "sparse_weight_mm"):
    torch.library.custom_op(
        "hf_sparse::sparse_weight_mm",
        _sparse_weight_mm_impl,
        mutates_args=(),
        schema="(Tensor x, Tensor weight, str gemms) -> Tensor",
    ).register_fake(_sparse_weight_mm_fake)
if not hasattr(torch.ops.hf_sparse, "sparse24_mm"):
    torch.library.custom_op(
        "hf_sparse::sparse24_mm",
        _sparse24_mm_impl,
        mutates_args=(),
        schema=f"(Tensor a, Tensor b, bool transpose_result, str gemms='{CUSPARSELT.name}') -> Tensor",
    ).register_fake(_sparse24_mm_fake)
