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
from hf_sparse.model.select_2to4 import NM_PATTERNS  # noqa: E402
from tests.test_nm_telemetry import reference_would_drop  # noqa: E402
from tests.test_telemetry import RandomTokens  # noqa: E402


def main(out_path):
    torch.manual_seed(0)
    # 2:4 in its dense warm-up: the forward is the dense relu2 FFN, and 2:4 and the N:M
    # patterns report what they would drop.
    config = tiny_config(squ_relu="relu2", activation_2by4=True, activation_dense_warmup_steps=100)
    model = SparseLlamaForCausalLM(config)
    # per layer: zeros, elements, non-zeros, then what each of NM_PATTERNS would drop
    counts = torch.zeros(config.num_hidden_layers, 3 + len(NM_PATTERNS), dtype=torch.float64)

    def count(layer_idx):
        def hook(module, args, output):
            if module.training and torch._C._current_graph_task_id() == -1:
                act = torch.relu(output.detach()) ** 2
                counts[layer_idx, 0] += (act == 0).sum()
                counts[layer_idx, 1] += act.numel()
                counts[layer_idx, 2] += (act != 0).sum()
                for k, (n, m) in enumerate(NM_PATTERNS):
                    counts[layer_idx, 3 + k] += reference_would_drop(act, n, m)

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
    gathered_nm = [None] * dist.get_world_size()
    dist.all_gather_object(gathered_nm, (counts[:, 3:] / counts[:, 2:3]).tolist())
    if dist.get_rank() == 0:
        row = next(r for r in trainer.state.log_history if "loss" in r)
        result = {
            "world_size": dist.get_world_size(),
            "logged": [row[f"sparsity_relu/layer_{i}"] for i in range(config.num_hidden_layers)],
            "pooled": (pooled_counts[:, 0] / pooled_counts[:, 1]).tolist(),
            "logged_nm": [
                [row[f"sparsity_nm/{n}:{m}/layer_{i}"] for n, m in NM_PATTERNS] for i in range(config.num_hidden_layers)
            ],  # fmt: skip
            "pooled_nm": (pooled_counts[:, 3:] / pooled_counts[:, 2:3]).tolist(),
            "local_nm": gathered_nm,
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
