"""CPU stand-in for PyTorch's private cuSPARSELt ops, for tests only.

``torch._cslt_compress`` and ``torch._cslt_sparse_mm`` exist only in CUDA builds with
cuSPARSELt, so without this module the kernel branch of the 2:4 FFN op would run on GPU
boxes only. The emulator computes the same product on CPU and, more importantly, is
*stricter* than the real ops: every input the real library would silently misread (a
non-2:4 group, a B with unsupported strides, an unaligned dim) raises here instead.

Usage in a test module::

    from tests.cslt_emulator import emulated_cusparselt  # noqa: F401  (pytest fixture)

    def test_kernel_branch(emulated_cusparselt):
        ...  # run the op
        assert emulated_cusparselt.mm_calls  # the cuSPARSELt branch really ran

or ``emu = install(monkeypatch)`` inside a test. ``allow_wide_dtypes=True`` (fixture
``emulated_cusparselt_wide``) also accepts float32/float64 operands, still as 2:4, so
the kernel branch can be compared exactly with a float64 reference.

Two library set-ups, as torch 2.13 meets them: by default torch knows how many alg ids
there are (``get_max_alg_id()`` -> 8, as for cuSPARSELt 0.4.0/0.5.2/0.6.2);
``alg_count_reported=False`` (fixture ``emulated_cusparselt_unknown_count``) is the
cuSPARSELt 0.7/0.8 of the CUDA wheels, where it returns None and only the library's own
search (``torch._C._cusparselt.mm_search``) or trying ids tells how many there are.
``library_search=False`` removes that binding, as on the CPU wheel.

Emulated compressed format (opaque to callers, like the real one): a 2-D tensor in A's
dtype with A's m rows, as PyTorch's ``_cslt_compress`` returns it (m × enough columns for
the packed bytes); here each row holds its k/2 kept values, two per group of 4, followed by
their positions 0..3 in the group, stored as values (exact in bf16/fp16), so m × k.
"""

from __future__ import annotations

import os
import tempfile
import types
import weakref
from typing import NamedTuple, Optional

import pytest
import torch
from torch import Tensor

from hf_sparse.model import gemm_backends, gemm_table
from hf_sparse.model.gemm_backends import CusparseltGemms, shape_reason
from hf_sparse.model.gemm_tuning import TABLE_PATH_ENV, GemmChoice, GemmTuner
from hf_sparse.model.kernels import cusparselt_alg_id

__all__ = [
    "NUM_ALG_IDS",
    "UNREPORTED_ALG_IDS",
    "CompressCall",
    "CusparseLtPreconditionError",
    "EmulatedCusparseltGemms",
    "Emulator",
    "ForcedSparseGemms",
    "MmCall",
    "compress",
    "decompress",
    "emulated_cusparselt",
    "emulated_cusparselt_cuda_rules",
    "emulated_cusparselt_unknown_count",
    "emulated_cusparselt_wide",
    "install",
    "is_compressed",
    "sparse_mm",
]

NARROW_DTYPES = (torch.bfloat16, torch.float16)
WIDE_DTYPES = (torch.float32, torch.float64)
# FP8 e4m3 2:4 (cuSPARSELt >= 0.6.2, sm90): the dense operand must be column-major and the
# result comes out in out_dtype (bf16/fp16/fp32). Worked on here through float32 (few CPU
# ops take float8 tensors), stored back as float8, so every value keeps its e4m3 rounding.
FP8_DTYPES = (torch.float8_e4m3fn,)
# PyTorch's cuSPARSELt constraint table for 16-bit operands: sparse min rows/cols 16,
# dense min cols 8.
SPARSE_ALIGN = 16
DENSE_N_ALIGN = 8
# ...and for 8-bit ones (FP8 e4m3): sparse rows and columns multiples of 32, dense of 16.
FP8_SPARSE_ALIGN = 32
FP8_DENSE_N_ALIGN = 16
# Valid alg ids differ per cuSPARSELt release; a small fixed range is enough to make an
# out-of-range id fail the way the real plan initialisation does.
NUM_ALG_IDS = 8
# The library whose count torch does not report has more, so that a tuner stopping at
# torch's known counts (or at one id) is caught.
UNREPORTED_ALG_IDS = 12
SPLIT_K_MODES = (-1, 0, 1)  # library default, one kernel, two kernels


