"""Sparsity telemetry: per-layer counts kept on device -> one host transfer per read.

The MLPs accumulate activation counts during training forwards (see
`SparseLlamaMLP.activation_stats`); this module turns them, plus exact-zero counts of the
weights the forward uses and (optionally) 2:4 mask flip counts, into the flat
`dict[str, float]` the Trainer logs.
"""

import logging

import torch
import torch.distributed as dist
from torch import nn

from ... import metric_keys as keys
from ...model.modeling_sparse_llama import (
    NUM_ACTIVATION_STATS,
    STAT_DROPPED_24,
    STAT_DROPPED_NM,
    STAT_FORWARDS,
    STAT_L1,
    STAT_TOTAL,
    STAT_ZEROS,
    WINDOW_STATS,
    sparse_mlps,
)
from ...model.select_2to4 import NM_PATTERNS, count_nonzero

logger = logging.getLogger(__name__)

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
_FACTOR_SUFFIX = dict(LOW_RANK_FACTORS, weight="")

# Plain (non-buffer) attribute of a 2:4-weight linear holding the bit-packed keep masks of
# the previous flip-rate read: on device, never in state_dict or checkpoints.
PREVIOUS_MASKS_ATTR = "_flip_rate_previous_masks"

# Whether this process already warned about sharded 2:4 weights (once, not per matrix).
_warned_sharded = False


def _decoder_layers(model: nn.Module):
    """(layer_idx, decoder layer) pairs, found from each sparse MLP's position."""
    layers = {}
    for name, module in model.named_modules():
        mlp = getattr(module, "mlp", None)
        if mlp is not None and hasattr(mlp, "layer_idx") and hasattr(module, "self_attn"):
            layers[mlp.layer_idx] = module
    return sorted(layers.items())


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _decoder_linears(model: nn.Module):
    """("layer_{i}/<matrix>", linear, factor attribute names) for every decoder linear."""
    for layer_idx, layer in _decoder_layers(model):
        for path, metric in WEIGHT_METRIC_NAMES.items():
            if not _has_submodule(layer, path):
                continue
            linear = layer.get_submodule(path)
            factors = [attr for attr, _ in LOW_RANK_FACTORS if hasattr(linear, attr)] or ["weight"]
            yield f"layer_{layer_idx}/{metric}", linear, factors


def _is_full_matrix(tensor) -> bool:
    """False for what a sharding wrapper leaves in the module: FSDP1's flat 1-D shard views
    (use_orig_params) or an FSDP2/TP DTensor. 2:4 groups only mean something on the whole
    2-D matrix, so those fall back to the stored weight and get no flip rate."""
    return tensor.dim() == 2 and not hasattr(tensor, "placements")


def _sparse_full(linear: nn.Module, factors, key: str) -> bool:
    """Whether `linear` is a 2:4-weight linear whose masters are whole matrices here."""
    if not hasattr(linear, "forward_weights"):
        return False
    if all(_is_full_matrix(getattr(linear, attr)) for attr in factors):
        return True
    global _warned_sharded
    if not _warned_sharded:
        _warned_sharded = True
        logger.warning(
            "2:4 weights are sharded on this rank (FSDP/DTensor; first: %s): their weight_sparsity "
            "counts the stored dense-master shard's zeros and they get no flip_rate.",
            key,
        )
    return False


