"""Dense ReLU² FFN vs the 2:4 activation-sparse op: forward, backward, fwd+bwd.

    python benchmarks/ffn_2to4.py                              # CPU: 130m shape, 4096 tokens, fp32
    python benchmarks/ffn_2to4.py --device cuda                # GPU: 3 shapes, 16k tokens, bf16
    python benchmarks/ffn_2to4.py --shapes 768x3072,2048x8192 --tokens 16384 --repeats 20
    python benchmarks/ffn_2to4.py --compile                    # adds compiled rows (dense_c, sparse_c, sparse_s)

Dense and sparse runs alternate inside one process (same allocator/thermal state); each
time is the median over ``--repeats``, each ratio the median of the per-repeat ratios. On CUDA the timings use CUDA events after a
warm-up; the sparse op is timed on the cuSPARSELt path when eligible and, for reference,
with the kernel disabled (``HF_SPARSE_DISABLE_2TO4_KERNEL=1``: same semantics, dense GEMMs).
Imports only torch and hf_sparse's model code, so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

from machine import describe_machine, parse_ffn_shapes  # benchmarks/machine.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparse.model import gemm_backends, gemm_tuning, kernels  # noqa: E402
from hf_sparse.model.gemm_backends import CUSPARSELT  # noqa: E402
from hf_sparse.model.fp8 import dense_fp8_mm, quantize_rows  # noqa: E402
from hf_sparse.model import sparse_ffn  # noqa: E402
from hf_sparse.model.sparse_ffn import relu2_2to4_ffn, relu2_ffn_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> float:
        """Milliseconds since ``start``."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return (time.perf_counter() - start) * 1e3


