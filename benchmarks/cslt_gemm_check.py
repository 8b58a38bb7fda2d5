"""Go/no-go for the 2:4 FFN on this GPU: are cuSPARSELt's 2:4 GEMMs faster than torch.mm?

    python benchmarks/cslt_gemm_check.py                    # 7B FFN shape, 16k tokens, bf16
    python benchmarks/cslt_gemm_check.py --shape 1b --repeats 50
    python benchmarks/cslt_gemm_check.py --cpu-smoke        # control flow only, emulated ops

The 2:4 FFN op (hf_sparse/model/sparse_ffn.py) runs four of its six GEMMs as
``torch._cslt_sparse_mm`` on an activation that ``torch._cslt_compress`` packs anew at every
call. The op can only beat the dense FFN if those four GEMMs, compression included, beat
torch.mm at the same sizes, so this is measured first:

1. dense vs sparse (pre-compressed A) and the compression alone, per GEMM, with the alg id
   the op uses now (HF_SPARSE_CSLT_ALG_ID, default 0); a provisional verdict;
2. alg-id tuning per GEMM: each id in [0, --max-alg-id) is checked against an fp32 reference
   on several fresh random draws, in the three B/result layouts the op uses (some ids are
   wrong only now and then, pytorch#155333); the ids that pass are timed;
3. the best verified id per GEMM (training's tuner makes the same choice per shape), the
   single id best for all four (HF_SPARSE_CSLT_ALG_ID: the one each shape tries first)
   and the verdict: geo-mean speed-up of the four GEMMs with that
   id, compression included; GO if above 1.

Ids are tried at the library's default split-k. cuSPARSELt's own pick per GEMM (alg id and
split-k, from torch._C._cusparselt.mm_search, or the alg id alone from the older
torch._cslt_sparse_mm_search) is printed for comparison; the op's per-shape tuning
(hf_sparse/model/gemm_tuning.py) verifies and times that pick with its split-k too.

Times are medians of CUDA-event intervals after a warm-up, dense and sparse interleaved.
Imports only torch (and benchmarks/machine.py) plus, where it can, hf_sparse's rule for
which alg ids training tries, so it sweeps the same ids; it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from machine import describe_machine  # benchmarks/machine.py, next to this script

ALG_ID_ENV = "HF_SPARSE_CSLT_ALG_ID"  # read by hf_sparse/model/kernels.py (not imported: torch only)
FFN_SHAPES = {"7b": (4096, 16384), "1b": (2048, 8192), "130m": (768, 3072)}  # (d, F)
DENSE_FEATURE_FRACTION = 0.05  # the op's split_gemm default: densest 5% of features stay dense
ALIGN = 64
# bf16 output rounding gives ~1e-3 relative error; a wrong kernel gives O(1).
REL_ERR_LIMIT = 2e-2
# (label, B is the transpose of a contiguous tensor, transpose_result): the three ways the op
# calls _cslt_sparse_mm with ONE alg id, so an id must be right in all of them.
LAYOUTS = (("B row-major", False, False), ("B transposed", True, False), ("result transposed", False, True))
# Below this geo-mean gain over the id the op already uses, a "faster" id is timing noise.
KEEP_CONFIGURED_WITHIN = 0.02
# The 6 ways of keeping 2 of 4, to draw random 2:4 patterns without a top-k.
TWO_OF_FOUR = torch.tensor([[i in pair for i in range(4)] for pair in itertools.combinations(range(4), 2)])


class GpuLost(RuntimeError):
    """The CUDA context died (a kernel faulted): nothing after this point can be trusted."""


@dataclass(frozen=True)
class Gemm:
    label: str
    m: int
    k: int
    n: int
    b_transposed: bool  # B is the transpose of a contiguous n x k tensor (W_down^T)
    transpose_result: bool
    b_name: str


@dataclass
class Tuning:
    gemm: Gemm
    passed: list = field(default_factory=list)
    unsupported: list = field(default_factory=list)
    wrong: dict = field(default_factory=dict)  # alg id -> why it was rejected
    worst_err: dict = field(default_factory=dict)
    dense_ms: float = math.nan
    compress_ms: float = math.nan
    sparse_ms: dict = field(default_factory=dict)
    searched: Optional[tuple] = None  # cuSPARSELt's own pick (alg id, split_k, split_k_mode), for comparison


def sparse_feature_rows(f: int) -> int:
    """Rows of the weight-gradient 2:4 operands, as the op makes them on the cuSPARSELt
    path: F minus the densest 5% (ceil, rounded up to 8), padded up to 16 rows
    (16384 -> 15568)."""
    n_dense = math.ceil(round(DENSE_FEATURE_FRACTION * f, 6))
    n_dense = min(f, -(-n_dense // 8) * 8)
    return -(-(f - n_dense) // 16) * 16


def ffn_gemms(d: int, f: int, tokens: int) -> list[Gemm]:
    """The four sparse GEMMs of the 2:4 FFN op; A is m x k with 2:4 groups along k."""
    f_s = sparse_feature_rows(f)
    return [
        Gemm("fwd y3=y2s.Wd^T", tokens, f, d, True, False, "W_down^T"),
        Gemm("bwd dx=dy1.Wu", tokens, f, d, False, False, "W_up"),
        Gemm("bwd dWu=dy1s^T.x", f_s, tokens, d, False, False, "x"),
        Gemm("bwd dWd=(y2s^T.dy3)^T", f_s, tokens, d, False, True, "dy3, result^T"),
    ]


class CusparseltOps:
    """The two PyTorch cuSPARSELt ops the FFN uses."""

    emulated = False

    def compress(self, a):
        return torch._cslt_compress(a)

    def sparse_mm(self, packed, b, transpose_result: bool, alg_id: int):
        return torch._cslt_sparse_mm(packed, b, transpose_result=transpose_result, alg_id=alg_id)

    def search(self, packed, b, transpose_result: bool) -> tuple:
        """(alg id, split_k, split_k_mode) the library picks by its own timing (unverified)."""
        binding = getattr(torch._C, "_cusparselt", None)
        if hasattr(binding, "mm_search"):
            alg_id, split_k, split_k_mode, _max_alg_id = binding.mm_search(
                packed, b, None, None, None, transpose_result
            )
            return int(alg_id), int(split_k), int(split_k_mode)
        return int(torch._cslt_sparse_mm_search(packed, b, transpose_result=transpose_result)), 1, -1

    def default_max_alg_id(self) -> int:
        """The ids training's tuner tries (hf_sparse/model/gemm_tuning.py, ``_candidates``):
        torch's count where it knows one (cuSPARSELt 0.4.0/0.5.2/0.6.2), else up to
        MAX_CANDIDATES, where ids past the library's real end are refused at plan set-up
        (microseconds) and end the range, there as here."""
        try:
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            from hf_sparse.model.gemm_tuning import MAX_CANDIDATES, _reported_alg_count
        except ImportError:  # the script alone on a bare box: the same rule, restated
            count = torch.backends.cusparselt.get_max_alg_id()
            return min(count, 64) if isinstance(count, int) and count > 0 else 64
        count = _reported_alg_count()
        return min(count, MAX_CANDIDATES) if count is not None else MAX_CANDIDATES


class EmulatedOps:
    """Plain-torch stand-in for --cpu-smoke: cuSPARSELt's argument rules, a dense matmul on
    the pruned A, and planted faults so that every branch of the checks runs."""

    emulated = True
    SUPPORTED_IDS = 6
    FLAKY_ID = 3  # right on its first 6 calls, then wrong every 7th, like pytorch#155333
    BAD_TRANSPOSE_ID = 4  # wrong only with transpose_result

    def __init__(self):
        self.calls_per_id = {}

    def compress(self, a):
        if a.dim() != 2 or not a.is_contiguous() or a.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"compress needs a contiguous 2-D bf16/fp16 tensor, got {a.dtype} {tuple(a.stride())}")
        # The real compression silently garbles a non-2:4 input; the stand-in refuses it so
        # that a layout bug in this script shows up here rather than on the GPU.
        if bool(((a.view(a.shape[0], -1, 4) != 0).sum(-1) > 2).any()):
            raise ValueError("A is not 2:4 along dim 1")
        return a.clone()

    def sparse_mm(self, packed, b, transpose_result: bool, alg_id: int):
        if not 0 <= alg_id < self.SUPPORTED_IDS:
            raise RuntimeError(f"(emulated) alg id {alg_id} is not supported")
        if b.shape[0] != packed.shape[1] or not (b.is_contiguous() or b.t().is_contiguous()):
            raise ValueError(f"B {tuple(b.shape)} strides {b.stride()} would be misread")
        out = (packed.float() @ b.float()).to(packed.dtype)
        self.calls_per_id[alg_id] = self.calls_per_id.get(alg_id, 0) + 1
        if alg_id == self.FLAKY_ID and self.calls_per_id[alg_id] % 7 == 0:
            out = out.flip(0)
        if transpose_result:
            return out.reshape(out.shape[1], out.shape[0]) if alg_id == self.BAD_TRANSPOSE_ID else out.t().contiguous()
        return out

    def search(self, packed, b, transpose_result: bool) -> tuple:
        return 0, 2, 0

    def default_max_alg_id(self) -> int:
        return 8


class Timer:
    """Interval marks on the GPU stream (CUDA events) or the host clock; read after sync()."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def median_ms(fns: dict[str, Callable], timer: Timer, warmup: int, repeats: int) -> dict[str, float]:
    """Median time of each fn; the fns alternate within a round so clock and thermal drift hit
    all alike, and a round is synced once so host overhead hides behind queued GPU work."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        marks = []
        for name, fn in fns.items():
            start = timer.mark()
            fn()
            marks.append((name, start, timer.mark()))
        timer.sync()
        for name, start, end in marks:
            samples[name].append(timer.ms(start, end))
    return {name: statistics.median(values) for name, values in samples.items()}


def random_2to4(m: int, k: int, gen, device, dtype):
    """m x k normal values with exactly 2 non-zeros per group of 4 along k, at random places."""
    values = torch.randn(m, k // 4, 4, generator=gen, device=device)
    keep = TWO_OF_FOUR.to(device)[torch.randint(0, len(TWO_OF_FOUR), (m, k // 4), generator=gen, device=device)]
    return values.mul_(keep).view(m, k).to(dtype)


def random_b(gemm: Gemm, gen, device, dtype, transposed: bool):
    """k x n operand, either contiguous or the transpose of a contiguous n x k tensor."""
    if transposed:
        return torch.randn(gemm.n, gemm.k, generator=gen, device=device).to(dtype).t()
    return torch.randn(gemm.k, gemm.n, generator=gen, device=device).to(dtype)


def dense_mm(a, b, transpose_result: bool):
    # Same output layout as the sparse call: (AB)^T contiguous is B^T A^T, which is how the
    # dense FFN computes dW_down (dy3^T y2).
    return torch.mm(b.t(), a.t()) if transpose_result else torch.mm(a, b)


def rel_error(out, ref, transpose_result: bool) -> float:
    got = (out.t() if transpose_result else out).float()
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf


def check_context(device, what: str):
    """Raise GpuLost if a failed call took the CUDA context down with it."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize()
        torch.ones(1, device=device).add_(1).item()
    except Exception as exc:  # any CUDA error here means the context is unusable
        raise GpuLost(f"CUDA context lost after {what}: {exc}") from exc


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ''}"