def _weight_zero_counts(model: nn.Module):
    """Metric names, device zero counts and element counts of every decoder weight matrix,
    as the forward uses it (2:4-weight linears: `forward_weights()`)."""
    names, zeros, numels = [], [], []
    for key, linear, factors in _decoder_linears(model):
        if _sparse_full(linear, factors, key):
            # The effective 2:4 weight while sparse_weight_on, else the dense master itself.
            tensors = linear.forward_weights()
        else:
            tensors = {attr: getattr(linear, attr).detach() for attr in factors}
        for attr in factors:
            # An FSDP2/TP parameter is a DTensor: count this rank's shard (`to_local`), so
            # that the cross-rank sum in sparsity_metrics adds up to the whole matrix.
            # (A DTensor's own numel() is the global one, and its counts are DTensors that
            # cannot be concatenated with the plain activation counts. A replicated DTensor
            # is counted once per rank in both terms of the fraction, which leaves it as is.)
            weight = tensors[attr]
            if hasattr(weight, "to_local"):
                weight = weight.to_local()
            names.append(f"{keys.WEIGHT_ZEROS}/{key}{_FACTOR_SUFFIX[attr]}")
            zeros.append(weight.numel() - count_nonzero(weight))
            numels.append(weight.numel())
    return names, zeros, numels


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as flat uint8, 8 entries a byte (zero-padded): 1/8 of a bool tensor."""
    flat = mask.reshape(-1).view(torch.uint8)
    tail = -flat.numel() % 8
    if tail:
        flat = torch.cat([flat, flat.new_zeros(tail)])
    # Shifts from arange, not a host list: copying a list to a GPU would wait for the device.
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) << shifts).sum(-1, dtype=torch.uint8)


def _count_set_bits(packed: torch.Tensor) -> torch.Tensor:
    """Total number of 1 bits of a uint8 tensor (SWAR popcount: no lookup, no host sync)."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    x = (x + (x >> 4)) & 0x0F
    return x.sum(dtype=torch.int64)


def _current_masks(model: nn.Module):
    """(flip metric name, linear, factor, packed keep mask, entries) of every whole 2:4 matrix."""
    for key, linear, factors in _decoder_linears(model):
        if not _sparse_full(linear, factors, key):
            continue
        for attr, mask in linear.weight_masks().items():
            yield f"{keys.FLIP_RATE}/{key}{_FACTOR_SUFFIX[attr]}", linear, attr, _pack_bits(mask), mask.numel()


def _store_mask(linear: nn.Module, attr: str, packed: torch.Tensor) -> None:
    # object.__setattr__ keeps the dict out of nn.Module's parameter/buffer bookkeeping.
    previous = linear.__dict__.get(PREVIOUS_MASKS_ATTR)
    if previous is None:
        previous = {}
        object.__setattr__(linear, PREVIOUS_MASKS_ATTR, previous)
    previous[attr] = packed


def snapshot_weight_masks(model: nn.Module) -> None:
    """Store every 2:4-weight linear's current keep masks as the flip-rate baseline.

    `SparsityCallback(flip_rate=True)` calls this at `on_train_begin` (after a resume:
    the restored weights' masks), so the first training log row already has a flip rate.
    Device work only, no host sync.
    """
    for _, linear, attr, packed, _ in _current_masks(model):
        _store_mask(linear, attr, packed)


def _flip_counts(model: nn.Module, update: bool):
    """Flip metric names, device counts of changed mask entries and entry counts, against
    the stored masks; matrices without a (matching) stored mask only get one stored."""
    names, changed, numels = [], [], []
    for name, linear, attr, packed, numel in _current_masks(model):
        previous = linear.__dict__.get(PREVIOUS_MASKS_ATTR, {}).get(attr)
        # A shape or device change (a resized or moved model) restarts the baseline.
        matched = previous is not None and previous.shape == packed.shape and previous.device == packed.device
        if matched:
            names.append(name)
            changed.append(_count_set_bits(previous ^ packed))
            numels.append(numel)
        if update or not matched:
            _store_mask(linear, attr, packed)
    return names, changed, numels


