"""Row-wise FP8 (e4m3) for the 2:4 FFN's forward and input-gradient GEMMs.

The paper's fast path (Haziza et al. 2025) pairs 2:4 activations with FP8: a 2:4 GEMM in
FP8 e4m3 with bf16 output. Here two of the op's four 2:4 GEMMs run that way, the two
that reduce over the FFN width F into the model width d:

    y3 = y2s · W_downᵀ     (forward)         dx = dy1 · W_up     (input gradient)

Their 2:4 operands (y2s, dy1) are T×F tensors that the op's stages produce one token row
at a time, so each row's scale (its max |value| / 448) is computed in the same stage that
selects the 2:4 pattern, with no extra pass. The weight-gradient GEMMs stay bf16: their
2:4 operands are token-wise (F_s×T), so a row-wise scale would need a max over all T
tokens of each feature before quantizing (another pass over the operand), and the weight
update is where gradient range matters most.

Scales are float32, one per row of the 2:4 operand and one per output column of the dense
one (a row of the weight); both are applied to the bf16 result after the GEMM, in one
compiled pass (exactly what row-wise ``torch._scaled_mm`` computes in its epilogue;
``_cslt_sparse_mm``'s ``alpha`` could take the row scales only). The weights are quantized
once per optimizer step (``weight_operands``), like the compressed 2:4 weights. FP8 sparse tensor cores (sm89/sm90) take the
sparse operand row-major and the dense one column-major, so the dense operand is the
quantized weight row-major viewed transposed.

Shipped as HF remote code: imports only torch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
# PyTorch's cuSPARSELt constraint table for 8-bit operands: the sparse operand's rows and
# columns multiples of 32 (16 for 16-bit ones), the dense operand's of 16.
FP8_ALIGN = 32
# cuSPARSELt runs FP8 e4m3 2:4 GEMMs from release 0.6.2 (version number 602) on sm90.
MIN_CUSPARSELT_FP8 = 602
MIN_CAPABILITY_FP8 = (9, 0)


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """(FP8 values, float32 scales (rows×1)) with ``t ≈ values · scales`` row by row.

    Zeros stay exact zeros, so a 2:4 row stays 2:4 (a non-finite value makes its row's scale
    non-finite, but only the row's non-zeros carry it on, to the output and the numerics
    guard, instead of filling the whole group)."""
    wide = t.float()
    amax = wide.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    values = torch.where(wide != 0, wide / scale, 0.0).to(FP8).contiguous()
    return values, scale


def weight_operands(
    w_up: Tensor, w_down: Tensor, owner: Tensor, generation: Optional[int] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W_down, its row scales, W_upᵀ, its row scales) in row-wise FP8: the dense operands of
    the y3 and dx GEMMs, one row per output channel (d of them each).

    With ``generation`` (the optimizer step the weights belong to: SparsityCallback bumps
    it after every step) they are quantized once per step and kept on ``owner`` (the
    W_down parameter: under autocast ``w_down`` is a fresh cast every call); the versions
    catch in-place changes between steps. Without it, and while torch.compile traces
    (where the quantization is compiled into the graph instead), every call quantizes."""
    cacheable = generation is not None and not torch.compiler.is_compiling()
    key = (generation, owner._version, w_up._version, owner.data_ptr(), w_up.data_ptr(), w_down.dtype)
    cached = getattr(owner, "_hf_sparse_fp8", None) if cacheable else None
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():  # constants for the op: the gradients flow through w_up and w_down
        operands = (*quantize_rows(w_down), *quantize_rows(w_up.t()))
    if cacheable:
        owner._hf_sparse_fp8 = (key, operands)
    return operands


def apply_scales(out: Tensor, row_scale: Tensor, col_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``out`` (m×n, float accumulation) times its row and column scales, in ``dtype``."""
    return (out.float() * row_scale * col_scale.view(1, -1)).to(dtype)


def dense_fp8_mm(a: Tensor, a_scale: Tensor, bt: Tensor, b_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Dense row-wise scaled FP8 GEMM ``(a·a_scale) @ (bt·b_scale)ᵀ`` in ``dtype`` (the dense
    alternative of a 2:4 FP8 GEMM, through ``torch._scaled_mm``)."""
    return torch._scaled_mm(a, bt.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=dtype)


def fp8_support_reason(device: torch.device) -> str | None:
    """Why this device cannot run FP8 2:4 GEMMs, or None when it can."""
    if device.type != "cuda":
        return f"device is {device.type}; FP8 2:4 GEMMs need an sm90 GPU (H100/H200)"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY_FP8:
        return f"compute capability {capability} < {MIN_CAPABILITY_FP8}"
    try:
        version = int(torch.backends.cusparselt.version())
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return "PyTorch was built without cuSPARSELt"
    if version < MIN_CUSPARSELT_FP8:
        return f"cuSPARSELt {version} is older than 0.6.2, the first with FP8 2:4 GEMMs"
    return None