def make_generator(device, seed: int):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def id_ranges(ids: list[int]) -> str:
    """[6, 7, 8, 10] -> '6-8, 10'."""
    parts = []
    for _, run in itertools.groupby(enumerate(sorted(ids)), lambda pair: pair[1] - pair[0]):
        run = [alg for _, alg in run]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(parts)


def geo_mean(values) -> float:
    values = list(values)
    if not values or any(not v > 0 for v in values):
        return math.nan
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ----- 1. dense vs sparse at the configured alg id -----


def first_look(gemms, ops, args, device, dtype, timer, alg_id):
    """Per GEMM: (dense ms, sparse ms or None, compress ms, check text, sparse ok)."""
    rows = []
    for index, gemm in enumerate(gemms):
        gen = make_generator(device, 1000 + index)
        a = random_2to4(gemm.m, gemm.k, gen, device, dtype)
        b = random_b(gemm, gen, device, dtype, gemm.b_transposed)
        packed = ops.compress(a)
        ref = a.float() @ b.float()
        fns = {"dense": lambda: dense_mm(a, b, gemm.transpose_result), "compress": lambda: ops.compress(a)}
        try:
            err = rel_error(ops.sparse_mm(packed, b, gemm.transpose_result, alg_id), ref, gemm.transpose_result)
            fns["sparse"] = lambda: ops.sparse_mm(packed, b, gemm.transpose_result, alg_id)
            ok = err <= REL_ERR_LIMIT
            check = f"{'ok' if ok else 'WRONG'} {err:.1e}"
        except RuntimeError as exc:
            check_context(device, f"alg id {alg_id} on {gemm.label}")
            ok, check = False, f"error ({short(exc)})"
        dense_err = rel_error(dense_mm(a, b, gemm.transpose_result), ref, gemm.transpose_result)
        if dense_err > REL_ERR_LIMIT:
            check += f"; dense itself off by {dense_err:.1e}"
        times = median_ms(fns, timer, args.warmup, args.repeats)
        rows.append((gemm, times["dense"], times.get("sparse"), times["compress"], check, ok))
        a = b = packed = ref = None  # freed before the next GEMM's operands
    return rows


