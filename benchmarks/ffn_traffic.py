"""Memory-traffic MODEL of one FFN forward+backward: dense ReLU² vs the 2:4 op (no GPU needed).

    python benchmarks/ffn_traffic.py                        # 130m, 1b, 7b shapes, 16k tokens, bf16 + fp8
    python benchmarks/ffn_traffic.py --bf16-sparse-speedup 1.5 --launch-us 0
    python benchmarks/ffn_traffic.py --inductor-check       # + kernels inductor makes per stage (CPU)

Nothing here is timed. Every kernel of one forward+backward is traced on meta tensors (no
memory is allocated, so the 7b shape costs nothing) and priced on a modelled H100:

    kernel time = max(bytes / bandwidth, flops / throughput) + launch overhead

with GEMMs at the dense or 2:4 throughput and everything else memory-bound (flops = 0).
Variants:
  (a) dense eager: ``relu2_ffn_reference`` under autograd; every aten op is one kernel.
  (b) dense compiled: the same GEMMs, relu+square one pass forward, the backward factor one
      pass (what torch.compile gives the dense FFN): THE BASELINE (like for like with the
      op, whose stages are compiled on a GPU).
  (c) 2:4 op on its cuSPARSELt path: ``_ffn_forward_impl``/``_ffn_backward_impl`` called
      directly, each elementwise stage priced as ONE fused kernel, each ``sparse24_mm`` as
      a cuSPARSELt compress plus a 2:4 GEMM, every other aten op as an eager kernel.
  FP8 (row-wise scaled, e4m3, bf16 outputs): (c) in its own FP8 mode (y3 and dx as FP8 2:4
  GEMMs, the rest bf16) against (b) with the same two GEMMs as ``torch._scaled_mm`` and
  the same quantization (see ``Fp8Rule``).
GEMM speed-ups are inputs taken from published measurements (README of this folder), not
one optimistic constant; the sensitivity table shows where the answer changes.
Imports only torch and hf_sparse, so it also runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from machine import parse_ffn_shapes  # benchmarks/machine.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparse.model import kernels, sparse_ffn  # noqa: E402

DTYPE = torch.bfloat16
DENSE_FEATURES = 0.05  # relu2_2to4_ffn's default split
# cuSPARSELt's compressed 16-bit operand: the kept half of the values plus 2 bits of
# position metadata per kept value (4 bits per group of 4), i.e. numel/8 bytes.
METADATA_BITS_PER_KEPT_VALUE = 2

GEMM_OPS = {"mm", "addmm", "bmm", "matmul"}
# Ops that allocate or relabel memory without touching it: no kernel, no traffic.
NO_KERNEL_OPS = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
    "lift_fresh", "resize_", "set_",
}  # fmt: skip


@dataclass
class Kernel:
    name: str
    phase: str  # "fwd" or "bwd"
    kind: str  # "gemm", "sparse_gemm" or "memory"
    read: int  # bytes
    written: int  # bytes
    flops: float = 0.0  # dense-equivalent 2mnk for GEMMs, also for 2:4 ones
    stage: str = ""  # the op stage this fused kernel stands for, if any
    precision: str = "bf16"  # of a GEMM's operands: "bf16" or "fp8"

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass
class Machine:
    bandwidth: float  # bytes/s
    bf16_flops: float  # flop/s of a dense bf16 GEMM
    fp8_flops: float  # flop/s of a dense row-wise scaled FP8 GEMM
    bf16_sparse_speedup: float  # 2:4 bf16 GEMM vs dense bf16 GEMM
    fp8_sparse_speedup: float  # 2:4 FP8 GEMM vs dense FP8 GEMM
    launch_s: float

    def gemm_flops(self, k: Kernel) -> float:
        fp8 = k.precision == "fp8"
        dense = self.fp8_flops if fp8 else self.bf16_flops
        if k.kind == "sparse_gemm":
            return dense * (self.fp8_sparse_speedup if fp8 else self.bf16_sparse_speedup)
        return dense

    def seconds(self, k: Kernel) -> float:
        compute = k.flops / self.gemm_flops(k) if k.kind != "memory" else 0.0
        return max(k.bytes / self.bandwidth, compute) + self.launch_s


def nbytes(*objs) -> int:
    """Bytes of the distinct tensors in ``objs`` (nested containers allowed; each counted once)."""
    seen, total = set(), 0
    for t in tree_leaves(objs):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _describe(tensors) -> str:
    shapes = ("x".join(map(str, t.shape)) or "()" for t in tree_leaves(tensors) if isinstance(t, torch.Tensor))
    return ",".join(shapes)


class KernelRecorder(TorchDispatchMode):
    """Records every aten op as one eager kernel (bytes = operands read + outputs written).

    ``fused(name, fn, *args)`` runs ``fn`` with the per-op recording off and records it as
    ONE kernel that reads its tensor inputs once and writes its tensor outputs once: what a
    compiled stage is meant to cost.
    """

    def __init__(self, fp8: "Fp8Rule | None" = None):
        super().__init__()
        self.kernels: list[Kernel] = []
        self.phase = "fwd"
        self._quiet = 0
        self.fp8 = fp8

    def fused(self, name: str, fn, *args, stage: str = "", write_only=()):
        self._quiet += 1
        try:
            out = fn(*args)
        finally:
            self._quiet -= 1
        # Output buffers handed in by the caller are written, not read.
        skip = {id(t) for t in tree_leaves(write_only) if isinstance(t, torch.Tensor)}
        inputs = [a for a in tree_leaves(args) if id(a) not in skip]
        kernel = Kernel(f"{name} [{_describe(inputs)}]", self.phase, "memory", nbytes(inputs), nbytes(out), stage=stage)
        self.add(kernel)
        if self.fp8 is not None:
            self.fp8.stage_wrote(kernel, out)
        return out

    def add(self, kernel: Kernel) -> None:
        self.kernels.append(kernel)

    def mm(self, a: torch.Tensor, b: torch.Tensor, fp8: bool = False) -> torch.Tensor:
        """``a @ b``; with ``fp8`` (and an ``Fp8Rule``) priced as a row-wise scaled FP8 GEMM:
        operands quantized by the rule, bf16 result, scales applied in one pass over it."""
        if not (fp8 and self.fp8 is not None):
            return torch.mm(a, b)
        out = a.new_empty(a.shape[0], b.shape[1])
        read = self.fp8.operand(self, a, reduce_last=True) + self.fp8.operand(self, b, reduce_last=False)
        shapes = f"{_describe((a, b))}"
        self.add(Kernel(f"scaled_mm fp8 [{shapes}]", self.phase, "gemm", read, nbytes(out),
                        2.0 * a.shape[0] * a.shape[1] * b.shape[1], precision="fp8"))  # fmt: skip
        self.add(Kernel(f"fp8 scales [{_describe(out)}]", self.phase, "memory", nbytes(out), nbytes(out)))
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._quiet:
            kernel = self._price(func, args, kwargs, out)
            if kernel is not None:
                self.kernels.append(kernel)
        return out

    def _price(self, func, args, kwargs, out):
        op = func.overloadpacket.__name__
        if func.is_view or op in NO_KERNEL_OPS or torch.Tag.inplace_view in func.tags:
            return None
        name = f"aten.{op} [{_describe((args, kwargs))}]"
        if op in GEMM_OPS:
            a, b = args[-2], args[-1]  # addmm's bias comes first
            flops = 2.0 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            inputs = {k: v for k, v in kwargs.items() if k != "out"}  # out= is written, not read
            return Kernel(name, self.phase, "gemm", nbytes(args, inputs), nbytes(out), flops)
        if op == "index_select":
            # A gather reads only the selected elements (and the index), not the whole source.
            return Kernel(name, self.phase, "memory", nbytes(args[2]) + nbytes(out), nbytes(out))
        if op in ("index_copy_", "index_copy"):
            self_t, _dim, index, source = args[:4]
            # The in-place scatter writes only the source's rows; out-of-place first copies self.
            clone = nbytes(self_t) if op == "index_copy" else 0
            return Kernel(name, self.phase, "memory", nbytes(index, source) + clone, nbytes(source) + clone)
        if op == "copy_":
            return Kernel(name, self.phase, "memory", nbytes(args[1]), nbytes(args[0]))
        return Kernel(name, self.phase, "memory", nbytes(args, kwargs), nbytes(out))


class Fp8Rule:
    """How the FP8 dense baseline is priced: the same FP8 GEMMs and quantization as the op.

    The op (``activation_2by4_fp8``, see ``hf_sparse/model/fp8.py``) runs its forward and
    input-gradient GEMMs (y3 = y2s·W_downᵀ, dx = dy1·W_up: T×F by F×d) in row-wise scaled FP8,
    the rest in bf16; the baseline is the dense FFN with the same two GEMMs as
    ``torch._scaled_mm``. Row-wise scales group values along the reduction dim: a T×F operand
    that a fused stage writes and a GEMM reduces along F is written as FP8 by that stage (no
    extra pass); any other operand (here the weights) costs one quantization kernel per
    (tensor, orientation): read bf16, write FP8. GEMM outputs are bf16, their scales applied
    in one pass over the T×d result (as the op applies them).
    """

    def __init__(self, tokens: int):
        self.tokens = tokens
        self._stage_outputs: dict[int, Kernel] = {}
        self._fused: set[int] = set()
        self._quantized: set[tuple[int, bool]] = set()
        self._alive: list[torch.Tensor] = []  # ids stay unique while the trace runs

    def stage_wrote(self, kernel: Kernel, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == self.tokens and t.is_contiguous():
                self._stage_outputs[id(t)] = kernel
                self._alive.append(t)

    def operand(self, rec: "KernelRecorder", t: torch.Tensor, reduce_last: bool) -> int:
        """Bytes an FP8 GEMM reads for operand ``t`` (adding its quantization, if any)."""
        base = t if t._base is None else t._base
        transposed = t is not base and t.dim() == 2 and t.stride(0) == 1 and t.shape[0] > 1
        along_base_rows = reduce_last != transposed  # the reduction runs along base's last dim
        stage = self._stage_outputs.get(id(base))
        numel = t.numel()
        if stage is not None and along_base_rows:
            if id(base) not in self._fused:
                self._fused.add(id(base))
                stage.written -= numel * (base.element_size() - 1)  # written once, as FP8
            return numel
        key = (id(base), along_base_rows)
        if key not in self._quantized:
            self._quantized.add(key)
            self._alive.append(base)
            shape = "x".join(map(str, t.shape))
            along = "rows" if along_base_rows else "columns"
            rec.add(Kernel(f"quantize fp8 [{shape}, scales per {along}]", rec.phase, "memory",
                           numel * base.element_size(), numel))  # fmt: skip
        return numel


def meta(*shape, grad=False):
    return torch.empty(*shape, device="meta", dtype=DTYPE, requires_grad=grad)


# ----- (a) dense eager, (b) dense fused -----


def trace_dense_eager(t: int, d: int, f: int) -> list[Kernel]:
    x, w_up, w_down = meta(t, d, grad=True), meta(f, d, grad=True), meta(d, f, grad=True)
    dy3 = meta(t, d)
    rec = KernelRecorder()
    with rec:
        y3 = sparse_ffn.relu2_ffn_reference(x, w_up, w_down)
        rec.phase = "bwd"
        y3.backward(dy3)
    return rec.kernels


def _relu_square(y1):
    return y1.clamp(min=0).square()


def _relu_square_backward(dy2, y1):
    return dy2 * 2.0 * y1.clamp(min=0)


def trace_dense_fused(t: int, d: int, f: int, fp8: bool = False) -> list[Kernel]:
    """The dense FFN with its elementwise work fused (y1 and y2 saved, as compile saves them);
    ``fp8``: y3 and dx as row-wise scaled FP8 GEMMs (``torch._scaled_mm``), as the op has them."""
    x, w_up, w_down, dy3 = meta(t, d), meta(f, d), meta(d, f), meta(t, d)
    rec = KernelRecorder(Fp8Rule(t) if fp8 else None)
    with rec:
        y1 = torch.mm(x, w_up.t())
        y2 = rec.fused("fused relu²", _relu_square, y1)
        rec.mm(y2, w_down.t(), fp8=True)  # y3: FP8 in the FP8 variant, as in the op
        rec.phase = "bwd"
        dy2 = torch.mm(dy3, w_down)
        dy1 = rec.fused("fused relu² backward", _relu_square_backward, dy2, y1)
        rec.mm(dy1, w_up, fp8=True)  # dx: likewise
        torch.mm(dy1.t(), x)
        torch.mm(dy3.t(), y2)
    return rec.kernels


# ----- (c) the 2:4 op on its cuSPARSELt path -----


def compressed_bytes(a: torch.Tensor, element_size: int | None = None) -> int:
    kept = a.numel() // 2
    return kept * (element_size or a.element_size()) + kept * METADATA_BITS_PER_KEPT_VALUE // 8


@contextlib.contextmanager
def patched_op_internals(rec: KernelRecorder):
    """Route the op's stages and sparse GEMMs through ``rec`` (restored on exit)."""

    def run_stage(stage, *args):
        # The stages' output-buffer parameters (*_out, out, *_members) are not reads.
        bound = inspect.signature(stage).bind(*args).arguments
        outs = [v for k, v in bound.items() if k == "out" or k.endswith("_out") or k.endswith("members")]
        return rec.fused(f"stage {stage.__name__}", stage, *args, stage=stage.__name__, write_only=outs)

    def sparse24_mm(a, b, *, transpose_result=False):
        m, k = a.shape
        n = b.shape[1]
        # The real wrapper copies operands cuSPARSELt cannot read as they are; the op
        # should never need it, but a copy would show up here as an extra kernel.
        if not a.is_contiguous():
            a = a.contiguous()
        if not (b.is_contiguous() or b.t().is_contiguous()):
            b = b.contiguous()
        shapes = f"{m}x{k}"
        out = a.new_empty((n, m) if transpose_result else (m, n))
        if rec.fp8 is not None:
            # FP8 operands (quantized by the rule), compressed at one byte per kept value.
            a_bytes = rec.fp8.operand(rec, a, reduce_last=True)
            b_bytes = rec.fp8.operand(rec, b, reduce_last=False)
            packed = compressed_bytes(a, element_size=1)
            precision = "fp8"
        else:
            a_bytes, b_bytes, packed, precision = nbytes(a), nbytes(b), compressed_bytes(a), "bf16"
        rec.add(Kernel(f"cslt_compress [{shapes}]", rec.phase, "memory", a_bytes, packed))
        rec.add(
            Kernel(
                f"cslt_sparse_mm [{shapes},{k}x{n}]", rec.phase, "sparse_gemm",
                packed + b_bytes, nbytes(out), 2.0 * m * n * k, precision=precision,
            )
        )  # fmt: skip
        return out

    def quantize_rows(w):
        # One kernel: read the bf16 weight, write its FP8 values and row scales.
        values = torch.empty(w.shape, device="meta", dtype=torch.float8_e4m3fn)
        scales = torch.empty(w.shape[0], 1, device="meta", dtype=torch.float32)
        rec.add(Kernel(f"quantize fp8 [{_describe(w)}]", rec.phase, "memory", nbytes(w), nbytes(values, scales)))
        return values, scales

    def sparse24_mm_fp8(a, a_scale, bt, b_scale, dtype):
        m, k = a.shape
        n = bt.shape[0]
        packed = compressed_bytes(a)
        out = torch.empty(m, n, device="meta", dtype=dtype)
        rec.add(Kernel(f"cslt_compress fp8 [{m}x{k}]", rec.phase, "memory", nbytes(a), packed))
        rec.add(Kernel(f"cslt_sparse_mm fp8 [{m}x{k},{k}x{n}]", rec.phase, "sparse_gemm", packed + nbytes(bt, a_scale, b_scale),
                       nbytes(out), 2.0 * m * n * k, precision="fp8"))  # fmt: skip
        rec.add(Kernel(f"fp8 scales [{m}x{n}]", rec.phase, "memory", nbytes(out), nbytes(out)))
        return out

    names = ("_run_stage", "sparse24_mm", "sparse24_mm_fp8", "quantize_rows")
    saved = {name: getattr(sparse_ffn, name) for name in names}
    for name, fn in zip(names, (run_stage, sparse24_mm, sparse24_mm_fp8, quantize_rows)):
        setattr(sparse_ffn, name, fn)
    kernels.set_kernel_override(True)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(sparse_ffn, name, fn)
        kernels.set_kernel_override(None)


