"""Training-step cost of 2:4 weights (S-STE, MLP) vs dense weights, same model, interleaved.

    python benchmarks/weight24_step.py                          # configs/llama_quickstart.json shapes
    python benchmarks/weight24_step.py --model-config configs/llama_60m.json --batch 4 --seq 256

One forward+backward+AdamW step of a relu2 model on random tokens. The dense and the 2:4
copy start from the same weights and alternate block by block (drifts of a shared machine
hit both); the figure is the median over blocks of 2:4 / dense. Imports only torch and
hf_sparse.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from machine import describe_machine, interleaved_step_times  # benchmarks/machine.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparse import SparseLlamaConfig, SparseLlamaForCausalLM, set_training_step  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="configs/llama_quickstart.json")
    p.add_argument("--scope", default="mlp", choices=("mlp", "attn", "all"))
    p.add_argument("--method", default="s_ste", choices=("s_ste", "ste"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps-per-block", type=int, default=4)
    args = p.parse_args(argv)

    with open(args.model_config) as fh:
        model_cfg = {**json.load(fh), "squ_relu": "relu2"}
    torch.manual_seed(0)
    dense = SparseLlamaForCausalLM(SparseLlamaConfig(**model_cfg)).train()
    sparse_cfg = SparseLlamaConfig(
        **model_cfg, weight_2by4=True, weight_2by4_scope=args.scope, weight_sparse_method=args.method
    )
    sparse = SparseLlamaForCausalLM(sparse_cfg).train()
    sparse.load_state_dict(dense.state_dict(), strict=False)  # same start (scales fixed on step 1)
    set_training_step(sparse, 1, 1000)
    runs = {
        name: (m, torch.optim.AdamW(m.parameters(), lr=1e-3)) for name, m in (("dense", dense), ("weight24", sparse))
    }
    ids = torch.randint(0, model_cfg["vocab_size"], (args.batch, args.seq))

    def step(name):
        model, opt = runs[name]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in runs:
        for _ in range(3):
            step(name)
    measured = interleaved_step_times(step, ("dense", "weight24"), args.blocks, args.steps_per_block)
    times, ratios = measured["times"], measured["ratios"]  # ratios: weight24 / dense
    print(f"machine: {describe_machine(torch.device('cpu'))}")
    print(
        f"torch {torch.__version__}, {args.model_config}, relu2, weight 2:4 {args.method} on {args.scope}, "
        f"batch {args.batch}x{args.seq}"
    )
    for name, ts in times.items():
        print(f"{name:>9}: median {statistics.median(ts) * 1e3:.0f} ms/step (n={len(ts)})")
    print("per-block 2:4/dense:", " ".join(f"{r:.2f}" for r in ratios))
    print(f"weight-2:4 step / dense step (median of blocks): {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
