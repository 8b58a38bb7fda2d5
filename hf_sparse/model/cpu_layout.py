"""The plain-GEMM path's planar feature order and its per-thread CPU scratch buffers.

Planar order: w_up's rows and w_down's columns permuted so that member k of feature
group j is feature k·F/4 + j; each 2:4 group's members are then four contiguous column
blocks of a T×F tensor, and the selection runs on unit-stride vectors. Scratch buffers:
the op's T×F intermediates reuse one buffer per slot, thread and dtype on CPU, where a
fresh allocation of that size page-faults on every call.

Shipped as HF remote code: imports only torch.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor


class _ScratchBuffers(threading.local):
    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}


_scratch_buffers = _ScratchBuffers()


def _scratch(slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised buffer for an intermediate that never leaves the op.

    CPU only: glibc serves allocations this large with fresh mmaps, and the first-touch
    page faults cost several times the writes themselves (a new 50 MB fp32 tensor: ~16 ms
    to fault in, ~2.5 ms to write once warm, on the benchmark machine). Each slot keeps
    one buffer per thread and dtype, reused by every layer and step while the shape stays
    the same. Other devices have caching allocators: a plain empty tensor.

    Exactly the requested shape, never a view into a larger buffer: compiled stages take
    member views of these buffers as inputs, and the aliasing base inductor sees must be
    the buffer itself (a hidden larger base failed inductor's size asserts).
    """
    shape = tuple(shape)
    if like.device.type != "cpu":
        return like.new_empty(shape)
    key = (slot, like.dtype)
    buf = _scratch_buffers.buffers.get(key)
    if buf is None or tuple(buf.shape) != shape:
        _scratch_buffers.buffers.pop(key, None)  # free the old one before allocating
        buf = _scratch_buffers.buffers[key] = like.new_empty(shape)
    return buf


def release_scratch_buffers() -> None:
    """Free this thread's CPU scratch buffers (the next call of the op allocates anew).

    They hold up to four T×F intermediates and two F×d weight copies per dtype for as
    long as the thread lives; call this after training to return the memory.
    """
    _scratch_buffers.buffers.clear()


def _planar_rows(w: Tensor, out: Tensor) -> Tensor:
    """``w`` (F×n) with its rows in the planar feature order, written into ``out``: member
    k of feature group j (row 4j + k) goes to row k·F/4 + j."""
    f = w.shape[0]
    out.view(4, f // 4, -1).copy_(w.view(f // 4, 4, -1).transpose(0, 1))
    return out


def _unplanar_rows(w: Tensor) -> Tensor:
    """Inverse of :func:`_planar_rows` (a new tensor)."""
    f = w.shape[0]
    return w.view(4, f // 4, -1).transpose(0, 1).reshape(f, -1)


def _unplanar_cols(w: Tensor) -> Tensor:
    """``w`` (n×F) with planar-ordered columns back in feature order (a new tensor)."""
    n, f = w.shape
    return w.view(n, 4, f // 4).transpose(1, 2).reshape(n, f)


def _op_weights(w_up: Tensor, w_down: Tensor, planar: bool) -> tuple[Tensor, Tensor]:
    """(w_up, w_down) as the op's GEMMs use them: in the planar feature order on the
    plain-GEMM path (rows of w_up, columns of w_down; copies into scratch buffers), as
    given on the cuSPARSELt path (its 2:4 groups must be consecutive)."""
    if not planar:
        return w_up, w_down
    f, d = w_up.shape
    up = _planar_rows(w_up, _scratch("w_up", (f, d), w_up))
    # Columns permuted within each row of w_down (reads and writes stay row by row); the
    # GEMMs then see w_down in its stock (out, F) row-major layout, as the dense FFN does.
    # (out is d, or more with activation_l1's row-sum rows.)
    out = w_down.shape[0]
    down = _scratch("w_down", (out, f), w_down)
    down.view(out, 4, f // 4).copy_(w_down.view(out, f // 4, 4).transpose(1, 2))
    return up, down
