"""Per-shape choice between a cuSPARSELt 2:4 GEMM and a dense GEMM on the same operands.

Published bf16 2:4 GEMM speed-ups are small and shape-dependent (~1.2× at 8192³ on an
H100; some shapes are slower than dense), and cuSPARSELt's alg ids differ per shape and
layout (some return wrong results at some shapes, PyTorch issue 155333). So every GEMM
shape the 2:4 op meets gets its own verdict, made once, eagerly:

1. each candidate alg id is verified against a dense GEMM over several random 2:4 draws
   at exactly that shape and layout, then timed;
2. the fastest correct one, plus the compression of the sparse operand, is timed
   against a dense GEMM on the same (already 2:4-masked) operands;
3. the faster of the two is used. The recipe's numerics are the same either way: the
   operand is already 2:4, so only the GEMM's accumulation order differs.

Verdicts are kept per process and in a JSON file under the HF cache, keyed by GPU name,
torch version and cuSPARSELt version (another GPU or library version re-tunes).
``HF_SPARSE_2TO4_GEMMS`` = ``auto`` (default) | ``sparse`` (always the configured alg id,
once it is verified at the shape) | ``dense``. Tuning spends at most
``HF_SPARSE_TUNE_SECONDS`` (default 60) per process and says so in the log when that runs
out; shapes not decided by then use dense GEMMs.

Nothing here runs while torch.compile traces: a lookup on fake tensors or inside
tracing only reads the table (a missing verdict reads as dense and is not stored), so a
data-dependent sync can never turn into a cached "broken". The op's custom-op kernels
call :func:`gemm_choice` at run time, where tensors are real.

Shipped as HF remote code: imports only torch, huggingface_hub (transformers' own
dependency) and the standard library.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

logger = logging.getLogger(__name__)

GEMMS_ENV = "HF_SPARSE_2TO4_GEMMS"
GEMM_MODES = ("auto", "sparse", "dense")
TUNE_SECONDS_ENV = "HF_SPARSE_TUNE_SECONDS"
TABLE_PATH_ENV = "HF_SPARSE_GEMM_TABLE"
DEFAULT_TUNE_SECONDS = 60.0
TABLE_FORMAT = 1
# Relative Frobenius error above which an alg id is wrong at a shape; bf16 GEMM rounding
# gives ~3e-3, wrong kernels give O(1).
VERIFY_RTOL = 2e-2
VERIFY_DRAWS = 3
# Most candidate alg ids tried per shape (xformers' sp24 times up to ~70; cuSPARSELt
# reports how many exist; the budget bounds the total anyway).
MAX_CANDIDATES = 64


@dataclass(frozen=True)
class GemmShape:
    """One GEMM as cuSPARSELt sees it: A (m×k, 2:4 along k) @ B (k×n), B row-major
    (``row``) or the transpose of a row-major tensor (``col``), result transposed or not."""

    m: int
    k: int
    n: int
    b_layout: str
    transpose_result: bool
    dtype: str

    @classmethod
    def of(cls, a: Tensor, b: Tensor, transpose_result: bool) -> "GemmShape":
        layout = "row" if b.is_contiguous() else "col"
        return cls(a.shape[0], a.shape[1], b.shape[1], layout, bool(transpose_result), str(a.dtype).replace("torch.", ""))

    def key(self) -> str:
        return f"{self.m}x{self.k}x{self.n}:{self.b_layout}:{'t' if self.transpose_result else 'n'}:{self.dtype}"

    def label(self) -> str:
        return f"{self.m}×{self.k}×{self.n} {self.dtype} B {self.b_layout}{', Cᵀ' if self.transpose_result else ''}"


@dataclass
class GemmChoice:
    """The verdict for one shape. Times are seconds per call (nan where not measured)."""

    alg_id: int  # the fastest correct alg id, -1 when none was found or none was tried
    sparse_s: float
    compress_s: float
    dense_s: float
    reason: str
    forced: Optional[bool] = None  # HF_SPARSE_2TO4_GEMMS=sparse/dense

    def use_sparse(self, amortised_compression: bool = False) -> bool:
        """Sparse or dense for this shape. Activations are compressed every call; a 2:4
        weight is compressed once per optimizer step (``amortised_compression``)."""
        if self.alg_id < 0:
            return False
        if self.forced is not None:
            return self.forced
        cost = self.sparse_s + (0.0 if amortised_compression else self.compress_s)
        return cost < self.dense_s

    def speedup(self) -> float:
        return self.dense_s / (self.sparse_s + self.compress_s) if self.sparse_s == self.sparse_s else math.nan


def _default_timer(kind: str, alg_id: Optional[int], run: Callable[[], object]) -> float:
    """Seconds per call of ``run`` (median of a few timed repeats after a warm-up)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    run()  # warm-up (plan creation, allocator)
    samples = []
    for _ in range(5):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            samples.append(time.perf_counter() - t0)
    return sorted(samples)[len(samples) // 2]


_choices: dict[str, GemmChoice] = {}
_table_keys: dict[torch.device, str] = {}
_lock = threading.Lock()
_table_loaded: list[str] = []  # the table key whose file was read
_budget = {"spent": 0.0, "warned": False}
_timer: list[Callable] = [_default_timer]


def set_gemm_timer(timer: Optional[Callable]) -> None:
    """Replace the timer (``timer(kind, alg_id, run) -> seconds``; kind is "sparse",
    "compress" or "dense"); ``None`` restores the real one. For tests."""
    _timer[0] = timer or _default_timer


def reset_gemm_choices() -> None:
    """Forget every verdict of this process and the spent budget (the file stays)."""
    _choices.clear()
    _table_keys.clear()
    _table_loaded.clear()
    _budget.update(spent=0.0, warned=False)


def gemm_mode() -> str:
    mode = os.environ.get(GEMMS_ENV, "auto").strip().lower() or "auto"
    if mode not in GEMM_MODES:
        raise ValueError(f"{GEMMS_ENV}={mode!r} is not valid; choose one of {', '.join(map(repr, GEMM_MODES))}.")
    return mode


def tune_budget_s() -> float:
    raw = os.environ.get(TUNE_SECONDS_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_TUNE_SECONDS
    except ValueError:
        raise ValueError(f"{TUNE_SECONDS_ENV}={raw!r} is not a number of seconds.") from None


def table_path() -> str:
    explicit = os.environ.get(TABLE_PATH_ENV)
    if explicit:
        return explicit
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "hf_sparse", "cusparselt_gemms.json")


def table_key(device) -> str:
    """GPU name + torch + cuSPARSELt versions: a verdict holds only for all three. Cached per
    device: every 2:4 GEMM call looks its verdict up under this key."""
    dev = torch.device(device)
    key = _table_keys.get(dev)
    if key is None:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
        try:
            cslt = str(torch.backends.cusparselt.version())
        except (AttributeError, RuntimeError):
            cslt = "none"
        key = _table_keys[dev] = f"{name} | torch {torch.__version__} | cuSPARSELt {cslt}"
    return key


def _read_table(path: str, warn: bool = True) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        if warn:
            logger.warning("2:4 GEMM table %s unreadable (%s); tuning anew", path, err)
        return {}
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("tables"), dict):
        return {}
    return data


