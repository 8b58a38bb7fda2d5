"""Run by test_telemetry under `torchrun --nproc_per_node 2`: trains the tiny relu2 model
with the stock Trainer (different data on each rank via its distributed sampler) and
writes what was logged next to an independent per-rank count pooled by hand."""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_sparse import SparseLlamaForCausalLM, SparsityCallback  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.test_telemetry import RandomTokens  # noqa: E402


def main(out_path):
    torch.manual_seed(0)
    config = tiny_config(squ_relu="relu2")
    model = SparseLlamaForCausalLM(config)
    counts = torch.zeros(config.num_hidden_layers, 2, dtype=torch.float64)

    def count(layer_idx):
        def hook(module, args, output):
            if module.training and torch._C._current_graph_task_id() == -1:
                act = torch.relu(output.detach()) ** 2
                counts[layer_idx, 0] += (act == 0).sum()
                counts[layer_idx, 1] += act.numel()

        return hook

    for i, layer in enumerate(model.model.layers):
        layer.mlp.up_proj.register_forward_hook(count(i))

    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out_path), "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,  # without it each CPU rank trains alone (DESIGN §4); nothing telemetry-specific
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64), callbacks=[SparsityCallback()])
    trainer.train()

    local = (counts[:, 0] / counts[:, 1]).tolist()
    pooled_counts = counts.clone()
    dist.all_reduce(pooled_counts)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if dist.get_rank() == 0:
        row = next(r for r in trainer.state.log_history if "loss" in r)
        result = {
            "world_size": dist.get_world_size(),
            "logged": [row[f"sparsity_relu/layer_{i}"] for i in range(config.num_hidden_layers)],
            "pooled": (pooled_counts[:, 0] / pooled_counts[:, 1]).tolist(),
            "local": gathered,
        }
        with open(out_path, "w") as handle:
            json.dump(result, handle)
    # Release the DDP-wrapped model before closing the group, then close it explicitly:
    # tearing either down at interpreter exit aborted or hung rank 0 about 1 run in 5.
    del trainer, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from tests.dist_exit import run_then_exit

    run_then_exit(main, sys.argv[1])
