"""Cost of sparsity telemetry: training steps/s with it on vs off, in one process.

The 130m-shaped ReLU² model (hidden 768, FFN 3072, 12 heads) with fewer layers so it fits
a CPU; a plain training step (forward, backward, AdamW). "On" = activation stats counted
in every MLP forward + `sparsity_metrics()` (activation and weight metrics, one host read)
every `--log_every` steps, as SparsityCallback does; "off" = neither. Blocks of
`--log_every` steps alternate between the two so drift in machine load hits both alike;
the estimate is the median step plus the logging read spread over its interval.

    python benchmarks/telemetry_overhead.py [--layers 2] [--rounds 8] [--two_by_four] [--step_pairs 30]
    python benchmarks/telemetry_overhead.py --toggle nm [--two_by_four | --dense_warmup]

`--toggle nm`: both sides count the telemetry; what alternates is the N:M would-drop count
(4:8, 8:16: `count_nm_stats`) on top of it, on a 2:4 model past its warm-up (`--two_by_four`:
the count inside the 2:4 op) or in it (`--dense_warmup`: the count on the dense activation).
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
from hf_sparse.model.modeling_sparse_llama import sparse_mlps  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--two_by_four", action="store_true", help="2:4 recipe active (past warm-up)")
    parser.add_argument("--dense_warmup", action="store_true", help="a 2:4 model still in its dense warm-up")
    parser.add_argument(
        "--toggle",
        choices=("telemetry", "nm"),
        default="telemetry",
        help="what alternates: all telemetry (default), or only the N:M would-drop count",
    )
    parser.add_argument(
        "--step_pairs",
        type=int,
        default=0,
        help="measure the parts instead: N forward+backward pairs, counters on/off, and one read",
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    torch.manual_seed(0)
    config = SparseLlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        vocab_size=args.vocab,
        max_position_embeddings=1024,
        squ_relu="relu2",
        activation_2by4=args.two_by_four or args.dense_warmup,
        activation_dense_warmup_steps=10**9 if args.dense_warmup else 0,
    )
    if args.toggle == "nm" and not config.activation_2by4:
        parser.error("--toggle nm needs --two_by_four or --dense_warmup (N:M is counted on 2:4 models)")
    model = SparseLlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    set_training_step(model, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def switch(on: bool) -> None:
        for _, mlp in sparse_mlps(model):
            if args.toggle == "nm":
                mlp.track_activation_stats, mlp.count_nm_stats = True, on
            else:
                mlp.track_activation_stats = on

    def block(telemetry: bool) -> tuple[list[float], float]:
        """Seconds of each training step of one logging interval, and of its logging read."""
        switch(telemetry)
        steps = []
        for _ in range(args.log_every):
            sync()
            start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        if telemetry or args.toggle == "nm":
            sparsity_metrics(model)  # the logging step's read (and its host sync)
        else:
            torch.ones(1, device=device).tolist()  # same single sync as a plain logging step
        sync()
        return steps, time.perf_counter() - start

    if args.step_pairs:
        # Parts only: forward+backward with the counters on vs off, alternating step by step.
        def fwd_bwd(telemetry: bool) -> float:
            switch(telemetry)
            sync()
            start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            sync()
            return time.perf_counter() - start

        for _ in range(3):
            fwd_bwd(True), fwd_bwd(False)
        times = {True: [], False: []}
        for i in range(args.step_pairs):
            for telemetry in (True, False) if i % 2 == 0 else (False, True):
                times[telemetry].append(fwd_bwd(telemetry))
        start = time.perf_counter()
        for _ in range(10):
            sparsity_metrics(model)
        read_ms = (time.perf_counter() - start) / 10 * 1e3
        on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
        print(
            f"machine: {describe_machine(device)}; {_setting(args)}; "
            f"{args.step_pairs} forward+backward pairs: {args.toggle} on {on_s * 1e3:.1f} ms, off {off_s * 1e3:.1f} ms "
            f"({100 * (on_s / off_s - 1):+.2f}%); sparsity_metrics() read {read_ms:.1f} ms"
        )
        return

    block(True), block(False)  # warm-up: allocator, stat tensors, permutation caches
    steps = {True: [], False: []}
    reads = {True: [], False: []}
    for round_idx in range(args.rounds):
        order = (True, False) if round_idx % 2 == 0 else (False, True)
        for telemetry in order:
            step_times, read_time = block(telemetry)
            steps[telemetry].extend(step_times)
            reads[telemetry].append(read_time)
    # Medians of single steps: a background hiccup on a shared 2-core machine moves one
    # step, not the estimate (whole-block means swung by +-15% between rounds here).
    per_step = {t: statistics.median(steps[t]) + statistics.median(reads[t]) / args.log_every for t in (True, False)}
    print(
        f"machine: {describe_machine(device)}; device {device} {dtype}; layers {args.layers}, batch {args.batch}x{args.seq}, "
        f"{_setting(args)}; {args.rounds} rounds of {args.log_every} steps each way"
    )
    print(
        f"{args.toggle} off: {1 / per_step[False]:.3f} steps/s   on: {1 / per_step[True]:.3f} steps/s   "
        f"overhead: {100 * (per_step[True] / per_step[False] - 1):+.2f}%"
    )
    print(
        f"  median step on {1e3 * statistics.median(steps[True]):.1f} ms, off {1e3 * statistics.median(steps[False]):.1f} ms; "
        f"logging read on {1e3 * statistics.median(reads[True]):.1f} ms, off {1e3 * statistics.median(reads[False]):.1f} ms "
        f"(once per {args.log_every} steps)"
    )


def _setting(args) -> str:
    model = "2:4 in its dense warm-up" if args.dense_warmup else f"2:4 {'on' if args.two_by_four else 'off'}"
    return model + (", telemetry on both sides, N:M count toggled" if args.toggle == "nm" else "")


if __name__ == "__main__":
    main()
