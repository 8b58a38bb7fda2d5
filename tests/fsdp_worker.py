"""Run by test_distributed under `torchrun --nproc_per_node 2` (CPU/gloo): the tiny relu2
model with the 2:4 recipe (and optionally low-rank linears or 2:4 weights) wrapped in FSDP FULL_SHARD
with one unit per decoder layer, as configs/accelerate/fsdp.yaml does. Compares, against
an unwrapped copy in the same process, the weight sparsity of every original matrix, the
pooled activation counts and every gradient; writes the verdicts as JSON from rank 0."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_sparse import SparseLlamaForCausalLM, set_training_step, sparsity_metrics  # noqa: E402
from hf_sparse.model.modeling_sparse_llama import SparseLlamaDecoderLayer  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def _batch(rank, vocab):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(100 + rank))


def model_and_reference(config, world):
    """The model to shard (exact zeros planted in every matrix, so each shard holds some), an
    unwrapped copy that has run backward on every rank's batch with gradients averaged as
    FSDP averages them, and its sparsity metrics (every rank holds the same all-batch
    counts; the cross-rank sum scales both sides alike)."""
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.model.layers.parameters():
            if param.dim() == 2:
                param.mul_(torch.rand(param.shape, generator=torch.Generator().manual_seed(param.numel())) > 0.3)
    reference = SparseLlamaForCausalLM(config)
    reference.load_state_dict(model.state_dict())
    set_training_step(reference, 1)
    for r in range(world):
        ids = _batch(r, config.vocab_size)
        (reference(input_ids=ids, labels=ids).loss / world).backward()
    return model, reference, sparsity_metrics(reference)


def main(out_path, variant):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    extra = {
        "full": {},
        "low_rank": dict(loro_scope="all", loro_attn_rank=4, loro_mlp_rank=4),
        "weight24": dict(weight_2by4=True, weight_2by4_scope="all"),  # 2:4 weights under FSDP
    }[variant]
    config = tiny_config(activation_2by4=True, activation_dense_warmup_steps=0, **extra)
    model, reference, expected = model_and_reference(config, world)

    wrapped = FSDP(
        model,
        auto_wrap_policy=ModuleWrapPolicy({SparseLlamaDecoderLayer}),
        use_orig_params=True,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=torch.device("cpu"),
    )
    set_training_step(wrapped, 1)
    ids = _batch(rank, config.vocab_size)
    wrapped(input_ids=ids, labels=ids).loss.backward()
    shard_numels = [p.numel() for p in wrapped.parameters()]
    got = sparsity_metrics(wrapped)

    grad_errors = {}
    with FSDP.summon_full_params(wrapped, with_grads=True):
        reference_params = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            ref_grad = reference_params[name.replace("_fsdp_wrapped_module.", "")].grad
            grad_errors[name] = float((param.grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-12))

    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(
                {
                    "expected": expected,
                    "got": got,
                    "grad_errors": grad_errors,
                    "sharded": min(shard_numels) < max(p.numel() for p in reference.parameters()),
                },
                handle,
            )
    del wrapped
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from tests.dist_exit import run_then_exit

    run_then_exit(main, sys.argv[1], sys.argv[2])