def n_dense_features(f: int) -> int:
    # The op's own rule on its cuSPARSELt path (ceil, then rounded up to 8).
    return kernels.aligned_dense_count(sparse_ffn.dense_feature_count(f, DENSE_FEATURES, "split_gemm"), f)


def trace_sparse_op(t: int, d: int, f: int, fp8: bool = False) -> list[Kernel]:
    """The op on its cuSPARSELt path, traced as it runs; ``fp8``: its own FP8 mode (y3 and dx
    as FP8 2:4 GEMMs, operands quantized in the stages, weights by one kernel each)."""
    x, w_up, w_down, dy3 = meta(t, d), meta(f, d), meta(d, f), meta(t, d)
    n_dense = n_dense_features(f)
    rec = KernelRecorder()
    with patched_op_internals(rec), rec:
        y3, g, y2s, counts, _stats = sparse_ffn._ffn_forward_impl(
            x, w_up, w_down, "naive", "split_gemm", n_dense, True, True, fp8
        )
        rec.phase = "bwd"
        sparse_ffn._ffn_backward_impl(
            dy3, x, w_up, w_down, g, y2s, counts, "naive", "split_gemm", n_dense, True, True, True, True, fp8
        )  # fmt: skip
    return rec.kernels


def trace_permutation(t: int, d: int) -> list[Kernel]:
    """Token permute before the op and un-permute after, fwd+bwd (the recipe's extra, outside the op)."""
    perm = torch.empty(t, device="meta", dtype=torch.int64)
    x, y, grad = meta(t, d, grad=True), meta(t, d, grad=True), meta(t, d)
    rec = KernelRecorder()
    with rec:
        xp = x.index_select(0, perm)
        out = y.new_empty(y.shape).index_copy(0, perm, y)
        rec.phase = "bwd"
        torch.autograd.backward((xp, out), (grad, grad))
    return rec.kernels


