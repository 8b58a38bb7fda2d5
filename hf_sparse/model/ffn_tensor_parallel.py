"""Tensor parallelism for the 2:4 FFN and the low-rank linears: weights that arrive as
DTensors (``tp_plan="auto"``), Megatron's two conjugate collectives, and the one gather
that keeps the split backward's choice of dense features the same at every TP degree.

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
    """(local w_up, local w_down, process group, first feature) of a column-parallel `w_up`
    (Shard(0)) and a row-parallel `w_down` (Shard(1)) on one 1-D mesh: this rank's F-slice
    of the FFN and where it starts in the whole width."""
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
    # This rank's slice starts at feature rank·ceil(F/n) (torch.chunk's split).
    return w_up.to_local(), w_down.to_local(), mesh.get_group(), mesh.get_local_rank() * math.ceil(f / n)


def _group_of(name: str):
    return torch.distributed.distributed_c10d._resolve_process_group(name)


def tp_group_size(name: str) -> int:
    """Ranks in the process group called ``name`` (``ProcessGroup.group_name``)."""
    return _group_of(name).size()


def global_dense_mask(counts: Tensor, n_dense: int, global_features: int, offset: int, group_name: str) -> Tensor:
    """Which of this rank's features are among the ``n_dense`` densest of all
    ``global_features``, ranked exactly as one process ranks them: most non-zeros first,
    ties to the lower global feature index.

    ``counts``: this rank's per-feature non-zero counts (int64, feature order), its features
    being ``offset .. offset + len(counts) - 1`` of the whole width. One all-gather of
    ceil(F/N) counts per rank, on device (no host sync); each rank then ranks the full
    vector itself, so every rank derives the same global choice. Returns a bool mask
    shaped like ``counts``.
    """
    group = _group_of(group_name)
    chunk = math.ceil(global_features / group.size())
    f = counts.shape[0]
    # Slices are torch.chunk's: ceil(F/N) each, the last ones shorter or empty. Padding with
    # -1 ranks below every real count, and it sits past index F, so it is never chosen.
    mine = counts if f == chunk else torch.cat((counts, counts.new_full((chunk - f,), -1)))
    everyone = counts.new_empty(chunk * group.size())
    torch.distributed.all_gather_into_tensor(everyone, mine.contiguous(), group=group)
    # Rank-major concatenation of the slices = the global feature order.
    order = torch.sort(everyone, descending=True, stable=True).indices[:n_dense]
    dense = torch.zeros(everyone.shape[0], dtype=torch.bool, device=counts.device).index_fill_(0, order, True)
    return dense[offset : offset + f]
