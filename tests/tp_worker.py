"""Run by test_tensor_parallel under `torchrun --nproc_per_node 2` (CPU/gloo): for each mode,
a tiny float64 sparse_llama saved by rank 0 is loaded twice in every rank, whole and with
`DistributedConfig(tp_plan="auto")`, and the two are compared: logits, greedy generation,
the training loss, every gradient (gathered from its shards; its layout must be its
parameter's) and the pooled telemetry. Then the refusals (weight 2:4; an FFN width whose
per-rank slices would split 2:4 groups). Rank 0 writes the verdicts as JSON."""

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from transformers import DistributedConfig
from transformers.utils import logging as transformers_logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_sparse import SparseLlamaForCausalLM, set_training_step, sparsity_metrics  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

TWO_BY_FOUR = dict(squ_relu="relu2", activation_2by4=True, activation_dense_warmup_steps=0)
LOW_RANK = dict(loro_scope="all", loro_attn_rank=4, loro_mlp_rank=4)
# Every recipe here is split-invariant: 2:4 groups lie along the FFN width and stay on one
# rank; the "exact" and token-wise "naive" backwards act per feature; the permutation is
# over tokens. (split_gemm ranks its dense features per rank, mvue draws per rank.)
MODES = {
    "silu": dict(squ_relu="silu"),
    "relu2": dict(squ_relu="relu2"),
    "relu2_2by4": dict(TWO_BY_FOUR, activation_backward="exact", permute_2by4=True),
    "low_rank_silu": dict(LOW_RANK, squ_relu="silu"),
    "low_rank_relu2_2by4": dict(LOW_RANK, **TWO_BY_FOUR, activation_backward="naive", permute_2by4=False),
}
REFUSED = {
    "weight_2by4": dict(squ_relu="relu2", weight_2by4=True),
    # 36 features over 2 ranks: slices of 18, not a multiple of 4.
    "misaligned_2by4": dict(TWO_BY_FOUR, nongated_intermediate_size=36),
}


def _save(directory, overrides):
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        SparseLlamaForCausalLM(tiny_config(**overrides)).double().save_pretrained(directory)
    dist.barrier()


def _max_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _check_mode(directory, overrides):
    _save(directory, overrides)
    reference = SparseLlamaForCausalLM.from_pretrained(directory, dtype=torch.float64)
    model = SparseLlamaForCausalLM.from_pretrained(
        directory, dtype=torch.float64, distributed_config=DistributedConfig(tp_plan="auto")
    )
    ids = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    result = {
        "sharded": sorted(n for n, p in model.named_parameters() if hasattr(p, "placements")),
        "plan": sorted(model.tp_plan.items()),
    }

    with torch.no_grad():
        result["logits_error"] = _max_error(model(ids).logits, reference(ids).logits)
    generate = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected_tokens = reference.generate(ids, **generate)
    result["generate_equal"] = torch.equal(model.generate(ids, **generate), expected_tokens)
    result["generate_static_equal"] = torch.equal(
        model.generate(ids, cache_implementation="static", **generate), expected_tokens
    )

    for m in (model, reference):
        m.train()
        set_training_step(m, 1)
    loss = model(ids, labels=ids).loss
    expected_loss = reference(ids, labels=ids).loss
    loss.backward()
    expected_loss.backward()
    result["loss_error"] = abs(loss.item() - expected_loss.item())
    reference_params = dict(reference.named_parameters())
    grad_errors, bad_layouts = {}, []
    for name, param in model.named_parameters():
        grad = param.grad
        if getattr(grad, "placements", None) != getattr(param, "placements", None):
            bad_layouts.append(f"{name}: param {getattr(param, 'placements', None)}, "
                               f"grad {getattr(grad, 'placements', None)}")
        full = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        grad_errors[name] = _max_error(full, reference_params[name].grad)
    result["grad_errors"] = grad_errors
    result["bad_grad_layouts"] = bad_layouts
    # Both ranks ran the same batch: the reference's pooled counts are twice one model's,
    # the TP model's are each rank's own features, summed.
    result["telemetry"] = sparsity_metrics(model)
    result["expected_telemetry"] = sparsity_metrics(reference)
    return result


def _check_refused(directory, overrides):
    _save(directory, overrides)
    try:
        SparseLlamaForCausalLM.from_pretrained(directory, distributed_config=DistributedConfig(tp_plan="auto"))
    except ValueError as error:
        return str(error)
    return None


def _check_op_refuses_straddling_groups():
    """The op's own guard, for weights sharded by other means than from_pretrained."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hf_sparse.model.sparse_ffn import relu2_2to4_ffn

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)  # distribute_tensor needs the same full tensor on every rank
    w_up = distribute_tensor(torch.randn(36, 8), mesh, [Shard(0)])
    w_down = distribute_tensor(torch.randn(8, 36), mesh, [Shard(1)])
    try:
        relu2_2to4_ffn(torch.randn(5, 8), w_up, w_down)
    except ValueError as error:
        return str(error)
    return None


def main(out_path, work_dir):
    dist.init_process_group("gloo")
    transformers_logging.set_verbosity_error()
    results, refused = {}, {}
    for mode, overrides in MODES.items():
        try:
            results[mode] = _check_mode(os.path.join(work_dir, mode), overrides)
        except Exception:  # noqa: BLE001 - reported per mode, the other modes still run
            results[mode] = {"error": traceback.format_exc()}
            print(results[mode]["error"], file=sys.stderr)
    for name, overrides in REFUSED.items():
        refused[name] = _check_refused(os.path.join(work_dir, name), overrides)
    refused["op_straddling_groups"] = _check_op_refuses_straddling_groups()
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump({"modes": results, "refused": refused}, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from tests.dist_exit import run_then_exit

    run_then_exit(main, sys.argv[1], sys.argv[2])