def print_first_look(rows, alg_id):
    print(f"\n[1/3] sparse vs dense GEMMs, alg id {alg_id} (what the op uses now), median ms")
    header = (
        f"{'GEMM':<22} {'m':>6} {'k':>6} {'n':>5} {'B':<14} {'dense':>8} {'sparse':>8} {'x':>6} "
        f"{'compress':>8} {'x incl.':>7}  check vs fp32"
    )
    print(header)
    print("-" * len(header))
    with_compress = []
    for gemm, dense, sparse, compress, check, _ in rows:
        if sparse is None:
            cells = f"{'-':>8} {'-':>6} {compress:8.3f} {'-':>7}"
        else:
            with_compress.append(dense / (sparse + compress))
            cells = f"{sparse:8.3f} {dense / sparse:5.2f}x {compress:8.3f} {with_compress[-1]:6.2f}x"
        print(f"{gemm.label:<22} {gemm.m:6d} {gemm.k:6d} {gemm.n:5d} {gemm.b_name:<14} {dense:8.3f} {cells}  {check}")
    return with_compress


# ----- 2. alg-id tuning -----


def verify_alg_ids(gemm, ops, args, device, dtype, alg_ids, seed) -> Tuning:
    """Drop every id that raises or is off the fp32 reference in any layout on any draw."""
    tuning = Tuning(gemm)
    alive = list(alg_ids)
    for draw in range(args.verify_repeats):
        gen = make_generator(device, seed + draw)
        a = random_2to4(gemm.m, gemm.k, gen, device, dtype)
        packed = ops.compress(a)
        b_rows = random_b(gemm, gen, device, dtype, transposed=False)
        b_cols = b_rows.t().contiguous().t()  # same values, stored as the transpose
        ref = a.float() @ b_rows.float()
        for alg in list(alive):
            for label, b_transposed, transpose_result in LAYOUTS:
                try:
                    out = ops.sparse_mm(packed, b_cols if b_transposed else b_rows, transpose_result, alg)
                    err = rel_error(out, ref, transpose_result)
                except RuntimeError as exc:
                    check_context(device, f"alg id {alg} on {gemm.label} ({label})")
                    if draw == 0 and label == LAYOUTS[0][0]:
                        tuning.unsupported.append(alg)  # refused outright: not an id for this GEMM
                    else:
                        tuning.wrong[alg] = f"{short(exc)} ({label}, draw {draw + 1})"
                    alive.remove(alg)
                    break
                if err > REL_ERR_LIMIT:
                    tuning.wrong[alg] = f"rel. error {err:.2g} ({label}, draw {draw + 1}/{args.verify_repeats})"
                    alive.remove(alg)
                    break
                tuning.worst_err[alg] = max(tuning.worst_err.get(alg, 0.0), err)
        del a, packed, b_rows, b_cols, ref
    tuning.passed = alive
    return tuning


