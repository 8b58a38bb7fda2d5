"""What the 2:4 op's CPU path costs, part by part (the figures behind benchmarks/README.md).

    python benchmarks/cpu_op_parts.py [--tokens 4096] [--shape 768x3072] [--repeats 9]

1. Allocation: filling a fresh T×F tensor vs a warm (reused) one, and a T×d @ d×F GEMM
   into a fresh output vs into a warm one (first-touch page faults of large allocations).
2. The op's stages on the plain-GEMM path (planar feature order), eager and compiled; the
   compiled forward stage also in its stacked form (no member views handed in), the form
   the member-view writes replaced.

Medians in ms; fp32; the device and thread count are printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from machine import describe_machine  # benchmarks/machine.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparse.model import sparse_ffn  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()  # compiles / warms the allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--shape", default="768x3072", help="DxF")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    d, f = (int(v) for v in args.shape.lower().split("x"))
    t, n = args.tokens, args.repeats
    gen = torch.Generator().manual_seed(0)
    print(f"machine: {describe_machine(torch.device('cpu'))}")
    print(f"torch {torch.__version__}, T={t}, d={d}, F={f}, fp32, median of {n} (ms)")

    warm = torch.empty(t, f)
    x, w = torch.randn(t, d, generator=gen), torch.randn(f, d, generator=gen)
    pairs = [
        ("fill a T×F tensor", lambda: torch.empty(t, f).fill_(1.0), lambda: warm.fill_(1.0)),
        ("mm T×d·d×F", lambda: torch.mm(x, w.t()), lambda: torch.mm(x, w.t(), out=warm)),
    ]
    for label, fresh, reused in pairs:
        # Alternated, so that drifts of a shared machine hit both alike.
        times = {"fresh": [], "warm": []}
        for _ in range(n):
            for key, fn in (("fresh", fresh), ("warm", reused)):
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1e3)
        for key, values in times.items():
            print(f"{label + ', ' + key + ' output':<45} {statistics.median(values):8.2f}")
    rows = []

    y1 = torch.randn(t, f, generator=gen)
    dy2 = torch.randn(t, f, generator=gen)
    n_dense = -(-f // 20)  # ceil(0.05 F), as the op
    dense_idx = torch.randperm(f, generator=gen)[:n_dense]
    dense_mask = torch.zeros(f, dtype=torch.bool).index_fill_(0, dense_idx, True)
    y2s_out, g_out, dy1_out, down_out, up_out = (torch.empty(t, f) for _ in range(5))
    planar = lambda b: sparse_ffn._members(b, "planar")  # noqa: E731
    tokens = lambda b: sparse_ffn._members(b, "tokens")  # noqa: E731
    g = torch.empty(t, f)  # a real backward factor for the backward stages
    sparse_ffn._forward_stage(y1.clone(), None, "naive", True, True, True, y2s_out, g)
    opts = {"emulate_precision_casts": True}
    compiled = {
        s: torch.compile(s, fullgraph=True, options=opts)
        for s in (sparse_ffn._forward_stage, sparse_ffn._backward_stage, sparse_ffn._up_operand_stage)
    }
    y1_copy = torch.empty(t, f)

    def forward(stage, members=True):
        # The eager stage works in place on y1 (the op's own buffer): refill it each time.
        def run():
            y1_copy.copy_(y1)
            extra = (planar(y2s_out), planar(g_out)) if members else ()
            stage(y1_copy, None, "naive", True, True, True, y2s_out, g_out, *extra)

        return run

    def backward(stage):
        def run():
            y1_copy.copy_(dy2)  # the eager stage makes dy1 in place on dy2
            stage(y1_copy, g, None, True, True, True, dense_idx, None, 0, False, dense_mask, dy1_out, down_out,
                  tokens(down_out))  # fmt: skip

        return run

    def up(stage):
        def run():
            y1_copy.copy_(dy2)
            stage(y1_copy, dense_idx, dense_mask, up_out, tokens(up_out))

        return run

    rows += [
        ("(refill of the stage input, included below)", lambda: y1_copy.copy_(y1)),
        ("forward stage, eager", forward(sparse_ffn._forward_stage)),
        ("forward stage, compiled, member views", forward(compiled[sparse_ffn._forward_stage])),
        ("forward stage, compiled, stacked", forward(compiled[sparse_ffn._forward_stage], members=False)),
        ("backward stage, eager", backward(sparse_ffn._backward_stage)),
        ("backward stage, compiled", backward(compiled[sparse_ffn._backward_stage])),
        ("dy1 operand stage, eager", up(sparse_ffn._up_operand_stage)),
        ("dy1 operand stage, compiled", up(compiled[sparse_ffn._up_operand_stage])),
    ]
    for label, fn in rows:
        print(f"{label:<45} {median_ms(fn, n):8.2f}")


if __name__ == "__main__":
    main()