def sparsity_metrics(
    model: nn.Module,
    reset: bool = True,
    *,
    activations: bool = True,
    weights: bool = True,
    flip_rate: bool = False,
    pooled_drop: bool = False,
) -> dict[str, float]:
    """Read the sparsity metrics of `model` (plain, DDP- or FSDP-wrapped).

    One device->host transfer for all layers. Under `torch.distributed` every rank must
    call this together: counts are summed across ranks before fractions are taken, so
    every rank returns the pooled value. `reset=True` starts a new activation window.

    `weight_sparsity/...` is the exact-zero fraction of the weight the forward uses: for a
    2:4-weight linear, its `forward_weights()` (≈0.5 while `sparse_weight_on`, the dense
    master's zeros otherwise); the stored weight elsewhere. A 2:4 weight that a sharding
    wrapper left as a flat shard or DTensor on this rank is counted as stored (warned once).

    `flip_rate=True` adds, for every 2:4-weight matrix, `flip_rate/layer_{i}/<matrix>[_in|_out]`
    = keep-mask entries changed since the previous read / entries, plus `flip_rate/mean`
    (mean over matrices), `flip_rate/max` and `flip_rate/total` (all changed / all entries).
    The masks are those of the dense masters, so dense phases (before the start step, the
    dense tail) report how the mask *would* move. The previous masks are kept bit-packed on
    device as a plain attribute of each linear (never in `state_dict`); `reset=True`
    replaces them with the current ones. A matrix with no stored mask yet reports nothing
    this time (its current mask becomes the baseline) — `snapshot_weight_masks` sets one
    up front, which `SparsityCallback(flip_rate=True)` does at train begin, so after a
    resume the first value is measured against the restored weights' masks.

    2:4 MLPs that count N:M (`count_nm_stats`, on by default; `SparsityCallback(nm_metrics=)`)
    add `sparsity_nm/<N>:<M>/layer_{i}` and `.../mean_across_layers` for each pattern of
    `NM_PATTERNS` (4:8, 8:16): the fraction of non-zero activations that keeping the N
    largest of every M consecutive features would drop, on the same forwards as
    `sparsity_24/*` (so, per layer and window, 8:16 <= 4:8 <= 2:4).

    `pooled_drop=True` (with `activations`) adds `activation_auto_switch/drop`: the non-zero
    activations the 2:4 rule dropped (or, during the dense warm-up, would drop) over all
    2:4 layers and ranks, divided by all their non-zero activations — what the auto switch reads.
    """
    mlps = sparse_mlps(model)
    if not mlps:
        return {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    layout = _activation_layout(mlps) if activations else []
    parts = [_activation_stats(mlp, device) for _, mlp, _, _ in layout]
    # Weight zeros and flip counts: one count per name, then the element counts, on device
    # too so that FSDP shards of different sizes pool correctly across ranks.
    count_names, counts, numels = [], [], []
    for wanted, read in ((weights, _weight_zero_counts), (flip_rate, lambda m: _flip_counts(m, update=reset))):
        if wanted:
            names, found, sizes = read(model)
            count_names, counts, numels = count_names + names, counts + found, numels + sizes
    if counts:
        parts.append(torch.stack([c.to(device=device, dtype=torch.float64) for c in counts]))
        # Fills, not torch.tensor(list): a host->GPU copy of a list synchronises the stream.
        parts.append(torch.stack([torch.full((), float(n), dtype=torch.float64, device=device) for n in numels]))
    if not parts:
        return {}

    flat = torch.cat(parts)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    values = flat.tolist()  # the one host sync of a logging step

    if reset:
        for _, mlp in mlps:
            if mlp.activation_stats is not None:
                mlp.activation_stats[list(WINDOW_STATS)] = 0  # the guard owns the rest

    offset = len(layout) * NUM_ACTIVATION_STATS
    metrics = _activation_metrics(values[:offset], layout, pooled_drop)
    metrics.update(_count_metrics(count_names, values[offset:]))
    return metrics


def _activation_layout(mlps) -> list:
    """(layer_idx, mlp, has_2by4, counts_nm) of the MLPs with a ReLU/ReLU² activation to count."""
    return [
        (idx, mlp, mlp.config.activation_2by4, mlp.config.activation_2by4 and mlp.count_nm_stats)
        for idx, mlp in mlps
        if mlp.squ_relu != "silu"
    ]


def _activation_stats(mlp, device) -> torch.Tensor:
    stats = mlp.activation_stats
    if stats is None:  # no training forward yet
        return torch.zeros(NUM_ACTIVATION_STATS, dtype=torch.float64, device=device)
    return stats.to(device)


def _activation_metrics(values: list, layout: list, pooled_drop: bool) -> dict[str, float]:
    """The activation metrics from the pooled stats of the layers in `layout`, one
    `NUM_ACTIVATION_STATS` row each."""
    metrics: dict[str, float] = {}
    relu_fracs, drop_fracs, l1_terms = [], [], []
    nm_fracs = {pattern: [] for pattern in NM_PATTERNS}
    all_dropped = all_nonzeros = 0.0
    for row, (layer_idx, _, has_2by4, counts_nm) in enumerate(layout):
        stats = values[row * NUM_ACTIVATION_STATS : (row + 1) * NUM_ACTIVATION_STATS]
        zeros, total, dropped = stats[STAT_ZEROS], stats[STAT_TOTAL], stats[STAT_DROPPED_24]
        if stats[STAT_FORWARDS] > 0:
            l1_terms.append(stats[STAT_L1] / stats[STAT_FORWARDS])  # this layer's mean term per training forward
        if total <= 0:  # no training forward in this window (e.g. an eval-only log row)
            continue
        relu_fracs.append(zeros / total)
        metrics[keys.layer_key(keys.ACTIVATION_ZEROS, layer_idx)] = relu_fracs[-1]
        if has_2by4:
            nonzeros = total - zeros
            drop_fracs.append(dropped / nonzeros if nonzeros > 0 else 0.0)
            metrics[keys.layer_key(keys.DROP_24, layer_idx)] = drop_fracs[-1]
            all_dropped += dropped
            all_nonzeros += nonzeros
        for k, pattern in enumerate(NM_PATTERNS if counts_nm else ()):
            nm_fracs[pattern].append(stats[STAT_DROPPED_NM + k] / nonzeros if nonzeros > 0 else 0.0)
            metrics[keys.layer_key(keys.nm_family(*pattern), layer_idx)] = nm_fracs[pattern][-1]
    if l1_terms:
        # What activation_l1 added to the loss per forward (all layers), pooled over ranks.
        metrics[keys.ACTIVATION_L1_LOSS] = sum(l1_terms)
    if pooled_drop and drop_fracs:
        metrics[keys.AUTO_SWITCH_DROP] = all_dropped / all_nonzeros if all_nonzeros > 0 else 0.0
    if relu_fracs:
        metrics[keys.mean_key(keys.ACTIVATION_ZEROS)] = sum(relu_fracs) / len(relu_fracs)
    if drop_fracs:
        metrics[keys.mean_key(keys.DROP_24)] = sum(drop_fracs) / len(drop_fracs)
    for pattern, fracs in nm_fracs.items():
        if fracs:
            metrics[keys.mean_key(keys.nm_family(*pattern))] = sum(fracs) / len(fracs)
    return metrics


def _count_metrics(count_names: list, values: list) -> dict[str, float]:
    """Weight-zero and flip fractions from the pooled counts (one per name, then one
    element count per name), and the flip-rate summaries."""
    n = len(count_names)
    metrics: dict[str, float] = {}
    flips, flipped, flip_entries = [], 0.0, 0.0
    for name, count, total in zip(count_names, values[:n], values[n : 2 * n]):
        metrics[name] = count / total if total > 0 else 0.0
        if keys.in_family(name, keys.FLIP_RATE):
            flips.append(metrics[name])
            flipped += count
            flip_entries += total
    if flips:
        metrics[keys.FLIP_RATE_MEAN] = sum(flips) / len(flips)
        metrics[keys.FLIP_RATE_MAX] = max(flips)
        metrics[keys.FLIP_RATE_TOTAL] = flipped / flip_entries if flip_entries > 0 else 0.0
    return metrics


__all__ = ["sparsity_metrics", "snapshot_weight_masks"]