def time_alg_ids(tuning: Tuning, ops, args, device, dtype, timer, seed):
    """Dense, compression and every verified id, interleaved, on the GEMM's own layout."""
    gemm = tuning.gemm
    gen = make_generator(device, seed)
    a = random_2to4(gemm.m, gemm.k, gen, device, dtype)
    b = random_b(gemm, gen, device, dtype, gemm.b_transposed)
    packed = ops.compress(a)
    try:
        tuning.searched = ops.search(packed, b, gemm.transpose_result)
    except (RuntimeError, AttributeError) as exc:
        check_context(device, f"cuSPARSELt's search on {gemm.label}")
        print(f"  (cuSPARSELt's own search failed: {short(exc)})")
    fns = {"dense": lambda: dense_mm(a, b, gemm.transpose_result), "compress": lambda: ops.compress(a)}
    for alg in tuning.passed:
        fns[alg] = lambda alg=alg: ops.sparse_mm(packed, b, gemm.transpose_result, alg)
    times = median_ms(fns, timer, args.warmup, args.repeats)
    tuning.dense_ms = times.pop("dense")
    tuning.compress_ms = times.pop("compress")
    tuning.sparse_ms = times


def print_tuning_detail(tuning: Tuning, args):
    gemm = tuning.gemm
    print(f"{gemm.label} (m={gemm.m}, k={gemm.k}, n={gemm.n}):")
    print(
        f"  verified ({args.verify_repeats} draws x {len(LAYOUTS)} layouts): "
        f"{id_ranges(tuning.passed) or 'none'}"
        + (f"; worst error {max(tuning.worst_err[a] for a in tuning.passed):.1e}" if tuning.passed else "")
    )
    for alg, why in sorted(tuning.wrong.items()):
        print(f"  REJECTED alg id {alg}: {why}")
    if tuning.unsupported:
        print(f"  unsupported: {id_ranges(tuning.unsupported)}")
    if tuning.searched is not None:
        alg, split_k, split_k_mode = tuning.searched
        verdict = "verified" if alg in tuning.passed else "NOT verified"
        split = "" if (split_k, split_k_mode) == (1, -1) else f" with split-k {split_k}, mode {split_k_mode}"
        print(f"  cuSPARSELt's own search picks alg id {alg}{split} (alg id {alg} at the default split-k: {verdict})")