class CusparseLtPreconditionError(ValueError):
    """An input the real cuSPARSELt op would accept but compute wrongly (or refuse)."""


class CompressCall(NamedTuple):
    shape: tuple
    dtype: torch.dtype


class MmCall(NamedTuple):
    m: int
    k: int
    n: int
    b_layout: str  # "row": B contiguous k×n; "col": B is the transpose of a contiguous n×k
    transpose_result: bool
    dtype: torch.dtype
    alg_id: int
    has_bias: bool
    split_k: int = 1
    split_k_mode: int = -1


# ----------------------------------------------------------------------------- registry

# id(buffer) -> (weak reference to the buffer, (m, k)). Keyed by id rather than by the
# tensor because Tensor.__eq__ is elementwise; the weak reference guards against a new
# tensor reusing the id of a collected buffer.
_REGISTRY: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}


def _register(buf: Tensor, m: int, k: int) -> None:
    key = id(buf)

    def _forget(ref, key=key):
        entry = _REGISTRY.get(key)
        if entry is not None and entry[0] is ref:
            del _REGISTRY[key]

    _REGISTRY[key] = (weakref.ref(buf, _forget), (m, k))


def _lookup(buf) -> Optional[tuple[int, int]]:
    entry = _REGISTRY.get(id(buf))
    if entry is None or entry[0]() is not buf:
        return None
    return entry[1]


def is_compressed(t) -> bool:
    """True if ``t`` is a live buffer returned by :func:`compress`."""
    return _lookup(t) is not None


# ----------------------------------------------------------------------------- autograd


class _NoDerivative(torch.autograd.Function):
    """The real ops have no derivative formula: backward through them must fail."""

    @staticmethod
    def forward(ctx, name, out, *inputs):
        ctx.name = name
        return out.detach()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"the derivative for '{ctx.name}' is not implemented (cuSPARSELt emulator)")


def _maybe_non_differentiable(name: str, out: Tensor, *inputs) -> Tensor:
    tracked = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if tracked and torch.is_grad_enabled():
        return _NoDerivative.apply(name, out, *tracked)
    return out


# ----------------------------------------------------------------------------- checks


def _check_dtype(dtype: torch.dtype, allow_wide_dtypes: bool, what: str) -> None:
    if dtype in NARROW_DTYPES or dtype in FP8_DTYPES:
        return
    if dtype in WIDE_DTYPES:
        if allow_wide_dtypes:
            return
        # float32 is accepted by the real op but compressed as 1:2, not 2:4.
        raise CusparseLtPreconditionError(
            f"{what} has dtype {dtype}: cuSPARSELt 2:4 needs bf16/fp16 (float32 would be 1:2); "
            "use allow_wide_dtypes=True for exact test comparisons"
        )
    raise CusparseLtPreconditionError(f"{what} has unsupported dtype {dtype}")


