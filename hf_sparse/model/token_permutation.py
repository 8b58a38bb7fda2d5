"""Token permutation for the backward 2:4 (the paper's optimisation 2): a fixed,
seeded permutation of the tokens, so token-wise 2:4 groups are not neighbouring tokens.

Shipped as HF remote code: imports only torch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_MASK31 = (1 << 31) - 1
# Odd multipliers below 2**30: a 31-bit value times one stays below 2**61 (no int64
# overflow on any device or compiler).
_HASH_MULTIPLIERS = (0x2C1B3C6D, 0x297A2D39, 0x3B4F9E25)


def hash31(h: Tensor, scratch: Optional[Tensor] = None) -> Tensor:
    """A 31-bit integer mix of ``h`` (int64, values in [0, 2**31)): xorshift-multiply rounds
    whose products stay below 2**61, so every device and compiler computes the same bits.
    Shared by the token permutation and the MVUE draws (``select_2to4.keyed_uniforms``).

    With ``scratch`` (int64, shaped like ``h``) the same rounds run in place on ``h``: eager
    code hashing a large table chunk by chunk keeps both in cache (memory-bound otherwise).
    """
    if scratch is None:
        for mult in _HASH_MULTIPLIERS:
            h = ((h ^ (h >> 15)) * mult) & _MASK31
        return h ^ (h >> 13)
    for mult in _HASH_MULTIPLIERS:
        h.bitwise_xor_(torch.bitwise_right_shift(h, 15, out=scratch)).mul_(mult).bitwise_and_(_MASK31)
    return h.bitwise_xor_(torch.bitwise_right_shift(h, 13, out=scratch))


def make_token_permutation(num_tokens: int, seed: int, device=None) -> Tensor:
    """Deterministic pseudo-random permutation of ``num_tokens`` from ``seed``.

    The argsort of an integer hash of (token index, seed): pure tensor ops, so it is the
    same on every device, traceable by torch.compile (no torch.Generator), and leaves the
    global RNG stream untouched. Hash ties are broken by index (stable sort).
    """
    seed_key = (int(seed) * 0x9E3779B1 + 0x7F4A7C15) & _MASK31  # spread small seeds apart
    h = (torch.arange(int(num_tokens), dtype=torch.int64, device=device) ^ seed_key) & _MASK31
    return torch.argsort(hash31(h), stable=True)


class TokenPermutation:
    """Per-(T, device) cache of :func:`make_token_permutation` for one seed.

    A model holds one per module; the cache avoids regenerating and re-uploading the
    permutation every step. Only a few token counts occur in practice (train, eval, the
    last partial batch); the cache is cleared past ``max_entries`` to stay bounded.
    """

    def __init__(self, seed: int, max_entries: int = 8):
        self.seed = int(seed)
        self.max_entries = max_entries
        self._cache: dict[tuple[int, torch.device], Tensor] = {}

    def __call__(self, num_tokens: int, device) -> Tensor:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        key = (int(num_tokens), dev)
        perm = self._cache.get(key)
        if perm is None:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            perm = make_token_permutation(num_tokens, self.seed, dev)
            self._cache[key] = perm
        return perm

    def __repr__(self) -> str:
        return f"TokenPermutation(seed={self.seed})"


class GatherRows(torch.autograd.Function):
    """``t[index]`` along dim 0 for a permutation ``index`` whose inverse is ``inverse``:
    the gradient is gathered back with the inverse (no scatter-add)."""

    @staticmethod
    def forward(ctx, t, index, inverse):
        ctx.save_for_backward(inverse)
        return t.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None