def print_tuning_table(tunings: list[Tuning]):
    ids = sorted({alg for t in tunings for alg in t.sparse_ms} | {alg for t in tunings for alg in t.wrong})
    print("\nsparse ms per alg id (dense ms in the first row; 'wrong' = failed the check, '-' = unsupported)")
    width = max(12, *(len(t.gemm.label) for t in tunings))
    print(f"{'alg id':>7} " + " ".join(f"{t.gemm.label:>{width}}" for t in tunings))
    print(f"{'dense':>7} " + " ".join(f"{t.dense_ms:>{width}.3f}" for t in tunings))
    for alg in ids:
        cells = []
        for t in tunings:
            if alg in t.sparse_ms:
                best = alg == min(t.sparse_ms, key=t.sparse_ms.get)
                cells.append(f"{t.sparse_ms[alg]:.3f} {t.dense_ms / t.sparse_ms[alg]:.2f}x{'*' if best else ' '}")
            else:
                cells.append("wrong" if alg in t.wrong else "-")
        print(f"{alg:>7} " + " ".join(f"{c:>{width}}" for c in cells))
    print("(* = fastest verified id for that GEMM; x = dense/sparse, compression not included)")


def choose_single_id(tunings: list[Tuning], configured_id: int):
    """The id verified on every GEMM whose times are, in geo-mean, closest to each GEMM's best;
    the configured id if it is verified everywhere and within KEEP_CONFIGURED_WITHIN of that."""
    common = set.intersection(*(set(t.sparse_ms) for t in tunings))
    if not common:
        return None, math.nan

    def slowdown(alg):
        return geo_mean(t.sparse_ms[alg] / min(t.sparse_ms.values()) for t in tunings)

    best = min(sorted(common), key=slowdown)
    if configured_id in common and slowdown(configured_id) <= slowdown(best) * (1 + KEEP_CONFIGURED_WITHIN):
        best = configured_id
    return best, slowdown(best)


# ----- 3. verdict -----


def speedups(tunings: list[Tuning], pick: Callable[[Tuning], int]):
    """Per GEMM dense/(sparse + compress), and the time-weighted ratio over the four."""
    per_gemm = [t.dense_ms / (t.sparse_ms[pick(t)] + t.compress_ms) for t in tunings]
    weighted = sum(t.dense_ms for t in tunings) / sum(t.sparse_ms[pick(t)] + t.compress_ms for t in tunings)
    return per_gemm, weighted


