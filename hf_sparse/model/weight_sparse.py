"""2:4 sparse weights trained from a dense master (Hu et al. 2024; S-STE, Hu et al. 2024).

The forward multiplies by ``scale · S(W)``: S keeps the 2 largest |w| of every group of 4
along the input dim, either as they are (``"ste"``) or shrunk by the group's third
largest |w| (``"s_ste"``, soft thresholding). ``scale`` is fixed per matrix on the first
sparse forward as ⟨W, S(W)⟩ / ⟨S(W), S(W)⟩ (1 for ``ste``) and kept as a buffer, so
checkpoints and resumed runs reproduce it. The gradient goes straight through to the
dense master, ``scale · ∂L/∂W̃``, plus ``λ·(1−M)⊙W`` (masked decay, which pulls the
pruned weights toward zero) and, optionally, with the output gradient MVUE-2:4-sparsified
along tokens in the weight-gradient GEMM (as Hu et al. do to make that GEMM sparse too).

This file is shipped as HF remote code: it imports only torch and same-folder modules.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gemm_backends import select_gemms
from .lowrank import LowRankLinear
from .select_2to4 import sparsify_2to4

WEIGHT_SPARSE_METHODS = ("s_ste", "ste")
# Selection rule of sparse_ffn.sparsify_2to4 behind each method.
_SELECTION = {"s_ste": "soft_threshold", "ste": "naive"}

__all__ = [
    "WEIGHT_SPARSE_METHODS",
    "sparse_weight_2to4",
    "weight_2to4_scale",
    "sparse_linear",
    "Sparse24Linear",
    "Sparse24LowRankLinear",
    "is_weight_sparse",
    "next_weight_generation",
]


def sparse_weight_2to4(weight: Tensor, method: str = "s_ste") -> tuple[Tensor, Tensor]:
    """(S(W), keep mask) of an out×in ``weight``, groups of 4 along the input dim (dim 1)."""
    if method not in WEIGHT_SPARSE_METHODS:
        raise ValueError(f"weight_sparse_method={method!r} is not valid; choose one of 's_ste', 'ste'.")
    values, derivative = sparsify_2to4(weight, _SELECTION[method], dim=-1)
    return values, derivative != 0


def weight_2to4_scale(weight: Tensor, sparse: Tensor, method: str) -> Tensor:
    """0-d float32 scale ⟨W, S⟩/⟨S, S⟩ for s_ste (1 when S is all zeros), 1 for ste."""
    if method == "ste":
        return torch.ones((), dtype=torch.float32, device=weight.device)
    w, s = weight.detach().float(), sparse.float()
    denominator = (s * s).sum()
    return torch.where(denominator > 0, (w * s).sum() / denominator.clamp_min(1e-30), 1.0)


def _token_mvue(grad: Tensor) -> Tensor:
    """MVUE 2:4 of a (T, out) output gradient along tokens (zero-padded to a multiple of 4)."""
    t = grad.shape[0]
    tail = -t % 4
    padded = F.pad(grad, (0, 0, 0, tail)) if tail else grad
    return sparsify_2to4(padded, "mvue", dim=0)[0][:t]


class _EffectiveWeight:
    """scale·S(W) and its keep mask (a 2:4 GEMM keeps its compressed form on ``effective``)."""

    __slots__ = ("key", "effective", "keep")

    def __init__(self, key, effective, keep):
        self.key, self.effective, self.keep = key, effective, keep


def _effective_weight(weight: Tensor, scale: Tensor, method: str, generation: Optional[int]) -> _EffectiveWeight:
    """scale·S(W) of a weight, cached on the parameter for one optimizer step.

    The micro-batches and evaluations between two optimizer steps reuse the 2:4 weight
    (and its cuSPARSELt compression) instead of selecting it again; one weight-sized
    tensor per matrix. The key holds ``generation``, which SparsityCallback bumps after
    every optimizer step: a fused optimizer updates weights without bumping their
    ``_version``, so the version alone would go stale. The version still catches other
    in-place changes (loading, manual edits). ``generation=None`` (no callback), views
    (low-rank factors seen transposed) and traced code recompute every time.
    """
    cacheable = generation is not None and weight._base is None and not torch.compiler.is_compiling()
    key = (generation, weight._version, scale._version, weight.data_ptr(), weight.dtype, method) if cacheable else None
    cached = getattr(weight, "_hf_sparse_2by4", None) if cacheable else None
    if cached is not None and cached.key == key:
        return cached
    sparse, keep = sparse_weight_2to4(weight.detach(), method)
    entry = _EffectiveWeight(key, sparse * scale.to(sparse.dtype), keep)
    if cacheable:
        weight._hf_sparse_2by4 = entry
    return entry


class _SparseWeightLinear(torch.autograd.Function):
    """y = x · (scale·S(W))ᵀ with a straight-through gradient to the dense master W.

    On CUDA with bf16/fp16 and 16-aligned shapes the forward is a cuSPARSELt GEMM with the
    2:4 weight as the sparse operand (yᵀ = W̃ xᵀ, compressed once per optimizer step).
    dX = dY·W̃ stays dense: W̃ is 2:4 along its input dim, and dX would need it 2:4 along
    the output dim (a transposable mask, which S-STE does not produce).
    """

    @staticmethod
    def forward(ctx, x, weight, scale, method, masked_decay, grad_mvue, generation):
        entry = _effective_weight(weight, scale, method, generation)
        ctx.save_for_backward(x, weight, entry.effective, entry.keep, scale)
        ctx.masked_decay, ctx.grad_mvue = masked_decay, grad_mvue
        x2 = x.reshape(-1, x.shape[-1])
        gemms = select_gemms(x2, entry.effective, entry.effective)
        if gemms.sparse:
            # Sparse only where this shape's 2:4 GEMM beat the dense one, decided when the
            # GEMM runs (also in a compiled graph); compressed once per optimizer step.
            return gemms.weight_mm(x2, entry.effective).view(*x.shape[:-1], -1)
        return F.linear(x, entry.effective)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, effective, keep, scale = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ effective
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            if ctx.grad_mvue:
                g2 = _token_mvue(g2)
            grad_effective = g2.t() @ x.reshape(-1, x.shape[-1])
            grad_weight = grad_effective * scale.to(grad_effective.dtype)
            if ctx.masked_decay:
                grad_weight = grad_weight + ctx.masked_decay * weight * (~keep).to(weight.dtype)
        return grad_x, grad_weight, None, None, None, None, None


class _SparseWeight(torch.autograd.Function):
    """scale·S(W) as a tensor (for the 2:4 FFN op and low-rank products), same gradient rule."""

    @staticmethod
    def forward(ctx, weight, scale, method, masked_decay, generation=None):
        entry = _effective_weight(weight, scale, method, generation)
        ctx.save_for_backward(weight, entry.keep, scale)
        ctx.masked_decay = masked_decay
        # A fresh tensor: the output of a Function may not be the cached one itself.
        return entry.effective.clone()

    @staticmethod
    def backward(ctx, grad_effective):
        weight, keep, scale = ctx.saved_tensors
        grad_weight = grad_effective * scale.to(grad_effective.dtype)
        if ctx.masked_decay:
            grad_weight = grad_weight + ctx.masked_decay * weight * (~keep).to(weight.dtype)
        return grad_weight, None, None, None, None


def sparse_linear(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    method: str = "s_ste",
    masked_decay: float = 0.0,
    grad_mvue: bool = False,
    bias: Optional[Tensor] = None,
    generation: Optional[int] = None,
) -> Tensor:
    """``F.linear(x, scale·S(weight), bias)`` with the straight-through rules above
    (``generation``: see :func:`_effective_weight`)."""
    out = _SparseWeightLinear.apply(x, weight, scale, method, float(masked_decay), bool(grad_mvue), generation)
    return out if bias is None else out + bias


def _fix_scale_(buffer: Tensor, weight: Tensor, method: str) -> Tensor:
    """Set ``buffer`` (0 = not fixed yet) from ``weight`` once, on device, without a sync."""
    with torch.no_grad():
        sparse, _ = sparse_weight_2to4(weight.detach(), method)
        fresh = weight_2to4_scale(weight, sparse, method).to(buffer.dtype)
        buffer.copy_(torch.where(buffer == 0, fresh, buffer))
    return buffer


class _WeightSparsityState:
    """Schedule and settings shared by both sparse-weight linear kinds."""

    def _init_weight_2by4(self, method: str, masked_decay: float, grad_mvue: bool) -> None:
        if method not in WEIGHT_SPARSE_METHODS:
            raise ValueError(f"weight_sparse_method={method!r} is not valid; choose one of 's_ste', 'ste'.")
        self.weight_sparse_method = method
        self.weight_masked_decay = float(masked_decay)
        self.weight_grad_mvue = bool(grad_mvue)
        # Set by set_training_step from the schedule; True outside a trainer (as trained).
        self.sparse_weight_on = True
        # Optimizer-step counter for the effective-weight cache; None: no caching.
        self.weight_generation: Optional[int] = None
        # Whether the scale buffers were checked since construction or the last load:
        # a Python flag, so later forwards skip the check (no extra pass, no sync).
        self._scales_checked = False

    def _check_scales(self) -> None:
        if not self._scales_checked:
            for weight, scale in self._weights_and_scales():
                _fix_scale_(scale, weight, self.weight_sparse_method)
            self._scales_checked = True

    def _load_from_state_dict(self, *args, **kwargs):
        # Loaded buffers may hold 0 (saved before the first sparse step): check again.
        self._scales_checked = False
        return super()._load_from_state_dict(*args, **kwargs)


class Sparse24Linear(_WeightSparsityState, nn.Linear):
    """Identical to `nn.Linear` except that, while `sparse_weight_on`, its forward uses the
    2:4 weight ``weight_2by4_scale · S(weight)``; `weight` stays the dense master."""

    def __init__(self, in_features, out_features, bias=False, method="s_ste", masked_decay=0.0, grad_mvue=False, **kw):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, **kw)
        self._init_weight_2by4(method, masked_decay, grad_mvue)
        # 0 until fixed on the first sparse forward; persistent: checkpoints carry it.
        self.register_buffer("weight_2by4_scale", torch.zeros((), dtype=torch.float32))

    def _weights_and_scales(self):
        return ((self.weight, self.weight_2by4_scale),)

    def forward(self, x):
        if not self.sparse_weight_on:
            return F.linear(x, self.weight, self.bias)
        self._check_scales()
        return sparse_linear(
            x, self.weight, self.weight_2by4_scale, self.weight_sparse_method,
            self.weight_masked_decay, self.weight_grad_mvue, self.bias, self.weight_generation,
        )  # fmt: skip

    def effective_weight(self) -> Tensor:
        """The weight the forward uses (differentiable; the 2:4 FFN op receives this)."""
        if not self.sparse_weight_on:
            return self.weight
        self._check_scales()
        return _SparseWeight.apply(
            self.weight, self.weight_2by4_scale, self.weight_sparse_method, self.weight_masked_decay,
            self.weight_generation,
        )  # fmt: skip

    def forward_weights(self) -> dict[str, Tensor]:
        """Detached weight(s) the forward uses, by state-dict name (telemetry, export)."""
        with torch.no_grad():
            return {"weight": self.effective_weight().detach()}

    def weight_masks(self) -> dict[str, Tensor]:
        """Current 2:4 keep masks of the master weight(s) (flip-rate telemetry); from the
        per-step cache, so a logging step does not select the weights again."""
        entry = _effective_weight(
            self.weight, self.weight_2by4_scale, self.weight_sparse_method, self.weight_generation
        )
        return {"weight": entry.keep}


class Sparse24LowRankLinear(_WeightSparsityState, LowRankLinear):
    """Identical to `LowRankLinear` except that, while `sparse_weight_on`, each factor is
    2:4 along its own input dim: `weight_in` (in×r) along `in`, `weight_out` (out×r) along r."""

    def __init__(
        self, in_features, out_features, rank, bias=False, method="s_ste", masked_decay=0.0, grad_mvue=False, **kw
    ):
        LowRankLinear.__init__(self, in_features, out_features, rank, bias=bias, **kw)
        self._init_weight_2by4(method, masked_decay, grad_mvue)
        self.register_buffer("weight_in_2by4_scale", torch.zeros((), dtype=torch.float32))
        self.register_buffer("weight_out_2by4_scale", torch.zeros((), dtype=torch.float32))

    def _weights_and_scales(self):
        # As out×in maps: x -> x·weight_in is weight_inᵀ (r×in); h -> h·weight_outᵀ is weight_out.
        return (
            (self.weight_in.t(), self.weight_in_2by4_scale),
            (self.weight_out, self.weight_out_2by4_scale),
        )

    def forward(self, x):
        if not self.sparse_weight_on:
            return LowRankLinear.forward(self, x)
        self._check_scales()
        (w_in_t, s_in), (w_out, s_out) = self._weights_and_scales()
        method, decay, mvue = self.weight_sparse_method, self.weight_masked_decay, self.weight_grad_mvue
        hidden = sparse_linear(x, w_in_t, s_in, method, decay, mvue)
        return sparse_linear(hidden, w_out, s_out, method, decay, mvue, self.bias)

    def _effective_factors(self) -> tuple[Tensor, Tensor]:
        """(weight_in, weight_out) as the forward uses them, differentiable."""
        if not self.sparse_weight_on:
            return self.weight_in, self.weight_out
        self._check_scales()
        factors = []
        for weight, scale in self._weights_and_scales():
            factors.append(_SparseWeight.apply(weight, scale, self.weight_sparse_method, self.weight_masked_decay))
        return factors[0].t(), factors[1]

    def effective_weight(self) -> Tensor:
        w_in, w_out = self._effective_factors()
        return w_out @ w_in.t()

    def dense_weight(self):
        return self.effective_weight()

    def forward_weights(self) -> dict[str, Tensor]:
        with torch.no_grad():
            w_in, w_out = self._effective_factors()
            return {"weight_in": w_in.detach(), "weight_out": w_out.detach()}

    def weight_masks(self) -> dict[str, Tensor]:
        (w_in_t, _), (w_out, _) = self._weights_and_scales()
        method = self.weight_sparse_method
        return {
            "weight_in": sparse_weight_2to4(w_in_t.detach(), method)[1].t(),
            "weight_out": sparse_weight_2to4(w_out.detach(), method)[1],
        }


def next_weight_generation(model: nn.Module) -> None:
    """Mark the weights of every module that keeps per-step derived weights (2:4-weight
    linears, FP8 weights of a 2:4 FFN) as changed: call after each optimizer step, as
    SparsityCallback does. Turns those per-step caches on."""
    for module in model.modules():
        if hasattr(module, "weight_generation"):
            module.weight_generation = (module.weight_generation or 0) + 1


def is_weight_sparse(module: nn.Module) -> bool:
    """True for a 2:4-weight linear, including copies loaded as HF remote code."""
    return hasattr(module, "sparse_weight_on") and hasattr(module, "weight_masks")