@contextlib.contextmanager
def env_set(env: dict[str, str]):
    """Environment variables set for the duration of a block (the op reads its switches per call)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_once(fn, x, w_up, w_down, timer: Timer, env: dict[str, str]) -> tuple[float, float]:
    """(forward ms, backward ms) of one step under ``env`` (both passes: the backward op
    reads the switches again); grads are cleared outside the timed region."""
    for t in (x, w_up, w_down):
        t.grad = None
    if timer.cuda:
        torch.cuda.synchronize()
    with env_set(env):
        t0 = timer.start()
        y = fn(x, w_up, w_down)
        fwd = timer.stop(t0)
        gy = torch.ones_like(y)
        t1 = timer.start()
        y.backward(gy)
        bwd = timer.stop(t1)
    return fwd, bwd


class _Fp8DenseFFN(torch.autograd.Function):
    """The dense ReLU² FFN with the GEMMs the op's FP8 mode runs in FP8 (y3 = y2·W_downᵀ and
    dx = dy1·W_up) as row-wise scaled ``torch._scaled_mm``, the rest bf16: the like-for-like
    baseline of ``relu2_2to4_ffn(..., fp8=True)``."""

    @staticmethod
    def forward(ctx, x, w_up, w_down):
        y1 = x @ w_up.t()
        y2 = torch.relu(y1).square()
        ctx.save_for_backward(x, w_up, w_down, y1, y2)
        return dense_fp8_mm(*quantize_rows(y2), *quantize_rows(w_down), x.dtype)

    @staticmethod
    def backward(ctx, dy3):
        x, w_up, w_down, y1, y2 = ctx.saved_tensors
        dy1 = (dy3 @ w_down) * 2.0 * torch.relu(y1)
        dx = dense_fp8_mm(*quantize_rows(dy1), *quantize_rows(w_up.t()), x.dtype)
        return dx, dy1.t() @ x, dy3.t() @ y2


def fp8_dense_ffn(x, w_up, w_down):
    return _Fp8DenseFFN.apply(x, w_up, w_down)


def bench_shape(d, f, args, device, dtype, timer):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.tokens, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w_up = (torch.randn(f, d, generator=gen) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    w_down = (torch.randn(d, f, generator=gen) / f**0.5).to(device=device, dtype=dtype).requires_grad_()
    stats = torch.zeros(3, dtype=torch.float64, device=device) if args.stats else None
    perm = torch.randperm(args.tokens, generator=gen).to(device) if args.permute else None

    def sparse(x, wu, wd):
        return relu2_2to4_ffn(
            x,
            wu,
            wd,
            method=args.method,
            backward=args.backward,
            dense_features=args.dense_features,
            permutation=perm,
            stats=stats,
            fp8=args.fp8,
        )

    # name -> (function, environment for its forward and backward); with --fp8 the dense
    # baseline runs the same two GEMMs in FP8 as the op does.
    dense = fp8_dense_ffn if args.fp8 else relu2_ffn_reference
    variants = {"dense": (dense, {}), "sparse": (sparse, {})}  # stages: the device default
    if args.go_no_go_only:
        # The one comparison that decides: compiled op vs compiled dense FFN, nothing else
        # compiled or timed (each compiled variant costs a cold compile at the 7B shape).
        variants = {}
    if args.compile:
        # Compiled dense FFN (relu+square fused) against the 2:4 op with compiled stages,
        # the comparison that matters once a user sets torch_compile.
        variants["dense_c"] = (torch.compile(dense), {})
        variants["sparse_c"] = (torch.compile(sparse), {sparse_ffn.COMPILE_STAGES_ENV: "1"})
        if not args.go_no_go_only:
            # The op called eagerly but with its stages compiled (HF_SPARSE_COMPILE_STAGES=1
            # in an eager model): compared with the eager dense FFN.
            variants["sparse_s"] = (sparse, {sparse_ffn.COMPILE_STAGES_ENV: "1"})
    kernel_ok = device.type == "cuda" and gemm_backends.select_gemms(x.detach(), w_up.detach(), w_down.detach()).sparse
    if device.type == "cuda" and not args.fp8 and not args.go_no_go_only:
        # Same op with the kernel switched off: separates mask overhead from GEMM gains.
        variants["sparse_ref"] = (sparse, {gemm_backends.DISABLE_ENV: "1"})
    times = {k: ([], []) for k in variants}
    for _ in range(args.warmup):
        for name, (fn, env) in variants.items():
            run_once(fn, x, w_up, w_down, timer, env)
    for _ in range(args.repeats):
        for name, (fn, env) in variants.items():  # alternate so drifts hit every variant alike
            fwd, bwd = run_once(fn, x, w_up, w_down, timer, env)
            times[name][0].append(fwd)
            times[name][1].append(bwd)
    out = {}
    for name, (fw, bw) in times.items():
        both = [a + b for a, b in zip(fw, bw)]
        # Compiled variants are compared with the compiled dense FFN, eager ones with eager.
        base_fw, base_bw = times["dense_c" if name.endswith("_c") else "dense"]
        base_both = [a + b for a, b in zip(base_fw, base_bw)]
        # Ratios: median over repeats of the per-repeat ratio (both runs of a pair are
        # seconds apart, so slow drifts of a shared machine cancel).
        ratios = tuple(
            statistics.median(a / b for a, b in zip(num, den))
            for num, den in ((fw, base_fw), (bw, base_bw), (both, base_both))
        )
        out[name] = (statistics.median(fw), statistics.median(bw), statistics.median(both), ratios)
    return out, kernel_ok


def table_provenance(named_shapes, device) -> dict[str, str]:
    """Per GEMM, whether the verdict table file already held its verdict before this run
    tuned anything ("read from FILE") or this run tunes it ("tuned now"): a speed-up read back
    from an old file must not pass for a measurement of this run."""
    path = gemm_tuning.table_path()
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        data = {}
    tables = data.get("tables") if isinstance(data, dict) else None
    held = tables.get(CUSPARSELT.tuner.table_key(device)) if isinstance(tables, dict) else None
    held = held if isinstance(held, dict) else {}
    return {name: (f"read from {path}" if shape.key() in held else "tuned now") for name, shape in named_shapes}


def path_label(kernel_ok: bool, named_shapes, device) -> str:
    """The GEMM path as the verdicts make it, not as eligibility alone would suggest."""
    if not kernel_ok:
        return "plain-GEMM path"
    alg = kernels.cusparselt_alg_id()
    sparse = [
        name
        for name, shape in named_shapes
        if CUSPARSELT.tuner.choice_for(shape, device, alg, read_only=True).use_sparse()
    ]
    if not sparse:
        return "cuSPARSELt path, every GEMM dense by verdict"
    return f"cuSPARSELt path, {len(sparse)} of {len(named_shapes)} GEMMs sparse ({', '.join(sparse)})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tokens", type=int, default=None, help="default: 16384 on GPU, 4096 on CPU")
    p.add_argument("--shapes", default=None, help="names (130m,1b,7b) or DxF; default: all on GPU, 130m on CPU")
    p.add_argument("--repeats", type=int, default=None, help="default: 20 on GPU, 5 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="default: 3 on GPU, 1 on CPU")
    p.add_argument("--method", default="naive")
    p.add_argument("--backward", default="split_gemm")
    p.add_argument("--dense-features", type=float, default=0.05)
    p.add_argument("--no-stats", dest="stats", action="store_false", help="do not collect telemetry counts")
    p.add_argument("--no-permute", dest="permute", action="store_false", help="no token permutation")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd dense and 2:4 (compiled stages)")
    p.add_argument(
        "--fp8", action="store_true",
        help="the op's FP8 mode (activation_2by4_fp8) against a dense FFN with the same GEMMs in row-wise FP8",
    )  # fmt: skip
    p.add_argument(
        "--go-no-go", action="store_true",
        help="with --compile: end with one GO/NO-GO line per shape, compiled 2:4 op vs compiled dense FFN",
    )  # fmt: skip
    p.add_argument(
        "--go-no-go-only", action="store_true",
        help="time only the compiled 2:4 op and the compiled dense FFN (implies --compile --go-no-go): the answer first",
    )  # fmt: skip
    p.add_argument(
        "--gemm-table", action="store_true",
        help="GPU: make and print the per-shape sparse-or-dense GEMM verdicts (gemm_tuning) before timing",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.go_no_go_only:
        args.compile = args.go_no_go = True

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    args.tokens = args.tokens or (16384 if gpu else 4096)
    args.repeats = args.repeats or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    shapes = parse_ffn_shapes(args.shapes or ("130m,1b,7b" if gpu else "130m"))
    timer = Timer(device)

    print(f"machine: {describe_machine(device)}")
    print(
        f"torch {torch.__version__}, dtype {str(dtype).replace('torch.', '')}, tokens {args.tokens}, "
        f"method {args.method}, backward {args.backward} (dense_features {args.dense_features}), "
        f"stats {'on' if args.stats else 'off'}, permutation {'on' if args.permute else 'off'}, "
        f"median of {args.repeats}"
    )
    header = f"{'shape':>12} {'variant':>10} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd':>9} {'fwd x':>7} {'bwd x':>7} {'f+b x':>7}"
    print(header)
    print("-" * len(header))
    precision = "fp8" if args.fp8 else str(dtype).replace("torch.", "")
    answered = False
    for name, d, f in shapes:
        named = sparse_ffn.ffn_gemm_shapes(args.tokens, d, f, dtype, args.dense_features, args.backward)
        if args.gemm_table and gpu:
            provenance = table_provenance(named, device)
            labelled = [(f"{name} {n}", shape) for n, shape in named]
            CUSPARSELT.prepare(labelled, device)
            print(CUSPARSELT.tuner.format_table(labelled, device))
            print("  verdicts: " + "; ".join(f"{n} {where}" for n, where in provenance.items()), flush=True)
        res, kernel_ok = bench_shape(d, f, args, device, dtype, timer)
        if args.go_no_go and "sparse_c" in res:
            # Said as soon as it is measured: a later step may not get to run.
            label = name if name == f"{d}x{f}" else f"{name} {d}x{f}"
            ratio = res["sparse_c"][3][2]
            path = path_label(kernel_ok, named, device) if gpu else "plain-GEMM path"
            print(f"go/no-go ({precision}, {path}): compiled 2:4 op / compiled dense FFN at {label} = {ratio:.3f} -> "
                  f"{'GO' if ratio < 1.0 else 'NO-GO'}", flush=True)  # fmt: skip
            answered = True
        for variant, (fw, bw, both, (rf, rb, rboth)) in res.items():
            label = variant
            if variant == "sparse" and gpu:
                label = "sparse24" if kernel_ok else "sparse(ref)"
            print(
                f"{name + f' {d}x{f}':>12} {label:>10} {fw:9.2f} {bw:9.2f} {both:9.2f} {rf:7.3f} {rb:7.3f} {rboth:7.3f}"
            )
    print(
        "ratios are sparse/dense time, median of per-repeat ratios (< 1 means faster than dense); "
        "*_c rows: both compiled; sparse_s: eager op with compiled stages vs eager dense"
    )
    if args.go_no_go and not answered:
        print("go/no-go: needs --compile (the baseline is the compiled dense FFN)")


if __name__ == "__main__":
    main()
