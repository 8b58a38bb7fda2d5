"""Cost of sparsity telemetry: training steps/s with it on vs off, in one process.

The 130m-shaped ReLU² model (hidden 768, FFN 3072, 12 heads) with fewer layers so it fits
a CPU; a plain training step (forward, backward, AdamW). "On" = activation stats counted
in every MLP forward + `sparsity_metrics()` (activation and weight metrics, one host read)
every `--log_every` steps, as SparsityCallback does; "off" = neither. Blocks of
`--log_every` steps alternate between the two so drift in machine load hits both alike.

    python benchmarks/telemetry_overhead.py [--layers 2] [--rounds 6] [--two_by_four]
"""

import argparse
import os
import statistics
import sys
import time

import torch

from machine import describe_machine  # benchmarks/machine.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_sparse import SparseLlamaConfig, SparseLlamaForCausalLM, set_training_step, sparsity_metrics  # noqa: E402
from hf_sparse.modeling_sparse_llama import sparse_mlps  # noqa: E402



def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--two_by_four", action="store_true", help="2:4 recipe active (past warm-up)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    torch.manual_seed(0)
    config = SparseLlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=args.layers,
                               num_attention_heads=12, vocab_size=args.vocab, max_position_embeddings=1024,
                               squ_relu="relu2", activation_2by4=args.two_by_four, activation_dense_warmup_steps=0)
    model = SparseLlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    set_training_step(model, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    def block(telemetry: bool) -> float:
        for _, mlp in sparse_mlps(model):
            mlp.track_activation_stats = telemetry
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.log_every):
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if telemetry:
            sparsity_metrics(model)  # the logging step's read (and its host sync)
        else:
            torch.ones(1, device=device).tolist()  # same single sync as a plain logging step
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.log_every

    block(True), block(False)  # warm-up: allocator, stat tensors, permutation caches
    on, off = [], []
    for round_idx in range(args.rounds):
        order = (True, False) if round_idx % 2 == 0 else (False, True)
        for telemetry in order:
            (on if telemetry else off).append(block(telemetry))
    on_s, off_s = statistics.median(on), statistics.median(off)
    # Ratios within a round cancel slow drift in machine load; their spread shows the noise.
    paired = sorted(a / b for a, b in zip(on, off))
    print(f"machine: {describe_machine(device)}; device {device} {dtype}; layers {args.layers}, batch {args.batch}x{args.seq}, "
          f"2:4 {'on' if args.two_by_four else 'off'}; {args.rounds} rounds of {args.log_every} steps each way")
    print(f"telemetry off: {1 / off_s:.3f} steps/s   on: {1 / on_s:.3f} steps/s   "
          f"overhead: {100 * (on_s / off_s - 1):+.2f}%")
    print(f"per-round on/off ratios: median {statistics.median(paired):.4f}, "
          f"range {paired[0]:.4f}..{paired[-1]:.4f}")


if __name__ == "__main__":
    main()
