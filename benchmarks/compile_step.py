"""Training step under torch.compile (inductor) vs eager, same model, interleaved blocks.

    python benchmarks/compile_step.py                  # relu2 + 2:4, configs/llama_quickstart.json shapes
    python benchmarks/compile_step.py --mode dense     # relu2 without 2:4
    python benchmarks/compile_step.py --compile-stages # also compile the 2:4 op's elementwise stages

One forward+backward+AdamW step on random tokens (batch x seq). Eager and compiled copies
of the same model alternate block by block, so drifts of a shared machine hit both; the
figure is the median over blocks of eager/compiled. Imports only torch and hf_sparse.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from machine import describe_machine, interleaved_step_times  # benchmarks/machine.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparse import SparseLlamaConfig, SparseLlamaForCausalLM, set_training_step  # noqa: E402
from hf_sparse.model.modeling_sparse_llama import ensure_activation_stats  # noqa: E402
from hf_sparse.model.sparse_ffn import COMPILE_STAGES_ENV  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="configs/llama_quickstart.json")
    p.add_argument("--mode", choices=("2by4", "dense"), default="2by4")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps-per-block", type=int, default=4)
    p.add_argument("--compile-stages", action="store_true", help="HF_SPARSE_COMPILE_STAGES=1 for both copies")
    args = p.parse_args(argv)
    if args.compile_stages:
        os.environ[COMPILE_STAGES_ENV] = "1"

    with open(args.model_config) as fh:
        model_cfg = json.load(fh)
    extra = {"squ_relu": "relu2"}
    if args.mode == "2by4":
        extra.update(activation_2by4=True, activation_dense_warmup_steps=0)
    torch.manual_seed(0)
    base = SparseLlamaForCausalLM(SparseLlamaConfig(**{**model_cfg, **extra})).train()
    runs = {}
    for name in ("eager", "compiled"):
        model = copy.deepcopy(base)
        set_training_step(model, 1000)  # past any warm-up: the 2:4 op runs
        ensure_activation_stats(model)  # as SparsityCallback does before the first step
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        runs[name] = (torch.compile(model) if name == "compiled" else model, opt)
    ids = torch.randint(0, model_cfg["vocab_size"], (args.batch, args.seq))

    def step(name):
        fwd, opt = runs[name]
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(3):
        step("compiled")
    print(f"compile + 3 warm-up steps: {time.perf_counter() - start:.1f} s")
    for _ in range(3):
        step("eager")
    measured = interleaved_step_times(step, ("compiled", "eager"), args.blocks, args.steps_per_block)
    times, ratios = measured["times"], measured["ratios"]  # ratios: eager / compiled
    print(f"machine: {describe_machine(torch.device('cpu'))}")
    print(
        f"torch {torch.__version__}, mode {args.mode}, batch {args.batch}x{args.seq}, stages compiled: {args.compile_stages}"
    )
    for name, ts in times.items():
        print(f"{name:>8}: median {statistics.median(ts) * 1e3:.0f} ms/step (n={len(ts)})")
    print("per-block eager/compiled:", " ".join(f"{r:.2f}" for r in ratios))
    print(f"compiled step speed-up over eager (median of blocks): {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
