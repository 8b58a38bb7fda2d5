"""Run by test_accelerate under `torchrun --nproc_per_node 2` (CPU/gloo): the sharding of
configs/accelerate/fsdp2.yaml done by hand, since accelerate's FSDP refuses to start
without an accelerator: FSDP2 `fully_shard` on every SparseLlamaDecoderLayer, then on the
root. For the tiny relu2 model with the 2:4 activation recipe, dense and with low-rank
linears, it compares against an unwrapped copy in the same process: the weight sparsity of
every original matrix read from the DTensor shards, the pooled activation counts, and
every gradient (the shards' `full_tensor()`). Both variants run in one launch (a launch
costs more than the work); rank 0 writes {variant: verdicts} as JSON."""

import json
import os
import sys

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_sparse import set_training_step, sparsity_metrics  # noqa: E402
from hf_sparse.model.modeling_sparse_llama import SparseLlamaDecoderLayer  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.fsdp_worker import _batch, model_and_reference  # noqa: E402

VARIANTS = {
    "full": {},
    "low_rank": dict(loro_scope="all", loro_attn_rank=4, loro_mlp_rank=4),
}


def compare(variant, mesh):
    rank, world = dist.get_rank(), dist.get_world_size()
    config = tiny_config(activation_2by4=True, activation_dense_warmup_steps=0, **VARIANTS[variant])
    model, reference, expected = model_and_reference(config, world)

    # fsdp2.yaml's layout: one unit per decoder layer, the rest (embeddings, norm, head) in the root.
    for module in model.modules():
        if isinstance(module, SparseLlamaDecoderLayer):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    set_training_step(model, 1)
    ids = _batch(rank, config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    all_dtensors = all(isinstance(p, DTensor) for p in params.values())
    # Telemetry between steps, where the Trainer's callback reads it: parameters are shards.
    got = sparsity_metrics(model)

    grad_errors = {}
    reference_params = dict(reference.named_parameters())
    for name, param in params.items():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        ref_grad = reference_params[name].grad
        grad_errors[name] = float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-12))
    local_numels = [p.to_local().numel() for p in params.values() if isinstance(p, DTensor)]
    return {
        "expected": expected,
        "got": got,
        "grad_errors": grad_errors,
        "all_dtensors": all_dtensors,
        # Each rank holds about half of the matrix: the parameters really were split.
        "sharded": sum(local_numels) < sum(p.numel() for p in reference.parameters()),
    }


def main(out_path):
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {variant: compare(variant, mesh) for variant in VARIANTS}
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from tests.dist_exit import run_then_exit

    run_then_exit(main, sys.argv[1])
