"""cuSPARSELt 2:4 sparse GEMM calls for the ReLU² FFN (through PyTorch's private ops).

``torch._cslt_compress`` packs a dense tensor that already holds a 2:4 pattern along its
LAST dim (every group of 4 consecutive elements of a row has at most 2 non-zeros) and
``torch._cslt_sparse_mm`` multiplies the packed operand with a dense one. PyTorch's
CUTLASS 2:4 kernels are sm8x-only; cuSPARSELt covers sm80+ including H100 (sm90), so it is
the one library used here. This file holds the library's constraints and calls only;
*whether* a call takes them is the GEMM back-end's decision (``gemm_backends.py``), and
each shape's sparse-or-dense verdict is ``gemm_tuning``'s.

``HF_SPARSE_CSLT_ALG_ID`` names the alg id tried first (default 0).

This file is shipped as HF remote code: it imports only torch.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from .env_knobs import env_value
from .gemm_tuning import CsltConfig, cslt_sparse_mm

logger = logging.getLogger(__name__)

ALG_ID_ENV = "HF_SPARSE_CSLT_ALG_ID"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
# cuSPARSELt needs 16-bit sparse operands whose two dims are multiples of 16 (PyTorch's
# own constraint table for the cuSPARSELt backend; dense operands need 8). 16 also covers
# the token-wise groups of 4. Weight-gradient operands whose feature count is not a
# multiple are padded with zero rows (sparse24_padded_rows).
ALIGN = 16
MIN_CAPABILITY = (8, 0)


def cusparselt_alg_id() -> int:
    """cuSPARSELt algorithm id each shape tries first (``HF_SPARSE_CSLT_ALG_ID``, default 0)."""
    return env_value(ALG_ID_ENV)


def cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except (AttributeError, RuntimeError):
        return False


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
    """A 2:4 GEMM with ``a`` already compressed by :func:`compress_2to4`, run as
    ``config`` (a verdict's alg id and split-k) or else with ``alg_id`` (default: the
    configured one) at the library's default split-k."""
    if not (b.is_contiguous() or b.t().is_contiguous()):
        b = b.contiguous()
    if config is None:
        config = CsltConfig(cusparselt_alg_id() if alg_id is None else alg_id)
    return cslt_sparse_mm(packed, b, transpose_result, config)