# ----- Report -----


@dataclass
class Summary:
    memory_kernels: int
    memory_bytes: int
    memory_s: float
    gemms: int
    gemm_s: float

    @property
    def total_s(self) -> float:
        return self.memory_s + self.gemm_s


def summarize(ks: list[Kernel], hw: Machine) -> Summary:
    mem = [k for k in ks if k.kind == "memory"]
    gemm = [k for k in ks if k.kind != "memory"]
    return Summary(
        len(mem), sum(k.bytes for k in mem), sum(map(hw.seconds, mem)), len(gemm), sum(map(hw.seconds, gemm))
    )


def print_assumptions(args) -> None:
    print("MODEL, not a measurement: a modelled H100 SXM, one FFN forward+backward")
    print(f"  HBM bandwidth            {args.bandwidth_tbs:g} TB/s, datasheet peak, for every non-GEMM kernel "
          "(--bandwidth-tbs; a kernel at efficiency e costs 1/e passes: see the sensitivity table)")  # fmt: skip
    print(f"  dense bf16 GEMM          {args.dense_tflops:g} TFLOPS effective (--dense-tflops)")
    print(f"  dense FP8 GEMM           {args.fp8_dense_factor:g}x the bf16 rate (--fp8-dense-factor; datasheet FP8/bf16 peak)")
    print(f"  2:4 bf16 GEMM            {args.bf16_sparse_speedup:g}x the dense bf16 GEMM (--bf16-sparse-speedup)")
    print(f"  2:4 FP8 GEMM             {args.fp8_sparse_speedup:g}x the dense FP8 GEMM (--fp8-sparse-speedup)")
    print(f"  launch overhead          {args.launch_us:g} us per kernel, every kernel (--launch-us)")
    print("  kernel time              max(bytes / bandwidth, flops / throughput) + launch; non-GEMMs: flops = 0")
    print("  eager aten op            one kernel; reads its tensor operands in full, writes its outputs;")
    print("                           views and allocations are free; index_select reads only what it")
    print("                           gathers, index_copy_ writes only its source rows")
    print("  2:4 op stage             one fused kernel: tensor inputs read once, tensor outputs written once")
    print(
        f"  cuSPARSELt compress      reads A, writes A/2 values + {METADATA_BITS_PER_KEPT_VALUE} bits metadata "
        "per kept value, once per sparse GEMM (counted: it is part of every activation 2:4 GEMM)"
    )
    print("  2:4 GEMM                reads compressed A + dense B, writes C (bf16)")
    print("  FP8                      y3 and dx in row-wise scaled FP8 (the op's activation_2by4_fp8), the other")
    print("                           GEMMs bf16, in both; T×F operands quantized by their stage, weights by one")
    print("                           kernel each, scales applied in one pass over the result (see Fp8Rule)")
    print(
        f"  2:4 op configuration     method naive, backward split_gemm, n_dense = ceil({DENSE_FEATURES}·F) rounded "
        "up to 8, telemetry and per-feature counts on; token permutation in its own row"
    )
    print("  baseline                 (b) the compiled dense FFN in the same precision; eager shown beside it")
    print("  pass                     bytes of one T×F bf16 tensor (T tokens × F FFN width × 2 bytes)")