def _check_2to4(a: Tensor) -> None:
    m, k = a.shape
    # NaN != 0 is True, so a NaN counts as a kept value, as it does on the GPU.
    counts = (a != 0).view(m, k // 4, 4).sum(-1)
    bad = (counts > 2).nonzero()
    if bad.numel():
        row, group = (int(v) for v in bad[0])
        vals = a[row, 4 * group : 4 * group + 4].tolist()
        raise CusparseLtPreconditionError(
            f"A is not 2:4 along dim 1: row {row}, group {group} (columns {4 * group}..{4 * group + 3}) "
            f"has {int(counts[row, group])} non-zeros (NaN counts): {vals}; "
            "the real compression would silently produce garbage"
        )


def _b_layout(b: Tensor) -> str:
    # Same order as the real op: a tensor that is both contiguous and a transposed
    # contiguous one (degenerate dims) is read row-major.
    if b.is_contiguous():
        return "row"
    if b.t().is_contiguous():
        return "col"
    raise CusparseLtPreconditionError(
        f"B with shape {tuple(b.shape)} and strides {b.stride()} is neither contiguous nor the "
        "transpose of a contiguous tensor; _cslt_sparse_mm would misread it"
    )


# ----------------------------------------------------------------------------- ops


def compress(a: Tensor, *, allow_wide_dtypes: bool = False) -> Tensor:
    """Emulates ``torch._cslt_compress(a)`` for a 2:4 ``a`` (m×k, 2:4 along dim 1)."""
    if not isinstance(a, Tensor) or a.dim() != 2:
        raise CusparseLtPreconditionError(f"A must be a 2-D tensor, got {getattr(a, 'shape', type(a))}")
    if not a.is_contiguous():
        raise CusparseLtPreconditionError(f"A must be row-major contiguous, got strides {a.stride()}")
    _check_dtype(a.dtype, allow_wide_dtypes, "A")
    m, k = a.shape
    fp8 = a.dtype in FP8_DTYPES
    align = FP8_SPARSE_ALIGN if fp8 else SPARSE_ALIGN
    if m <= 0 or k <= 0 or m % align or k % align:
        raise CusparseLtPreconditionError(f"A is {m}×{k} {a.dtype}: both dims must be positive multiples of {align}")
    source = a
    a = a.float() if fp8 else a
    with torch.no_grad():
        _check_2to4(a)
        groups = a.view(m, k // 4, 4)
        # Every group stores exactly two slots: its non-zeros first, padded with zero
        # positions, kept in ascending order like the hardware metadata.
        pos = torch.arange(4, device=a.device).expand_as(groups)
        rank = torch.where(groups != 0, pos, pos + 4)
        slots = (rank.sort(dim=-1).values[..., :2] % 4).sort(dim=-1).values
        values = groups.gather(-1, slots)
        # 2-D like the real op's result (m rows, as many columns as the packed bytes need).
        buf = torch.cat([values.reshape(m, -1), slots.reshape(m, -1).to(a.dtype)], dim=1)
        if fp8:
            buf = buf.to(source.dtype)  # values were FP8 already: exact
    buf = _maybe_non_differentiable("_cslt_compress", buf, source)
    _register(buf, m, k)
    return buf


def decompress(buf: Tensor) -> Tensor:
    """The dense m×k matrix held by a buffer from :func:`compress` (test helper)."""
    meta = _lookup(buf)
    if meta is None:
        raise CusparseLtPreconditionError(
            "compressed_A was not produced by _cslt_compress (pass its result unchanged, not a copy or view)"
        )
    m, k = meta
    half = k // 2
    if buf.dtype in FP8_DTYPES:
        buf = buf.float()  # the dense result comes back in float32 (exact for FP8 values)
    with torch.no_grad():
        values = buf[:, :half].reshape(m, k // 4, 2)
        codes = buf[:, half:].reshape(m, k // 4, 2)
        # The buffer is an ordinary tensor: catch in-place edits that broke the metadata.
        if not bool(((codes == 0) | (codes == 1) | (codes == 2) | (codes == 3)).all()) or bool(
            (codes[..., 0] >= codes[..., 1]).any()
        ):
            raise CusparseLtPreconditionError("compressed_A metadata is corrupted")
        dense = torch.zeros(m, k // 4, 4, dtype=buf.dtype, device=buf.device)
        dense.scatter_(-1, codes.long(), values)
    return dense.view(m, k)


def _sparse_mm(
    compressed_a,
    dense_b,
    bias=None,
    alpha=None,
    out_dtype=None,
    transpose_result=False,
    alg_id=0,
    split_k=1,
    split_k_mode=-1,
    *,
    allow_wide_dtypes=False,
    num_alg_ids=NUM_ALG_IDS,
) -> tuple[Tensor, MmCall]:
    meta = _lookup(compressed_a)
    if meta is None:
        raise CusparseLtPreconditionError(
            "compressed_A was not produced by _cslt_compress (pass its result unchanged, not a copy or view)"
        )
    m, k = meta
    if compressed_a.dim() != 2 or compressed_a.shape[0] != m:
        # The real op reads m from compressed_A's rows.
        raise CusparseLtPreconditionError(f"compressed_A must be 2-D with m={m} rows, got {tuple(compressed_a.shape)}")
    # Library-side failures surface as RuntimeError (TORCH_CHECK / plan init), as on GPU.
    if not isinstance(alg_id, int) or alg_id not in range(num_alg_ids):
        raise RuntimeError(f"cuSPARSELt: invalid alg_id {alg_id} (emulated range 0..{num_alg_ids - 1})")
    if not isinstance(split_k, int) or split_k < 1:
        raise RuntimeError(f"cuSPARSELt: invalid split_k {split_k}")
    if split_k_mode not in SPLIT_K_MODES:
        raise RuntimeError(f"cuSPARSELt: invalid split_k_mode {split_k_mode}")
    fp8 = compressed_a.dtype in FP8_DTYPES
    if out_dtype is not None and not fp8:
        # The real op only takes out_dtype for int8/fp8 inputs, never bf16/fp16.
        raise RuntimeError(f"out_dtype is only supported for 8-bit inputs, got {compressed_a.dtype}")
    if fp8 and out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise CusparseLtPreconditionError(f"FP8 inputs need out_dtype bf16, fp16 or fp32, got {out_dtype}")
    if alpha is not None:
        # cuSPARSELt reads alpha as a per-row vector (ALPHA_VECTOR_SCALING); its exact
        # contract is not pinned down here and our op does not use it.
        raise NotImplementedError("alpha is not emulated")

    if not isinstance(dense_b, Tensor) or dense_b.dim() != 2:
        raise CusparseLtPreconditionError(f"B must be a 2-D tensor, got {getattr(dense_b, 'shape', type(dense_b))}")
    if dense_b.dtype != compressed_a.dtype:
        raise CusparseLtPreconditionError(f"B has dtype {dense_b.dtype}, A has {compressed_a.dtype}")
    _check_dtype(dense_b.dtype, allow_wide_dtypes, "B")
    layout = _b_layout(dense_b)
    if fp8 and layout != "col":
        raise CusparseLtPreconditionError(
            "FP8 2:4 on sm89/sm90 takes the dense operand column-major only (the transpose of a "
            "contiguous tensor); B is row-major"
        )
    kb, n = dense_b.shape
    if kb != k:
        # The real op takes k from B's rows: a wrong k gives a silently wrong product
        # instead of an error.
        raise CusparseLtPreconditionError(f"B has {kb} rows but A was compressed with k={k}")
    n_align = FP8_DENSE_N_ALIGN if fp8 else DENSE_N_ALIGN
    if n <= 0 or n % n_align:
        raise CusparseLtPreconditionError(f"B has n={n} columns: must be a positive multiple of {n_align}")
    if bias is not None:
        # cuSPARSELt's bias vector has one entry per row of D = A @ B.
        if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.numel() != m:
            shape = getattr(bias, "shape", bias)
            raise CusparseLtPreconditionError(f"bias must be 1-D with m={m} entries, got {shape}")
        if bias.dtype != compressed_a.dtype or not bias.is_contiguous():
            raise CusparseLtPreconditionError(f"bias must be contiguous {compressed_a.dtype}, got {bias.dtype}")

    # Tensor cores accumulate 16-bit and 8-bit products in float32; wide dtypes keep their own.
    acc = torch.float32 if dense_b.dtype in NARROW_DTYPES + FP8_DTYPES else dense_b.dtype
    with torch.no_grad():
        out = decompress(compressed_a).to(acc) @ dense_b.to(acc)
        if bias is not None:
            out += bias.to(acc).unsqueeze(1)
        out = out.to(out_dtype if fp8 else dense_b.dtype)
        out = out.t().contiguous() if transpose_result else out.contiguous()
    out = _maybe_non_differentiable("_cslt_sparse_mm", out, compressed_a, dense_b, bias)
    call = MmCall(
        m, k, n, layout, bool(transpose_result), dense_b.dtype, alg_id, bias is not None, split_k, split_k_mode
    )
    return out, call


def sparse_mm(
    compressed_a,
    dense_b,
    bias=None,
    alpha=None,
    out_dtype=None,
    transpose_result=False,
    alg_id=0,
    split_k=1,
    split_k_mode=-1,
    *,
    allow_wide_dtypes=False,
) -> Tensor:
    """Emulates ``torch._cslt_sparse_mm`` (torch 2.13 schema): A @ B, or (A @ B)ᵀ."""
    out, _ = _sparse_mm(
        compressed_a,
        dense_b,
        bias,
        alpha,
        out_dtype,
        transpose_result,
        alg_id,
        split_k,
        split_k_mode,
        allow_wide_dtypes=allow_wide_dtypes,
    )
    return out


# ----------------------------------------------------------------------------- recorder


class Emulator:
    """Configured emulated ops plus a record of every call made through them."""

    def __init__(self, allow_wide_dtypes: bool = False, alg_count: int = NUM_ALG_IDS):
        self.allow_wide_dtypes = allow_wide_dtypes
        self.alg_count = alg_count  # the library's alg ids are 0..alg_count-1
        self.compressed: list[CompressCall] = []
        self.mm_calls: list[MmCall] = []
        self.search_calls: list[MmCall] = []
        self.refused_alg_ids: list[int] = []  # every out-of-range id asked for, in order
        # Set by install(): the GEMM back-end registered as the CPU's automatic choice.
        self.backend: Optional[CusparseltGemms] = None
        # Alg ids that return wrong products (as some do on real GPUs, pytorch#155333):
        # finite garbage.
        self.wrong_alg_ids: set[int] = set()
        # Alg ids whose product holds one non-finite value (alg id -> nan or inf): a check
        # that compares errors NaN-blindly passes them, finite garbage never shows that.
        self.non_finite_alg_ids: dict[int, float] = {}
        # What the library's own search picks, (alg id, split_k, split_k_mode): like the
        # real one it goes by speed and never checks the result.
        self.search_pick: tuple[int, int, int] = (0, 1, -1)

    def compress(self, a: Tensor) -> Tensor:
        buf = compress(a, allow_wide_dtypes=self.allow_wide_dtypes)
        self.compressed.append(CompressCall(tuple(a.shape), a.dtype))
        return buf

    def sparse_mm(
        self,
        compressed_a,
        dense_b,
        bias=None,
        alpha=None,
        out_dtype=None,
        transpose_result=False,
        alg_id=0,
        split_k=1,
        split_k_mode=-1,
    ) -> Tensor:
        if isinstance(alg_id, int) and alg_id not in range(self.alg_count):
            self.refused_alg_ids.append(alg_id)
        args = (compressed_a, dense_b, bias, alpha, out_dtype, transpose_result, alg_id, split_k, split_k_mode)
        out, call = self._checked_product(*args)
        self.mm_calls.append(call)
        if alg_id in self.wrong_alg_ids:
            return out * 2 + 1
        if alg_id in self.non_finite_alg_ids:
            out = out.clone()
            out.view(-1)[0] = self.non_finite_alg_ids[alg_id]
        return out

    def mm_search(self, compressed_a, dense_b, bias=None, alpha=None, out_dtype=None, transpose_result=False):
        """Emulates ``torch._C._cusparselt.mm_search`` (positional, as the binding takes
        them): ``(alg_id, split_k, split_k_mode, max_alg_id)`` of :attr:`search_pick`,
        after the same argument checks as a product."""
        alg_id, split_k, split_k_mode = self.search_pick
        args = (compressed_a, dense_b, bias, alpha, out_dtype, transpose_result, alg_id, split_k, split_k_mode)
        _, call = self._checked_product(*args)
        self.search_calls.append(call)
        # cuSPARSELt's CONFIG_MAX_ID: whether it names the last id or one past it is not
        # documented; reported here as one past it, so a caller that tries the number too
        # meets one refusal.
        return alg_id, split_k, split_k_mode, self.alg_count

    def _checked_product(self, *args) -> tuple[Tensor, MmCall]:
        # _sparse_mm's positional arguments, under this emulator's dtype rule and alg ids.
        return _sparse_mm(*args, allow_wide_dtypes=self.allow_wide_dtypes, num_alg_ids=self.alg_count)

    @property
    def layouts(self) -> set:
        """``{(b_layout, transpose_result), ...}`` over all recorded products."""
        return {(c.b_layout, c.transpose_result) for c in self.mm_calls}

    def reset(self) -> None:
        self.compressed.clear()
        self.mm_calls.clear()
        self.search_calls.clear()
        self.refused_alg_ids.clear()


def install(
    monkeypatch,
    allow_wide_dtypes: bool = False,
    cuda_rules: bool = False,
    alg_count_reported: bool = True,
    library_search: bool = True,
    alg_count: Optional[int] = None,
) -> Emulator:
    """Replace the cuSPARSELt ops with a recording emulator until ``monkeypatch`` undoes.

    The emulated back-end becomes the CPU's automatic GEMM back-end: with ``cuda_rules``
    :class:`EmulatedCusparseltGemms` (eligibility, per-shape verification and timing as on
    a GPU), else :class:`ForcedSparseGemms` (every aligned GEMM sparse, untimed).
    ``alg_count_reported=False``: ``get_max_alg_id()`` returns None (cuSPARSELt 0.7/0.8);
    ``library_search=False``: ``torch._C`` has no ``_cusparselt`` (its ``mm_search``);
    ``alg_count``: how many alg ids the library has (NUM_ALG_IDS when reported, else
    UNREPORTED_ALG_IDS)."""
    if alg_count is None:
        alg_count = NUM_ALG_IDS if alg_count_reported else UNREPORTED_ALG_IDS
    emu = Emulator(allow_wide_dtypes=allow_wide_dtypes, alg_count=alg_count)
    monkeypatch.setattr(torch, "_cslt_compress", emu.compress, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", emu.sparse_mm, raising=False)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    reported = alg_count if alg_count_reported else None
    monkeypatch.setattr(torch.backends.cusparselt, "get_max_alg_id", lambda: reported)
    monkeypatch.setattr(torch.backends.cusparselt, "version", lambda: "emulated", raising=False)
    if library_search:
        monkeypatch.setattr(torch._C, "_cusparselt", types.SimpleNamespace(mm_search=emu.mm_search), raising=False)
    else:
        monkeypatch.delattr(torch._C, "_cusparselt", raising=False)

    # The back-end registry as it was, restored at undo; then the emulated cuSPARSELt
    # back-end becomes the CPU's automatic choice, with a tuner of its own (a fresh
    # process's verdicts and budget) and the verdict file in a temporary folder.
    monkeypatch.setattr(gemm_backends, "_BACKENDS", dict(gemm_backends._BACKENDS))
    monkeypatch.setattr(gemm_backends, "_AUTOMATIC", dict(gemm_backends._AUTOMATIC))
    monkeypatch.setattr(gemm_table, "_said", set())
    monkeypatch.setenv(TABLE_PATH_ENV, os.path.join(tempfile.mkdtemp(prefix="gemm_table_"), "table.json"))
    # Fallback warnings said under emulation must not be taken as said by later tests.
    gemm_backends._warn_fallback.cache_clear()
    backend = (EmulatedCusparseltGemms if cuda_rules else ForcedSparseGemms)(GemmTuner())
    gemm_backends.register_gemm_backend(backend, device_type="cpu")
    emu.backend = backend
    return emu


class EmulatedCusparseltGemms(CusparseltGemms):
    """The cuSPARSELt back-end with the CUDA rules (eligibility, per-shape verification
    and timing) on CPU, against the emulated library ops."""

    name = "emulated_cusparselt"

    def device_reason(self, device):
        return None

    def fp8_reason(self, device):
        return None


class ForcedSparseGemms(EmulatedCusparseltGemms):
    """Every aligned GEMM on the cuSPARSELt path sparse and untimed, in any dtype the
    emulator accepts: the data flow of the kernel branch, nothing decided."""

    name = "emulated_cusparselt_forced"

    def ineligibility_reason(self, x, w_up, w_down):
        return "operands must be 2-D" if x.dim() != 2 else shape_reason(x, w_up)

    def verdict(self, a, b, transpose_result=False, name=""):
        return GemmChoice(cusparselt_alg_id(), 0.0, 0.0, 1.0, "forced sparse (emulated)", forced=True)

    def prepare(self, named_shapes, device):
        return []


@pytest.fixture
def emulated_cusparselt(monkeypatch) -> Emulator:
    """Emulated cuSPARSELt (bf16/fp16 only), every aligned GEMM sparse (ForcedSparseGemms)."""
    return install(monkeypatch)


@pytest.fixture
def emulated_cusparselt_wide(monkeypatch) -> Emulator:
    """As ``emulated_cusparselt`` but also accepting float32/float64 (still 2:4)."""
    return install(monkeypatch, allow_wide_dtypes=True)


@pytest.fixture
def emulated_cusparselt_cuda_rules(monkeypatch) -> Emulator:
    """Emulated cuSPARSELt (bf16/fp16) with the CUDA decision path on CPU: eligibility,
    per-shape verification and timing (set ``emu.backend.tuner.timer`` / ``.clock`` to inject them)."""
    return install(monkeypatch, cuda_rules=True)


@pytest.fixture
def emulated_cusparselt_unknown_count(monkeypatch) -> Emulator:
    """As ``emulated_cusparselt_cuda_rules`` on a cuSPARSELt whose alg-id count torch does
    not report (``get_max_alg_id()`` -> None, UNREPORTED_ALG_IDS ids, the library's own
    search present)."""
    return install(monkeypatch, cuda_rules=True, alg_count_reported=False)
