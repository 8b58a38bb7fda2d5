"""Cost of split-invariance under tensor parallelism: the 2:4 FFN op on 2 CPU processes (gloo).

    python benchmarks/tp_ffn.py                       # 130m shape (d=768, F=3072), 512 and 4096 tokens
    python benchmarks/tp_ffn.py --tokens 2048 --repeats 21 --method mvue

Starts itself under ``torch.distributed.run`` with 2 processes (one torch thread each) unless
already launched by it. Each rank runs the op's forward and backward on its half of the FFN
width (``backward="split_gemm"``, permutation on, float32) and times, per FFN call:

* ``op``: one forward + backward of the sharded op (its own x all-reduces included);
* ``ranking``: the global dense-feature ranking inside the backward (the all-gather of the
  F/2 per-feature counts, the sort of all F counts, the local mask), timed in place. On a
  shared machine the ranks drift apart, and the first collective of the backward absorbs
  the wait for the slower one: that wait is in here;
* ``all-reduces``: the op's other collectives (y in forward, x's gradient in backward);
* ``gather``: the all-gather alone, back to back after a barrier (its latency, no wait);
* ``net``: the paired median of op(global ranking) − op(the same ranking of the local
  counts, no all-gather), the two variants alternating repeat by repeat: what the
  collective adds to the op once the waits are counted where they fall anyway;
* ``mvue draws`` (with ``--method mvue``): the keyed uniforms of the forward stage.

Times are medians over ``--repeats``; fractions are of ``op``. Imports only torch and
hf_sparse's model code.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from machine import describe_machine  # benchmarks/machine.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparse.model import ffn_stages, sparse_ffn  # noqa: E402
from hf_sparse.model.sparse_ffn import make_token_permutation, relu2_2to4_ffn  # noqa: E402


class _Stopwatch:
    """Wraps ``module.name`` so that every call's wall time lands in ``self.times``."""

    def __init__(self, module, name: str):
        self.original = getattr(module, name)
        self.times: list[float] = []
        setattr(module, name, self.wrap(self.original))

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.times.append(time.perf_counter() - start)
            return out

        return timed

    def take(self) -> float:
        total, self.times = sum(self.times), []
        return total


def _median_ms(values) -> float:
    return statistics.median(values) * 1e3


def _run(args) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    d, f = args.d, args.f
    # The op module holds its own references to the functions it calls: time them there.
    ranking = _Stopwatch(sparse_ffn, "global_dense_mask")
    draws = _Stopwatch(ffn_stages, "keyed_uniforms")
    reduces = _Stopwatch(dist, "all_reduce")  # ffn_tensor_parallel calls torch.distributed.all_reduce
    global_ranking = ranking.original

    def local_ranking(counts, n_dense, global_features, offset, group_name):
        # The same sort and mask over a full-width vector, this rank's counts in place and
        # no all-gather: the baseline's work minus the collective (its result is not used
        # for any check here).
        everyone = counts.new_zeros(global_features)
        everyone[offset : offset + counts.shape[0]] = counts
        order = torch.sort(everyone, descending=True, stable=True).indices[:n_dense]
        dense = torch.zeros(global_features, dtype=torch.bool).index_fill_(0, order, True)
        return dense[offset : offset + counts.shape[0]]

    if rank == 0:
        print(f"machine: {describe_machine()}; 2 processes (gloo), 1 torch thread each; torch {torch.__version__}")
        print(f"shape d={d}, F={f} (F/2={f // 2} per rank), float32, method={args.method}, split_gemm, permuted")
        mvue_columns = " mvue draws ms | draws / op |" if args.method == "mvue" else ""
        print(
            "| tokens | op fwd+bwd ms | ranking ms | all-reduces ms | gather alone ms | net ms | "
            "ranking / op | gather / op | net / op |" + mvue_columns
        )
    for tokens in args.tokens:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, d, generator=g)
        w_up = distribute_tensor(torch.randn(f, d, generator=g) / d**0.5, mesh, [Shard(0)]).requires_grad_()
        w_down = distribute_tensor(torch.randn(d, f, generator=g) / f**0.5, mesh, [Shard(1)]).requires_grad_()
        dy = torch.randn(tokens, d, generator=g)
        perm = make_token_permutation(tokens, seed=1)
        counts = torch.zeros(f // 2, dtype=torch.int64)
        everyone = torch.empty(f, dtype=torch.int64)
        op_ms, rank_ms, reduce_ms, gather_ms, draw_ms, net_ms = [], [], [], [], [], []
        for repeat in range(args.warmup + args.repeats):
            times = {}
            # Alternate which variant goes first, so drifts hit both alike.
            for variant in ("global", "local") if repeat % 2 == 0 else ("local", "global"):
                sparse_ffn.global_dense_mask = ranking.wrap(global_ranking if variant == "global" else local_ranking)
                dist.barrier()
                start = time.perf_counter()
                y = relu2_2to4_ffn(x, w_up, w_down, method=args.method, backward="split_gemm", permutation=perm)
                y.backward(dy)
                times[variant] = time.perf_counter() - start
                w_up.grad = w_down.grad = None
                if variant == "global":
                    in_ranking, in_reduces, in_draws = ranking.take(), reduces.take(), draws.take()
                ranking.take(), reduces.take(), draws.take()
            op = times["global"]
            dist.barrier()
            start = time.perf_counter()
            dist.all_gather_into_tensor(everyone, counts)
            gather = time.perf_counter() - start
            if repeat >= args.warmup:
                op_ms.append(op)
                rank_ms.append(in_ranking)
                reduce_ms.append(in_reduces)
                gather_ms.append(gather)
                draw_ms.append(in_draws)
                net_ms.append(times["global"] - times["local"])
        # Rank 0 reports; both ranks' medians are close (they wait for each other).
        if rank == 0:
            op_m, rank_m, gather_m = _median_ms(op_ms), _median_ms(rank_ms), _median_ms(gather_ms)
            reduce_m, net_m = _median_ms(reduce_ms), _median_ms(net_ms)
            line = (
                f"| {tokens} | {op_m:.1f} | {rank_m:.2f} | {reduce_m:.2f} | {gather_m:.2f} | {net_m:+.2f} | "
                f"{rank_m / op_m:.2%} | {gather_m / op_m:.2%} | {net_m / op_m:+.2%} |"
            )
            if args.method == "mvue":
                draw_m = _median_ms(draw_ms)
                line += f" {draw_m:.2f} | {draw_m / op_m:.2%} |"
            print(line, flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--f", type=int, default=3072, help="the whole FFN width (split over 2 ranks)")
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--method", default="naive", choices=sparse_ffn.SPARSE_METHODS)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if "LOCAL_RANK" not in os.environ:
        # Not under torchrun yet: start the 2 ranks, one thread each (2 vCPUs on this machine).
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.abspath(__file__),
            *sys.argv[1:],
        ]
        sys.exit(subprocess.call(cmd, env=env))
    _run(args)


if __name__ == "__main__":
    main()