def print_table(rows) -> None:
    header = (
        f"{'shape':>16} {'variant':<26} {'non-GEMM':>8} {'GB':>7} {'T×F':>6} {'mem ms':>7} "
        f"{'GEMMs':>5} {'GEMM ms':>8} {'total ms':>9} {'vs compiled':>11} {'vs eager':>8}"
    )
    print(header)
    print("-" * len(header))
    for shape, variant, s, pass_bytes, compiled, eager in rows:
        print(
            f"{shape:>16} {variant:<26} {s.memory_kernels:8d} {s.memory_bytes / 1e9:7.2f} "
            f"{s.memory_bytes / pass_bytes:6.1f} {s.memory_s * 1e3:7.3f} {s.gemms:5d} {s.gemm_s * 1e3:8.3f} "
            f"{s.total_s * 1e3:9.3f} {s.total_s / compiled:11.2f} {s.total_s / eager:8.2f}"
        )
    print("non-GEMM = kernels outside the GEMMs; T×F = their bytes in passes over a T×F bf16 tensor;")
    print("vs compiled = against (b) in the same precision (FP8 rows: against the FP8 dense FFN)")


SENSITIVITY_SPEEDUPS = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6)
SENSITIVITY_PASSES = (10, 15, 20, 25, 30)


def sensitivity(sparse: list[Kernel], dense_compiled: list[Kernel], hw: Machine, pass_bytes: int):
    """Modelled 2:4/compiled-dense ratio over a grid of 2:4 GEMM speed-ups and non-GEMM
    passes (the op's GEMM flops and kernel count fixed), and the break-even speed-up per
    pass count (None where no speed-up reaches it)."""
    base = summarize(dense_compiled, hw).total_s
    sparse_gemm_s = sum(k.flops / hw.gemm_flops(k) * (hw.bf16_sparse_speedup if k.precision == "bf16"
                        else hw.fp8_sparse_speedup) for k in sparse if k.kind == "sparse_gemm")  # fmt: skip
    other_gemm_s = sum(hw.seconds(k) - hw.launch_s for k in sparse if k.kind == "gemm")
    launches = len(sparse) * hw.launch_s
    grid, even = {}, {}
    for passes in SENSITIVITY_PASSES:
        memory_s = passes * pass_bytes / hw.bandwidth
        fixed = other_gemm_s + memory_s + launches
        for speedup in SENSITIVITY_SPEEDUPS:
            grid[passes, speedup] = (fixed + sparse_gemm_s / speedup) / base
        room = base - fixed
        even[passes] = sparse_gemm_s / room if room > 0 else None
    return grid, even