def _load_table(device) -> None:
    key = table_key(device)
    if key in _table_loaded:
        return
    _table_loaded.append(key)
    entries = _read_table(table_path()).get("tables", {}).get(key, {})
    for shape_key, fields in entries.items():
        try:
            _choices.setdefault(f"{key}/{shape_key}", GemmChoice(**fields))
        except TypeError:
            continue  # an entry of another layout of this file: re-tuned when met


def _save_table(device) -> None:
    """Merge this process's verdicts for ``device`` into the file (atomic replace)."""
    key = table_key(device)
    path = table_path()
    data = _read_table(path, warn=False) or {"format": TABLE_FORMAT, "tables": {}}
    mine = data["tables"].setdefault(key, {})
    prefix = key + "/"
    for full_key, choice in _choices.items():
        if full_key.startswith(prefix) and choice.forced is None and not choice.reason.startswith("budget"):
            mine[full_key[len(prefix):]] = asdict(choice)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".gemm_table.")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:  # a read-only home: the verdicts still hold for this process
        logger.warning("2:4 GEMM table not saved to %s (%s)", path, err)


def _random_operands(shape: GemmShape, device, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    dtype = getattr(torch, shape.dtype)
    a = torch.randn(shape.m, shape.k // 4, 4, device=device, generator=gen)
    # Keep the 2 largest |a| of each group of 4: a valid 2:4 operand.
    idx = a.abs().topk(2, dim=-1).indices
    a = torch.zeros_like(a).scatter_(-1, idx, a.gather(-1, idx)).view(shape.m, shape.k).to(dtype)
    b = torch.randn(shape.k, shape.n, device=device, generator=gen).to(dtype)
    if shape.b_layout == "col":
        b = b.t().contiguous().t()
    return a, b


def _dense_mm(a: Tensor, b: Tensor, transpose_result: bool) -> Tensor:
    if a.dtype == torch.float8_e4m3fn:
        # FP8's dense GEMM is the scaled one (unit scales here: only its time and values count).
        ones_a = torch.ones(a.shape[0], 1, device=a.device)
        ones_b = torch.ones(1, b.shape[1], device=a.device)
        out = torch._scaled_mm(a, b, scale_a=ones_a, scale_b=ones_b, out_dtype=torch.bfloat16)
        return out.t() if transpose_result else out
    # (AB)ᵀ as one GEMM Bᵀ·Aᵀ, contiguous like cuSPARSELt's transposed result.
    return torch.mm(b.t(), a.t()) if transpose_result else torch.mm(a, b)


def _sparse_mm(packed: Tensor, b: Tensor, transpose_result: bool, alg_id: int) -> Tensor:
    # FP8 products come out in bf16 (cuSPARSELt takes out_dtype for 8-bit inputs only).
    out_dtype = torch.bfloat16 if b.dtype == torch.float8_e4m3fn else None
    return torch._cslt_sparse_mm(packed, b, transpose_result=transpose_result, alg_id=alg_id, out_dtype=out_dtype)


def _verify(
    shape: GemmShape, device, alg_ids: list[int], draws: int = VERIFY_DRAWS, deadline: float = math.inf
) -> tuple[dict[int, str], dict[int, float]]:
    """(failures: alg id -> why, worst relative error of each passing id) of ``alg_ids`` at
    ``shape`` over ``draws`` random 2:4 operands, each draw's dense reference computed once
    for all ids (host syncs; a private generator leaves the global RNG stream, MVUE's,
    untouched). Ids not checked by ``deadline`` (perf_counter) fail as "budget spent"."""
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    failed: dict[int, str] = {}
    worst = dict.fromkeys(alg_ids, 0.0)
    for _ in range(draws):
        a, b = _random_operands(shape, device, gen)
        ref = _dense_mm(a.float(), b.float(), shape.transpose_result)
        packed = torch._cslt_compress(a)
        for alg_id in alg_ids:
            if alg_id in failed:
                continue
            if time.perf_counter() > deadline:
                failed[alg_id] = "budget spent"
                continue
            try:
                out = _sparse_mm(packed, b, shape.transpose_result, alg_id).float()
            except RuntimeError as exc:  # an alg id out of range, an unsupported shape or arch
                failed[alg_id] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            if not err <= VERIFY_RTOL:  # NaN fails too
                failed[alg_id] = f"max relative error {err:.3g}"
            worst[alg_id] = max(worst[alg_id], err)
    return failed, {alg: err for alg, err in worst.items() if alg not in failed}


def verify_alg_id(shape: GemmShape, device, alg_id: int, draws: int = VERIFY_DRAWS) -> tuple[bool, str]:
    """Does ``alg_id`` compute ``shape`` right over ``draws`` random 2:4 operands? (ok, detail)"""
    failed, worst = _verify(shape, device, [alg_id], draws)
    return (False, failed[alg_id]) if alg_id in failed else (True, f"max relative error {worst[alg_id]:.3g}")


def _candidates(forced_alg: int) -> list[int]:
    try:
        count = int(torch.backends.cusparselt.get_max_alg_id())
    except (AttributeError, RuntimeError, TypeError, ValueError):
        count = 1
    ids = [forced_alg] + [i for i in range(min(max(count, 1), MAX_CANDIDATES)) if i != forced_alg]
    return ids


def _budget_left() -> float:
    return tune_budget_s() - _budget["spent"]


def tune(shape: GemmShape, device, configured_alg: int = 0) -> GemmChoice:
    """Verify and time the candidates for ``shape`` (see the module docstring)."""
    mode = gemm_mode()
    nan = math.nan
    if mode == "dense":
        return GemmChoice(-1, nan, nan, nan, f"{GEMMS_ENV}=dense", forced=False)
    if mode == "sparse":
        ok, detail = verify_alg_id(shape, device, configured_alg)
        if not ok:
            logger.warning("2:4 GEMM %s: alg id %d is wrong at this shape (%s); dense GEMM",
                           shape.label(), configured_alg, detail)
            return GemmChoice(-1, nan, nan, nan, f"alg id {configured_alg} wrong ({detail})", forced=False)
        return GemmChoice(configured_alg, nan, nan, nan, f"{GEMMS_ENV}=sparse", forced=True)
    started = time.perf_counter()
    timer = _timer[0]
    try:
        candidates = _candidates(configured_alg)
        failed, _worst = _verify(shape, device, candidates, deadline=started + _budget_left())
        wrong = [alg for alg in candidates if alg in failed and failed[alg] != "budget spent"]
        gen = torch.Generator(device=device)
        gen.manual_seed(99)
        a, b = _random_operands(shape, device, gen)
        packed = torch._cslt_compress(a)
        best_alg, best_s, tried = -1, math.inf, 0
        for alg in candidates:
            if alg in failed:
                continue
            if time.perf_counter() - started > _budget_left():
                break
            tried += 1
            seconds = timer("sparse", alg, lambda alg=alg: _sparse_mm(packed, b, shape.transpose_result, alg))
            if seconds < best_s:
                best_alg, best_s = alg, seconds
        if best_alg < 0:
            reason = "budget spent" if not wrong and tried == 0 else f"no correct alg id (wrong: {wrong})"
            return GemmChoice(-1, nan, nan, nan, reason)
        compress_s = timer("compress", None, lambda: torch._cslt_compress(a))
        dense_s = timer("dense", None, lambda: _dense_mm(a, b, shape.transpose_result))
    finally:
        _budget["spent"] += time.perf_counter() - started
    detail = f"{tried} alg ids timed" + (f", wrong: {wrong}" if wrong else "")
    return GemmChoice(best_alg, best_s, compress_s, dense_s, detail)


def _describe(shape: GemmShape, choice: GemmChoice, name: str = "") -> str:
    verdict = "sparse" if choice.use_sparse() else "dense"
    speed = f"sparse {choice.speedup():.2f}×" if choice.speedup() == choice.speedup() else choice.reason
    alg = f" (alg {choice.alg_id})" if choice.alg_id >= 0 else ""
    return f"{name + ' ' if name else ''}{shape.label()}: {speed}{alg} → {verdict}"


def gemm_choice(a: Tensor, b: Tensor, transpose_result: bool, configured_alg: int = 0, name: str = "") -> GemmChoice:
    """The verdict for ``a @ b`` (tuned on first sight of the shape, eagerly). Inside
    torch.compile tracing or on fake tensors: a read-only lookup, dense when absent."""
    tracing = torch.compiler.is_compiling() or _is_fake(a) or _is_fake(b)
    return choice_for(GemmShape.of(a, b, transpose_result), a.device, configured_alg, name, read_only=tracing)


def choice_for(shape: GemmShape, device, configured_alg: int = 0, name: str = "", read_only: bool = False) -> GemmChoice:
    """The verdict for ``shape`` on ``device``: from this process, else the table file,
    else tuned now (unless ``read_only``: then a missing verdict reads as dense, unstored)."""
    key = f"{table_key(device)}/{shape.key()}"
    choice = _choices.get(key)
    if choice is not None or read_only:
        return choice or GemmChoice(-1, math.nan, math.nan, math.nan, "not tuned before tracing")
    with _lock:
        _load_table(device)
        choice = _choices.get(key)
        if choice is None:
            if _budget_left() <= 0 and gemm_mode() == "auto":
                choice = GemmChoice(-1, math.nan, math.nan, math.nan, "budget spent")
                if not _budget["warned"]:
                    _budget["warned"] = True
                    logger.warning(
                        "2:4 GEMM tuning budget (%s=%.0f s) spent; shapes met from now on use dense GEMMs. "
                        "Raise it, or tune before training (SparsityCallback does at train begin).",
                        TUNE_SECONDS_ENV, tune_budget_s(),
                    )  # fmt: skip
            else:
                choice = tune(shape, device, configured_alg)
            _choices[key] = choice
            logger.info("2:4 GEMM %s", _describe(shape, choice, name))
            if choice.forced is None and choice.alg_id >= 0:
                _save_table(device)
    return choice


def format_gemm_table(named_shapes: list[tuple[str, GemmShape]], device) -> str:
    """The verdicts of ``named_shapes`` as lines ("y3 4096×3072×768 ...: sparse 1.18× → sparse")."""
    prefix = table_key(device)
    lines = [f"2:4 GEMM verdicts on {prefix}:"]
    for name, shape in named_shapes:
        choice = _choices.get(f"{prefix}/{shape.key()}")
        lines.append("  " + (_describe(shape, choice, name) if choice else f"{name} {shape.label()}: not tuned"))
    return "\n".join(lines)


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, FakeTensor) or t.device.type == "meta"
