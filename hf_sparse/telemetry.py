"""Sparsity telemetry: per-layer counts kept on device -> one host transfer per read.

The MLPs accumulate activation counts during training forwards (see
`SparseLlamaMLP.activation_stats`); this module turns them, plus exact-zero counts of the
weights, into the flat `dict[str, float]` the Trainer logs.
"""

import torch
import torch.distributed as dist
from torch import nn

from .modeling_sparse_llama import (
    NUM_ACTIVATION_STATS,
    STAT_DROPPED_24,
    STAT_TOTAL,
    STAT_ZEROS,
    sparse_mlps,
)
from .sparse_ffn import count_nonzero

# Contract names of each decoder linear, keyed by its module path inside the layer.
WEIGHT_METRIC_NAMES = {
    "self_attn.q_proj": "attn_q_proj",
    "self_attn.k_proj": "attn_k_proj",
    "self_attn.v_proj": "attn_v_proj",
    "self_attn.o_proj": "attn_o_proj",
    "mlp.gate_proj": "mlp_gate_proj",
    "mlp.up_proj": "mlp_up_proj",
    "mlp.down_proj": "mlp_down_proj",
}
# Low-rank linears hold two factors; each gets its own metric.
LOW_RANK_FACTORS = (("weight_in", "_in"), ("weight_out", "_out"))


def _decoder_layers(model: nn.Module):
    """(layer_idx, decoder layer) pairs, found from each sparse MLP's position."""
    layers = {}
    for name, module in model.named_modules():
        mlp = getattr(module, "mlp", None)
        if mlp is not None and hasattr(mlp, "layer_idx") and hasattr(module, "self_attn"):
            layers[mlp.layer_idx] = module
    return sorted(layers.items())


def _weight_counts(model: nn.Module):
    """Names and a device tensor of [zeros, numel] rows for every decoder weight matrix."""
    names, rows = [], []
    for layer_idx, layer in _decoder_layers(model):
        for path, metric in WEIGHT_METRIC_NAMES.items():
            linear = layer.get_submodule(path) if _has_submodule(layer, path) else None
            if linear is None:
                continue
            factors = [(attr, suffix) for attr, suffix in LOW_RANK_FACTORS if hasattr(linear, attr)]
            for attr, suffix in factors or [("weight", "")]:
                weight = getattr(linear, attr).detach()
                names.append(f"weight_sparsity/layer_{layer_idx}/{metric}{suffix}")
                numel = torch.tensor(weight.numel(), dtype=torch.float64, device=weight.device)
                rows.append(torch.stack([(weight.numel() - count_nonzero(weight)).double(), numel]))
    return names, rows


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def sparsity_metrics(
    model: nn.Module, reset: bool = True, *, activations: bool = True, weights: bool = True
) -> dict[str, float]:
    """Read the sparsity metrics of `model` (plain, DDP- or FSDP-wrapped).

    One device->host transfer for all layers. Under `torch.distributed` every rank must
    call this together: counts are summed across ranks before fractions are taken, so
    every rank returns the pooled value. `reset=True` starts a new activation window.
    """
    mlps = sparse_mlps(model)
    if not mlps:
        return {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    parts, layout = [], []  # layout: (kind, key, n_rows)

    if activations:
        for layer_idx, mlp in mlps:
            if mlp.squ_relu == "silu":
                continue
            stats = mlp.activation_stats
            if stats is None:
                stats = torch.zeros(NUM_ACTIVATION_STATS, dtype=torch.float64, device=device)
            parts.append(stats.to(device))
            layout.append(("activation", layer_idx, mlp.config.activation_2by4))
    weight_names = []
    if weights:
        weight_names, weight_rows = _weight_counts(model)
        parts.extend(row.to(device) for row in weight_rows)
    if not parts:
        return {}

    flat = torch.cat(parts)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    values = flat.tolist()  # the one host sync of a logging step

    if reset:
        for _, mlp in mlps:
            if mlp.activation_stats is not None:
                mlp.activation_stats[:STAT_DROPPED_24 + 1].zero_()  # the guard owns the rest

    metrics: dict[str, float] = {}
    relu_fracs, drop_fracs, offset = [], [], 0
    for _, layer_idx, has_2by4 in layout:
        zeros, total, dropped = (values[offset + k] for k in (STAT_ZEROS, STAT_TOTAL, STAT_DROPPED_24))
        offset += NUM_ACTIVATION_STATS
        if total <= 0:  # no training forward in this window (e.g. an eval-only log row)
            continue
        relu_fracs.append(zeros / total)
        metrics[f"sparsity_relu/layer_{layer_idx}"] = relu_fracs[-1]
        if has_2by4:
            nonzeros = total - zeros
            drop_fracs.append(dropped / nonzeros if nonzeros > 0 else 0.0)
            metrics[f"sparsity_24/layer_{layer_idx}"] = drop_fracs[-1]
    if relu_fracs:
        metrics["sparsity_relu/mean_across_layers"] = sum(relu_fracs) / len(relu_fracs)
    if drop_fracs:
        metrics["sparsity_24/mean_across_layers"] = sum(drop_fracs) / len(drop_fracs)
    for name in weight_names:
        zeros, total = values[offset], values[offset + 1]
        offset += 2
        metrics[name] = zeros / total if total > 0 else 0.0
    return metrics


__all__ = ["sparsity_metrics"]