def print_sensitivity(label: str, grid, even, measured_passes: float) -> None:
    print(f"\nSensitivity at {label}, bf16, vs the compiled dense FFN (model): ratio by 2:4 GEMM speed-up (columns)")
    print(f"and the op's non-GEMM passes over T×F (rows; this op: {measured_passes:.1f}); < 1 means faster")
    print(f"{'passes':>7} " + " ".join(f"{s:>6.1f}x" for s in SENSITIVITY_SPEEDUPS) + "   break-even speed-up")
    for passes in SENSITIVITY_PASSES:
        cells = " ".join(f"{grid[passes, s]:7.2f}" for s in SENSITIVITY_SPEEDUPS)
        need = even[passes]
        print(f"{passes:>7} {cells}   {'none' if need is None else f'{need:.2f}x'}")


def print_breakdown(label: str, ks: list[Kernel], hw: Machine, pass_bytes: int) -> None:
    print(f"\n2:4 op kernels at {label} (model; passes = bytes / one T×F bf16 tensor)")
    header = f"{'phase':<5} {'kind':<11} {'MB read':>9} {'MB written':>10} {'passes':>7} {'us':>8}  kernel [operand shapes]"
    print(header)
    print("-" * len(header))
    for k in ks:
        print(
            f"{k.phase:<5} {k.kind:<11} {k.read / 1e6:9.1f} {k.written / 1e6:10.1f} {k.bytes / pass_bytes:7.2f} "
            f"{hw.seconds(k) * 1e6:8.1f}  {k.name}"
        )