def print_final(tunings, single, shape_name, configured_id, device_name, tag) -> Optional[int]:
    print(f"\n[3/3] result at the {shape_name} shape")
    per_gemm_best = {t.gemm.label: min(t.sparse_ms, key=t.sparse_ms.get) for t in tunings if t.sparse_ms}
    for t in tunings:
        label = t.gemm.label
        print(f"  {label:<22} best verified alg id: {per_gemm_best.get(label, 'none')}")
    if len(per_gemm_best) == len(tunings):
        per_gemm, _ = speedups(tunings, lambda t: per_gemm_best[t.gemm.label])
        print(f"  geo-mean with each GEMM's own best id, compress included: {geo_mean(per_gemm):.2f}x")
    alg, slowdown = single
    if alg is None:
        print("  no alg id passed the check on all four GEMMs: the op (one id for all) has no safe choice")
        print(
            f"{tag}go/no-go: no cuSPARSELt alg id is correct for all four GEMMs at {shape_name} "
            f"-> NO-GO on {device_name}"
        )
        return None
    if set(per_gemm_best.values()) == {alg}:
        print(f"  alg id {alg} is the fastest verified id for every GEMM")
    else:
        kept = f" (kept: within {KEEP_CONFIGURED_WITHIN:.0%} of the best single id)" if alg == configured_id else ""
        print(
            f"  no id is fastest everywhere; alg id {alg} is verified on all four and takes "
            f"{(slowdown - 1) * 100:.1f}% longer than each GEMM's own best (geo-mean){kept}"
        )
    if alg == configured_id:
        print(f"  -> keep {ALG_ID_ENV}={alg} (what the op uses now)")
    else:
        print(f"  -> set {ALG_ID_ENV}={alg} (the op uses {configured_id} now)")
    header = f"  {'GEMM':<22} {'dense ms':>9} {'sparse ms':>9} {'x':>6} {'compress':>9} {'x incl.':>7}"
    print(f"\nthe four GEMMs with alg id {alg}:\n{header}")
    per_gemm, weighted = speedups(tunings, lambda t: alg)
    for t, both in zip(tunings, per_gemm):
        sparse = t.sparse_ms[alg]
        print(
            f"  {t.gemm.label:<22} {t.dense_ms:9.3f} {sparse:9.3f} {t.dense_ms / sparse:5.2f}x "
            f"{t.compress_ms:9.3f} {both:6.2f}x"
        )
    speedup = geo_mean(per_gemm)
    decision = "GO" if speedup > 1.0 else "NO-GO"
    print(
        f"{tag}go/no-go: sparse GEMMs {speedup:.2f}x dense (geo-mean of 4 GEMMs at {shape_name}, verified alg id "
        f"{alg}, compress included; time-weighted {weighted:.2f}x) -> {decision} on {device_name}"
    )
    return alg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7b", choices=sorted(FFN_SHAPES), help="FFN width d x F (default 7b)")
    parser.add_argument("--tokens", type=int, default=16384, help="T, a multiple of 64 (default 16384)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per median (default 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--verify-repeats", type=int, default=5, help="fresh random draws per alg id check")
    parser.add_argument("--max-alg-id", type=int, default=None, help="try ids [0, this); default: 64 or torch's count")
    parser.add_argument("--write-alg-id", metavar="PATH", help="write the recommended alg id to PATH (emptied if none)")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes, emulated sparse ops on CPU: checks this script, measures nothing",
    )
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # keep printed lines if a timeout kills the run

    if args.tokens <= 0 or args.tokens % ALIGN:
        parser.error(f"--tokens must be a positive multiple of {ALIGN}")
    d, f = FFN_SHAPES[args.shape]
    dtype = torch.bfloat16
    try:
        configured_id = int(os.environ.get(ALG_ID_ENV, "").strip() or 0)
    except ValueError:  # kernels.py ignores a non-integer value the same way
        configured_id = 0

    if args.cpu_smoke:
        device, ops = torch.device("cpu"), EmulatedOps()
        print(
            "CPU SMOKE: the sparse ops are EMULATED (dense matmul on the 2:4-pruned A, planted faults in "
            f"alg ids {EmulatedOps.FLAKY_ID} and {EmulatedOps.BAD_TRANSPOSE_ID}); every time below comes from "
            "that emulation and is NOT a measurement"
        )
        print(f"GEMM plan at the real {args.shape} shape (d={d}, F={f}, T={args.tokens}):")
        for gemm in ffn_gemms(d, f, args.tokens):
            print(f"  {gemm.label:<22} m={gemm.m} k={gemm.k} n={gemm.n} B={gemm.b_name}")
        shape_name, (d, f), args.tokens = "smoke", (64, 256), 256
        args.repeats, args.warmup = min(args.repeats, 3), min(args.warmup, 1)
        device_name = f"{describe_machine(device)} (emulated)"
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: nothing to measure (--cpu-smoke checks this script's control flow on CPU)")
            return 0
        device, ops = torch.device("cuda"), CusparseltOps()
        device_name = describe_machine(device)
        shape_name = args.shape
        reason = None
        if torch.cuda.get_device_capability(device) < (8, 0):
            reason = "2:4 sparse tensor cores need sm80 or newer"
        elif not torch.backends.cusparselt.is_available():
            reason = "this PyTorch build has no cuSPARSELt"
        if reason:
            print(f"go/no-go: not measurable on {device_name}: {reason}")
            return 2
    max_alg_id = args.max_alg_id if args.max_alg_id is not None else ops.default_max_alg_id()
    gemms = ffn_gemms(d, f, args.tokens)
    timer = Timer(device.type == "cuda")
    # Emulated verdicts are printed (the code path is what the smoke run checks) but marked.
    tag = "[EMULATED, not a measurement] " if ops.emulated else ""
    cusparselt = None if ops.emulated else torch.backends.cusparselt.version()
    print(f"device: {device_name}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuSPARSELt {cusparselt}")
    print(
        f"shape {shape_name}: d={d}, F={f}, T={args.tokens}, F_s={sparse_feature_rows(f)} (F minus the densest "
        f"{DENSE_FEATURE_FRACTION:.0%}, to a multiple of {ALIGN}), bf16; median of {args.repeats} after "
        f"{args.warmup} warm-up; alg ids [0, {max_alg_id}); error limit {REL_ERR_LIMIT:g} vs fp32"
    )
    if args.write_alg_id:
        open(args.write_alg_id, "w").close()  # a stale id from an earlier run must not survive a failure

    try:
        rows = first_look(gemms, ops, args, device, dtype, timer, configured_id)
        with_compress = print_first_look(rows, configured_id)
        wrong = [gemm.label for gemm, *_, ok in rows if not ok]
        if len(with_compress) == len(rows):
            provisional = geo_mean(with_compress)
            decision = "GO" if provisional > 1.0 and not wrong else "NO-GO"
            note = f"; WRONG results on {', '.join(wrong)}" if wrong else ""
            print(
                f"{tag}provisional go/no-go (alg id {configured_id}, before tuning): {provisional:.2f}x dense, "
                f"compress included{note} -> {decision}"
            )
        else:
            print(f"{tag}provisional go/no-go: alg id {configured_id} does not run on every GEMM -> see the tuning")

        print(
            f"\n[2/3] alg-id tuning: ids [0, {max_alg_id}), {args.verify_repeats} fresh draws x "
            f"{len(LAYOUTS)} layouts each ({', '.join(label for label, *_ in LAYOUTS)})"
        )
        tunings = []
        for index, gemm in enumerate(gemms):
            tuning = verify_alg_ids(gemm, ops, args, device, dtype, range(max_alg_id), seed=2000 + 100 * index)
            if tuning.passed:
                time_alg_ids(tuning, ops, args, device, dtype, timer, seed=3000 + index)
            print_tuning_detail(tuning, args)
            tunings.append(tuning)
        if any(t.sparse_ms for t in tunings):
            print_tuning_table([t for t in tunings if t.sparse_ms])
        if not all(t.sparse_ms for t in tunings):
            recommended = None
            missing = ", ".join(t.gemm.label for t in tunings if not t.sparse_ms)
            print(f"{tag}go/no-go: no alg id passed the check for {missing} -> NO-GO on {device_name}")
        else:
            single = choose_single_id(tunings, configured_id)
            recommended = print_final(tunings, single, shape_name, configured_id, device_name, tag)
    except GpuLost as exc:
        print(f"ABORTED: {exc}")
        print(
            "A crashing alg id cannot be skipped in-process: rerun with --max-alg-id at or below it. A "
            "provisional verdict above (untuned alg id) still holds."
        )
        return 3
    except RuntimeError:
        # e.g. cuSPARSELt refusing this GPU or shape: say so in the verdict's words, then show where.
        traceback.print_exc()
        print(f"{tag}go/no-go: not measured, the run failed (traceback above) on {device_name}")
        return 2
    if args.write_alg_id and recommended is not None:
        with open(args.write_alg_id, "w") as handle:
            handle.write(f"{recommended}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
