"""Does ``torch._cslt_sparse_mm`` scale rows by a vector ``alpha`` here, in bf16 and in FP8?

    python benchmarks/cslt_alpha_check.py            # on the GPU
    python benchmarks/cslt_alpha_check.py --cpu-smoke  # control flow only (no cuSPARSELt on CPU)

cuSPARSELt can multiply each row of the product by its own alpha (a vector with one entry
per row of the sparse operand). PyTorch passes ``alpha`` through, but its tests cover a
vector alpha with 8-bit inputs only, not bf16 with cuSPARSELt 0.6+. The FP8 mode applies
its row and column scales in one compiled pass after the GEMM (``ffn_stages._fp8_scale_stage``);
the row scale could move into the GEMM's epilogue only where this check passes (the column
scale cannot: alpha scales rows of the sparse operand only), so the op does not use alpha,
and this check says whether that option exists on this card and library.

Each case compares ``alpha ⊙ (A·B)`` from the library with a float32 reference over a few
random 2:4 operands, and prints one line: OK (max relative error), WRONG, or REFUSED.
Imports only torch.
"""

from __future__ import annotations

import argparse

import torch

M, K, N = 256, 512, 128  # multiples of 32: valid for 16-bit and 8-bit operands
REL_ERR_LIMIT = {"bf16": 2e-2, "fp8": 8e-2}  # bf16 rounding; FP8 e4m3's 3 mantissa bits


def random_2to4(rows: int, cols: int, gen: torch.Generator, device) -> torch.Tensor:
    a = torch.randn(rows, cols // 4, 4, generator=gen, device=device)
    keep = a.abs().topk(2, dim=-1).indices
    return torch.zeros_like(a).scatter_(-1, keep, a.gather(-1, keep)).view(rows, cols)


def check(precision: str, device, draws: int = 3) -> str:
    gen = torch.Generator(device=device).manual_seed(0)
    worst = 0.0
    for _ in range(draws):
        a = random_2to4(M, K, gen, device)
        b = torch.randn(K, N, generator=gen, device=device)
        alpha = torch.rand(M, generator=gen, device=device) + 0.5
        if precision == "fp8":
            a_op = a.to(torch.float8_e4m3fn)
            b_op = b.t().contiguous().to(torch.float8_e4m3fn).t()  # FP8 takes B column-major
            extra = {"out_dtype": torch.bfloat16}
        else:
            a_op, b_op, extra = a.to(torch.bfloat16), b.to(torch.bfloat16), {}
        ref = alpha[:, None] * (a_op.float() @ b_op.float())
        try:
            out = torch._cslt_sparse_mm(torch._cslt_compress(a_op), b_op, alpha=alpha, **extra).float()
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            return f"REFUSED ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        err = float((out - ref).norm() / ref.norm())
        if not err <= REL_ERR_LIMIT[precision]:  # NaN fails too
            unscaled = float((out - ref / alpha[:, None]).norm() / ref.norm())
            return f"WRONG (relative error {err:.3g}; against the product without alpha {unscaled:.3g})"
        worst = max(worst, err)
    return f"OK (max relative error {worst:.3g} over {draws} draws)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="run the control flow on CPU (every case REFUSED)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("vector alpha: not measurable (no CUDA device)")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    try:
        version = torch.backends.cusparselt.version()
    except (AttributeError, RuntimeError):
        version = None
    print(f"device {name}; torch {torch.__version__}; cuSPARSELt {version}; A {M}x{K} (2:4), B {K}x{N}")
    for precision in ("bf16", "fp8"):
        print(f"vector alpha, {precision}: {check(precision, device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