# ----- Supporting evidence: how many kernels CPU inductor makes of each stage -----


def _stage_cases(t: int, f: int, device: str):
    """(name, stage, args) as the op calls each stage, at a small shape."""
    gen = torch.Generator().manual_seed(0)
    n_dense = n_dense_features(f)
    n_sparse = f - n_dense
    pad = kernels.sparse24_padded_rows(n_sparse) - n_sparse
    order = torch.randperm(f, generator=gen)
    dense_idx, sparse_idx = order[:n_dense].to(device), order[n_dense:].sort().values.to(device)
    y1 = torch.randn(t, f, generator=gen).to(device, DTYPE)
    g = (torch.randn(t, f, generator=gen).clamp(min=0) * 2).to(device, DTYPE)
    dy2 = torch.randn(t, f, generator=gen).to(device, DTYPE)
    return [
        ("_forward_stage", sparse_ffn._forward_stage, (y1, None, "naive", True, True)),
        (
            "_backward_stage",
            sparse_ffn._backward_stage,
            (dy2, g, None, True, True, True, dense_idx, sparse_idx, pad, True),
        ),
    ]


_ELEMENT_BYTES = {"BFloat16": 2, "Half": 2, "bool": 1, "int8_t": 1, "uint8_t": 1, "int16_t": 2, "int32_t": 4,
                  "int64_t": 8, "float": 4, "double": 8}  # fmt: skip
_PTR = r"\b((?:in|out)_ptr\d+)\b"


def _buffer_numels(wrapper: str) -> dict[str, int]:
    """Element counts of the graph inputs and buffers named in inductor's ``call``."""
    numels = {}
    pattern = r"(?:assert_size_stride\((\w+),|(\w+) = (?:empty_strided_cpu\(|reinterpret_tensor\(\w+,))\s*\(([\d, ]*)\)"
    for name_a, name_b, dims in re.findall(pattern, wrapper):
        numels[name_a or name_b] = math.prod(int(v) for v in dims.replace(" ", "").split(",") if v)
    return numels


def _split_loop_nests(body: str) -> list[str]:
    """A CPU kernel's body cut at its top-level loops (each one a pass over its buffers)."""
    if "#pragma omp for" in body:
        return re.split(r"#pragma omp for", body)[1:]
    # Single-threaded code has no OpenMP pragmas: cut at the least-indented `for`s instead.
    indents = [len(m.group(1)) for m in re.finditer(r"(?m)^( *)for\(", body)]
    if not indents:
        return [body]
    return re.split(rf"(?m)^ {{{min(indents)}}}for\(", body)[1:]


