"""Tensor parallelism for the 2:4 FFN and the low-rank linears: weights that arrive as
DTensors (``tp_plan="auto"``) and Megatron's two conjugate collectives.

Shipped as HF remote code: imports only torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
