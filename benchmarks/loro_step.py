"""Optimizer-step time and memory: LOROAdamW (lazy / exact) vs torch AdamW.

Builds only the decoder linears of a LLaMA shape (q, k, v, o, gate, up, down per layer)
either as `LowRankLinear` (rank r) or as `nn.Linear`, fills them with random gradients
and times `optimizer.step()`:

  adamw_dense    torch.optim.AdamW (foreach) on the full-rank nn.Linear weights
  adamw_factors  torch.optim.AdamW on the low-rank factors (the lazy step's floor)
  loro_lazy      LOROAdamW, lazy factor steps (loro_freq large)
  loro_exact     LOROAdamW, exact Riemannian step on every step (loro_freq=1)

Memory: `state` is the optimizer state (exact, from its tensors); `step peak` is the
extra memory a step needs above what is allocated before it (params, grads, state):
torch.cuda.max_memory_allocated on GPU; on CPU the process's peak RSS (VmHWM, reset
through /proc/self/clear_refs after malloc_trim) minus the RSS before the step.

    python benchmarks/loro_step.py --device cpu --shapes 130m --repeats 3 --layers 4
"""

import argparse
import ctypes
import os
import statistics
import sys
import time

import torch

from machine import describe_machine  # benchmarks/machine.py
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_sparse.training.loro import LOROAdamW  # noqa: E402
from hf_sparse.model.lowrank import LowRankLinear  # noqa: E402


# hidden, intermediate, layers, rank (original LORO / GaLore LLaMA recipes)
SHAPES = {
    "60m": (512, 1376, 8, 128),
    "130m": (768, 2048, 12, 256),
    "350m": (1024, 2736, 24, 256),
    "1b": (2048, 5461, 24, 512),
}
VARIANTS = ("adamw_dense", "adamw_factors", "loro_lazy", "loro_exact")
MiB = 2**20


def linear_shapes(hidden, intermediate):
    """(in, out) of q, k, v, o, gate, up, down."""
    return [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]


def build(shape, layers, low_rank, device, dtype):
    hidden, intermediate, _, rank = SHAPES[shape]
    modules = nn.ModuleList()
    for _ in range(layers):
        for n_in, n_out in linear_shapes(hidden, intermediate):
            if low_rank:
                modules.append(LowRankLinear(n_in, n_out, rank, device=device, dtype=dtype))
            else:
                modules.append(nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype))
    gen = torch.Generator(device=device).manual_seed(0)
    for p in modules.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * 1e-3
    return modules


def make_optimizer(variant, modules, hidden):
    if variant.startswith("adamw"):
        # foreach=True: the multi-tensor path LOROAdamW uses (torch picks it by default on
        # GPU only), so CPU timings compare like with like.
        return torch.optim.AdamW(modules.parameters(), lr=1e-3, weight_decay=0.0, foreach=True)
    freq = 1 if variant == "loro_exact" else 10**9
    return LOROAdamW.from_model(modules, lr=1e-3, loro_freq=freq, hidden_size=hidden)


class CpuPeak:
    """Peak RSS above the current RSS, from /proc (Linux); None elsewhere."""

    def __init__(self):
        self.ok = os.path.exists("/proc/self/clear_refs")
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def reset(self):
        if not self.ok:
            return
        if self._libc is not None:
            # Give glibc's cached free heap back first, so the base RSS counts live memory
            # only; memory freed and reused inside the step is then counted once, as it is.
            self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.base = self._status("VmRSS")

    def peak_extra(self):
        return self._status("VmHWM") - self.base if self.ok else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(shape, variant, layers, repeats, device, dtype, cpu_peak):
    hidden = SHAPES[shape][0]
    modules = build(shape, layers, variant != "adamw_dense", device, dtype)
    opt = make_optimizer(variant, modules, hidden)
    opt.step()  # allocates the state (and compiles nothing: eager only)
    sync(device)
    params = sum(p.numel() for p in modules.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))

    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            cpu_peak.reset()
        sync(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) - before)
        else:
            peaks.append(cpu_peak.peak_extra())
    if variant == "loro_exact":
        assert opt.last_step_was_exact
    del opt, modules
    peak = max(peaks) if all(p is not None for p in peaks) else None
    return dict(params=params, state=state, median=statistics.median(times), best=min(times), peak=peak)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="130m,350m", help=f"comma list of {','.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (CPU time)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cpu_peak = CpuPeak() if device.type == "cpu" else None
    print(f"machine: {describe_machine(device)}; torch {torch.__version__}; dtype {args.dtype}; repeats {args.repeats}")
    if cpu_peak is not None and not cpu_peak.ok:
        print("note: /proc peak-RSS reset unavailable, step peak not measured")
    header = f"{'shape':<6} {'layers':>6} {'variant':<14} {'params M':>9} {'state MiB':>10} {'step ms':>10} {'best ms':>9} {'step peak MiB':>14}"
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        hidden, intermediate, layers, rank = SHAPES[shape]
        layers = args.layers or layers
        for variant in args.variants.split(","):
            res = run_variant(shape, variant, layers, args.repeats, device, dtype, cpu_peak)
            peak = f"{res['peak'] / MiB:14.1f}" if res["peak"] is not None else f"{'n/a':>14}"
            print(
                f"{shape:<6} {layers:>6} {variant:<14} {res['params'] / 1e6:9.2f} {res['state'] / MiB:10.1f} "
                f"{res['median'] * 1e3:10.1f} {res['best'] * 1e3:9.1f} {peak}",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  ({shape}: hidden {hidden}, intermediate {intermediate}, rank {rank})")


if __name__ == "__main__":
    main()