def cpu_loop_nest_traffic(code: str) -> list[tuple[str, int, int, int]]:
    """(kernel, nest index, bytes read, bytes written) of every loop nest in inductor's CPU code.

    A nest that touches a buffer is charged the whole buffer once: an upper bound (a gather
    of 95% of the features is charged 100%, one of 5% too).
    """
    numels = _buffer_numels(code)
    nests = []
    defs = re.findall(r"(\w+) = async_compile\.cpp(?:_pybinding)?\(\[.*?\], r\'\'\'(.*?)\'\'\'", code, flags=re.S)
    for kernel_name, source in defs:
        signature, _, body = source.partition(")\n{")
        params = re.findall(r"([\w:]+)\s*\*\s*(\w+)\s*[,)]?", signature + ")")
        call = re.search(rf"\b{kernel_name}\((.*?)\)\n", code)
        if call is None:
            continue
        call_args = [a.strip() for a in call.group(1).split(",")]
        sizes = {}
        for (ctype, pname), arg in zip(params, call_args):
            sizes[pname] = numels.get(arg, 0) * _ELEMENT_BYTES.get(ctype.split("::")[-1], 4)
        for index, chunk in enumerate(_split_loop_nests(body)):
            read, written = set(), set()
            for line in chunk.splitlines():
                stored = re.search(r"(?:^\s*(out_ptr\d+)\s*\[[^=]*\]\s*=(?!=)|\.store\((out_ptr\d+))", line)
                target = (stored.group(1) or stored.group(2)) if stored else None
                if target:
                    written.add(target)
                    line = line.replace(target, "", 1)
                read.update(re.findall(_PTR, line))
            nests.append((kernel_name, index, sum(sizes.get(p, 0) for p in read), sum(sizes.get(p, 0) for p in written)))
    return nests


def inductor_check(t: int, f: int, device: str) -> dict[str, float]:
    """Compile each stage with inductor; print its kernels (and on CPU its loop-nest traffic).

    Returns, per stage, the CPU loop nests' traffic divided by the one-pass model's traffic
    (empty on CUDA, where only the Triton kernels are counted).
    """
    from torch._inductor.utils import run_and_get_code

    cpu = device == "cpu"
    pass_bytes = t * f * torch.finfo(DTYPE).bits // 8
    if cpu:
        print(f"\nCPU inductor (supporting evidence only; a GPU compiles to Triton): T={t}, F={f}, bf16")
        print(f"{'stage':<22} {'C++ kernels':>11} {'loop nests':>10} {'model T×F':>9} {'nests T×F':>9}  extern calls")
    else:
        print(f"\n{device} inductor: Triton kernels per stage, T={t}, F={f}, bf16")
        print(f"{'stage':<22} {'Triton kernels':>14}  extern calls")
    factors = {}
    for name, stage, args in _stage_cases(t, f, device):
        torch._dynamo.reset()
        compiled = torch.compile(stage, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True})
        outputs, codes = run_and_get_code(compiled, *args)
        code = "\n".join(codes)
        externs = ", ".join(sorted(set(re.findall(r"\b(extern_kernels\.\w+|aten\.\w+)\(", code)))) or "-"
        if not cpu:
            n_triton = len(re.findall(r"=\s*async_compile\.triton\(", code))
            print(f"{name:<22} {n_triton:14d}  {externs}")
            continue
        n_kernels = len(re.findall(r"=\s*async_compile\.cpp(?:_pybinding)?\(", code))
        nests = cpu_loop_nest_traffic(code)
        model = nbytes(args) + nbytes(outputs)
        measured = sum(r + w for _k, _i, r, w in nests)
        factors[name] = measured / model
        print(
            f"{name:<22} {n_kernels:11d} {len(nests):10d} {model / pass_bytes:9.2f} {measured / pass_bytes:9.2f}  "
            f"{externs}"
        )
        for _kernel, index, read, written in nests:
            print(f"{'':<22}   nest {index}: reads {read / pass_bytes:5.2f}, writes {written / pass_bytes:5.2f} T×F")
    return factors


