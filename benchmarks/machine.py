"""The machine line every benchmark prints with its figures, and the FFN shapes the FFN
benchmarks share."""

import os
import platform

import torch


def describe_machine(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def interleaved_step_times(step, names, blocks: int, steps_per_block: int) -> dict:
    """Time ``step(name)`` for two variants in alternating blocks (ABBA order), so that a
    shared machine's drifts hit both alike. Returns per-variant step times (seconds) and
    the per-block ratio of their medians, ``names[1] / names[0]``."""
    import statistics
    import time

    first, second = names
    times = {first: [], second: []}
    ratios = []
    for block in range(blocks):
        medians = {}
        for name in (first, second) if block % 2 == 0 else (second, first):
            block_times = []
            for _ in range(steps_per_block):
                start = time.perf_counter()
                step(name)
                block_times.append(time.perf_counter() - start)
            times[name] += block_times
            medians[name] = statistics.median(block_times)
        ratios.append(medians[second] / medians[first])
    return {"times": times, "ratios": ratios}


# (d, F) of the paper's model sizes, as the FFN benchmarks name them.
FFN_SHAPES = {"130m": (768, 3072), "1b": (2048, 8192), "7b": (4096, 16384)}


def parse_ffn_shapes(text: str) -> list[tuple[str, int, int]]:
    """``"130m,2048x8192"`` -> [(name, d, F), ...]: names from FFN_SHAPES or DxF."""
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if item in FFN_SHAPES:
            shapes.append((item, *FFN_SHAPES[item]))
        else:
            d, f = item.lower().split("x")
            shapes.append((item, int(d), int(f)))
    return shapes