def scale_stages(ks: list[Kernel], factors: dict[str, float]) -> list[Kernel]:
    """``ks`` with each stage's traffic multiplied by its measured CPU-inductor factor."""
    out = []
    for k in ks:
        f = factors.get(k.stage, 1.0)
        out.append(Kernel(k.name, k.phase, k.kind, round(k.read * f), round(k.written * f), k.flops, k.stage))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="130m,1b,7b", help="names (130m,1b,7b) or DxF, comma-separated")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--bandwidth-tbs", type=float, default=3.35, help="HBM bandwidth, TB/s (H100 SXM datasheet)")
    p.add_argument("--dense-tflops", type=float, default=700.0, help="effective dense bf16 GEMM TFLOPS")
    p.add_argument("--fp8-dense-factor", type=float, default=2.0, help="dense FP8 / dense bf16 GEMM rate")
    p.add_argument("--bf16-sparse-speedup", type=float, default=1.2, help="2:4 bf16 GEMM / dense bf16 GEMM")
    p.add_argument("--fp8-sparse-speedup", type=float, default=1.5, help="2:4 FP8 GEMM / dense FP8 GEMM")
    p.add_argument("--launch-us", type=float, default=3.0, help="fixed overhead per kernel, microseconds")
    p.add_argument("--breakdown", default="7b", help="shape whose 2:4 kernels are listed (name from --shapes)")
    p.add_argument(
        "--inductor-check", action="store_true",
        help="compile each stage with CPU inductor (~30 s), count its kernels and loop nests, and add a "
        "row with the stages priced at the loop nests' traffic",
    )  # fmt: skip
    p.add_argument("--inductor-shape", default="256x512", help="TxF for --inductor-check")
    p.add_argument(
        "--inductor-device", default="cpu",
        help="cpu: C++ kernels, loop nests and their traffic; cuda: Triton kernel count only",
    )  # fmt: skip
    args = p.parse_args(argv)

    hw = Machine(
        args.bandwidth_tbs * 1e12, args.dense_tflops * 1e12, args.dense_tflops * args.fp8_dense_factor * 1e12,
        args.bf16_sparse_speedup, args.fp8_sparse_speedup, args.launch_us * 1e-6,
    )  # fmt: skip
    shapes = parse_ffn_shapes(args.shapes)
    if args.tokens % kernels.ALIGN:
        p.error(f"--tokens must be a multiple of {kernels.ALIGN} for the cuSPARSELt path")
    print_assumptions(args)
    print(f"  tokens T                 {args.tokens}")
    factors = {}
    if args.inductor_check:
        t, f = (int(v) for v in args.inductor_shape.lower().split("x"))
        factors = inductor_check(t, f, args.inductor_device)
    print()

    rows, ratios, fp8_ratios, breakdown = [], {}, {}, None
    for name, d, f in shapes:
        t = args.tokens
        pass_bytes = t * f * torch.finfo(DTYPE).bits // 8
        eager = trace_dense_eager(t, d, f)
        compiled = trace_dense_fused(t, d, f)
        sparse = trace_sparse_op(t, d, f)
        fp8_dense = trace_dense_fused(t, d, f, fp8=True)
        fp8_sparse = trace_sparse_op(t, d, f, fp8=True)
        eager_s, compiled_s = summarize(eager, hw).total_s, summarize(compiled, hw).total_s
        fp8_compiled_s = summarize(fp8_dense, hw).total_s
        label = f"{name} {d}x{f}"
        bf16_rows = {
            "(a) dense eager": eager,
            "(b) dense compiled": compiled,
            "(c) 2:4 op": sparse,
            "(c) + token permutation": sparse + trace_permutation(t, d),
        }
        if factors:
            bf16_rows["(c), stages as CPU nests"] = scale_stages(sparse, factors)
        for variant, ks in bf16_rows.items():
            rows.append((label, variant, summarize(ks, hw), pass_bytes, compiled_s, eager_s))
        for variant, ks in {"(b) FP8 dense compiled": fp8_dense, "(c) FP8 2:4 op": fp8_sparse}.items():
            rows.append((label, variant, summarize(ks, hw), pass_bytes, fp8_compiled_s, eager_s))
        ratios[name] = summarize(sparse, hw).total_s / compiled_s
        fp8_ratios[name] = summarize(fp8_sparse, hw).total_s / fp8_compiled_s
        if name == args.breakdown:
            breakdown = (label, sparse, compiled, pass_bytes)
    print_table(rows)
    if breakdown is not None:
        label, sparse, compiled, pass_bytes = breakdown
        print_breakdown(label, sparse, hw, pass_bytes)
        passes = summarize(sparse, hw).memory_bytes / pass_bytes
        print_sensitivity(label, *sensitivity(sparse, compiled, hw, pass_bytes), passes)
    print()
    # The requested shape's ratios go last: scripts read the final two lines.
    for name in sorted(ratios, key=lambda n: n == args.breakdown):
        if name != args.breakdown:
            print(f"modelled 2:4/dense fwd+bwd at {name}: {ratios[name]:.2f} (fp8: {fp8_ratios[name]:.2f})")
    if args.breakdown in ratios:
        print(f"modelled 2:4/dense fwd+bwd at {args.breakdown}: {ratios[args.breakdown]:.2f}")
        print(f"modelled fp8 2:4/fp8 dense fwd+bwd at {args.breakdown}: {fp8_ratios[args.breakdown]:.2f}")


if __name__ == "__main__":
    main()
