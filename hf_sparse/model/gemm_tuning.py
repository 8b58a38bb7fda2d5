"""Per-shape choice between a cuSPARSELt 2:4 GEMM and a dense GEMM on the same operands.

Published bf16 2:4 GEMM speed-ups are small and shape-dependent (~1.2× at 8192³ on an
H100; some shapes are slower than dense), and cuSPARSELt's alg ids differ per shape and
layout (some return wrong results at some shapes, PyTorch issue 155333). So every GEMM
shape the 2:4 op meets gets its own verdict, made once, eagerly:

1. the candidates: every alg id the library has with its default split-k, plus the
   library's own pick for the shape (alg id *and* split-k, from
   ``torch._C._cusparselt.mm_search``, which times but never checks results). torch
   knows how many alg ids there are only for the cuSPARSELt versions it lists
   (``get_max_alg_id()``: 0.4.0, 0.5.2 and 0.6.2 in torch 2.13; ``None`` for the 0.7/0.8
   the CUDA wheels ship); otherwise the ids are tried upwards, up to the highest the
   search reports, and the first one the library refuses ends the range;
2. each candidate is verified against a dense GEMM over several random 2:4 draws at
   exactly that shape and layout (a non-finite product fails);
3. the dense GEMM, the compression of the sparse operand and every correct candidate
   are timed; the fastest candidate plus the compression is compared with dense;
4. the faster of the two is used, replayed with the same alg id and split-k. The
   recipe's numerics are the same either way: the operand is already 2:4, so only the
   GEMM's accumulation order differs.

Verdicts are kept by a :class:`GemmTuner` (one per process: the cuSPARSELt back-end's,
see ``gemm_backends``) and in a JSON file (``gemm_table``), keyed by GPU name, torch
version and cuSPARSELt version (another GPU or library version re-tunes).
``HF_SPARSE_2TO4_GEMMS`` = ``auto`` (default) | ``sparse`` (always the configured alg id,
once it is verified at the shape) | ``dense``. Tuning spends at most
``HF_SPARSE_TUNE_SECONDS`` (default 60) per process, all shapes together; the budget is
checked before every call that verifies or times, so it is overrun by one timing at
most. A verdict the budget cut short (not every candidate verified and timed) is
*provisional*: used by this process, never saved, so the next run tunes that shape
again; shapes met after the budget is spent use dense GEMMs. Both are said once.

Nothing here runs while torch.compile traces: a lookup on fake tensors or inside
tracing only reads the table (a missing verdict reads as dense and is not stored), so a
data-dependent sync can never turn into a cached "broken". The op's custom-op kernels
call :func:`gemm_choice` at run time, where tensors are real.

Shipped as HF remote code: imports only torch, the standard library and (through
``gemm_table``) huggingface_hub, a transformers dependency.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .env_knobs import env_value
from .ffn_stages import _fp8_scale_stage, _run_stage
from .fp8 import FP8

# TABLE_FORMAT and TABLE_PATH_ENV are imported for callers that know them from here.
from .gemm_table import TABLE_FORMAT, TABLE_PATH_ENV, read_table, save_entries, table_path  # noqa: F401

logger = logging.getLogger(__name__)

GEMMS_ENV = "HF_SPARSE_2TO4_GEMMS"
GEMM_MODES = ("auto", "sparse", "dense")
TUNE_SECONDS_ENV = "HF_SPARSE_TUNE_SECONDS"
DEFAULT_TUNE_SECONDS = 60.0
# Relative Frobenius error above which an alg id is wrong at a shape; bf16 GEMM rounding
# gives ~3e-3, wrong kernels give O(1).
VERIFY_RTOL = 2e-2
VERIFY_DRAWS = 3
# Most alg ids tried per shape (xformers' sp24 times up to ~70; the budget bounds the
# total anyway), and the range tried upwards when the library does not say its count.
MAX_CANDIDATES = 64


class CsltConfig(NamedTuple):
    """One way to run a GEMM through cuSPARSELt: the alg id and the split-k setting
    (``split_k=1, split_k_mode=-1`` are the library defaults; mode 0 is one kernel, 1 two)."""

    alg_id: int
    split_k: int = 1
    split_k_mode: int = -1

    def has_default_split_k(self) -> bool:
        return self.split_k == 1 and self.split_k_mode == -1

    def label(self) -> str:
        if self.has_default_split_k():
            return str(self.alg_id)
        return f"{self.alg_id} split-k {self.split_k} mode {self.split_k_mode}"


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
        return cls(
            a.shape[0], a.shape[1], b.shape[1], layout, bool(transpose_result), str(a.dtype).replace("torch.", "")
        )

    def key(self) -> str:
        return f"{self.m}x{self.k}x{self.n}:{self.b_layout}:{'t' if self.transpose_result else 'n'}:{self.dtype}"

    def label(self) -> str:
        return f"{self.m}×{self.k}×{self.n} {self.dtype} B {self.b_layout}{', Cᵀ' if self.transpose_result else ''}"


@dataclass
class GemmChoice:
    """The verdict for one shape. Times are seconds per call (nan where not measured). Its
    fields are the table's entry fields (``gemm_table.ENTRY_FIELDS``)."""

    alg_id: int  # the fastest correct alg id, -1 when none was found or none was tried
    sparse_s: float
    compress_s: float
    dense_s: float
    reason: str
    forced: Optional[bool] = None  # HF_SPARSE_2TO4_GEMMS=sparse/dense
    # The split-k setting alg_id was verified and timed with; replayed with it.
    split_k: int = 1
    split_k_mode: int = -1
    # Cut short by the tuning budget: this process uses it, nothing saves it.
    provisional: bool = False

    @property
    def config(self) -> CsltConfig:
        return CsltConfig(self.alg_id, self.split_k, self.split_k_mode)

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


def _default_timer(kind: str, config: Optional[CsltConfig], run: Callable[[], object]) -> float:
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


def gemm_mode() -> str:
    return env_value(GEMMS_ENV)


def tune_budget_s() -> float:
    return env_value(TUNE_SECONDS_ENV)


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


def _out_dtype(b: Tensor) -> Optional[torch.dtype]:
    # FP8 products come out in bf16 (cuSPARSELt takes out_dtype for 8-bit inputs only).
    return torch.bfloat16 if b.dtype == torch.float8_e4m3fn else None


def cslt_sparse_mm(packed: Tensor, b: Tensor, transpose_result: bool, config: CsltConfig) -> Tensor:
    """``torch._cslt_sparse_mm`` run as ``config`` says (a verdict's :attr:`GemmChoice.config`)."""
    # The split-k arguments only when they are not the defaults: the call stays the one
    # torch versions (and test doubles) that predate them accept.
    split = {} if config.has_default_split_k() else {"split_k": config.split_k, "split_k_mode": config.split_k_mode}
    return torch._cslt_sparse_mm(
        packed, b, transpose_result=transpose_result, alg_id=config.alg_id, out_dtype=_out_dtype(b), **split
    )


# Why a candidate failed verification (the first item of each failure).
WRONG, REFUSED, PAST_THE_END, BUDGET_SPENT = "wrong", "refused", "past the last alg id", "budget spent"


def _verify(
    shape: GemmShape,
    device,
    configs: list,
    draws: int = VERIFY_DRAWS,
    deadline: float = math.inf,
    open_ended: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict, dict]:
    """(failures: config -> (why, detail), worst relative error of each passing config)
    of ``configs`` (:class:`CsltConfig`) at ``shape`` over ``draws``
    random 2:4 operands, each draw's dense reference computed once for all (host syncs; a
    private generator leaves the global RNG stream, MVUE's, untouched). Configs not
    checked by ``deadline`` (on ``clock``, the budget's) fail as BUDGET_SPENT. ``open_ended``: the
    library did not say how many alg ids it has, so the first alg id it refuses ends the
    range: higher ids (default split-k) fail as PAST_THE_END, untried."""
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    failed: dict[CsltConfig, tuple[str, str]] = {}
    worst = dict.fromkeys(configs, 0.0)
    for _ in range(draws):
        a, b = _random_operands(shape, device, gen)
        ref = _dense_mm(a.float(), b.float(), shape.transpose_result)
        packed = torch._cslt_compress(a)
        for config in configs:
            if config in failed:
                continue
            if clock() > deadline:
                failed[config] = (BUDGET_SPENT, BUDGET_SPENT)
                continue
            try:
                out = cslt_sparse_mm(packed, b, shape.transpose_result, config).float()
            except RuntimeError as exc:  # an alg id out of range, an unsupported shape or arch
                failed[config] = (REFUSED, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                if open_ended and config.has_default_split_k():
                    for later in configs:
                        if later.has_default_split_k() and later.alg_id > config.alg_id:
                            failed.setdefault(later, (PAST_THE_END, f"alg id {config.alg_id} was refused"))
                continue
            err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            # Written so that NaN fails: a product holding NaN or inf gives a NaN/inf error.
            if not err <= VERIFY_RTOL:
                failed[config] = (WRONG, f"max relative error {err:.3g}")
            else:
                worst[config] = max(worst[config], err)
    return failed, {config: err for config, err in worst.items() if config not in failed}


def verify_alg_id(shape: GemmShape, device, alg_id: int, draws: int = VERIFY_DRAWS) -> tuple[bool, str]:
    """Does ``alg_id`` compute ``shape`` right over ``draws`` random 2:4 operands? (ok, detail)"""
    config = CsltConfig(alg_id)
    failed, worst = _verify(shape, device, [config], draws)
    return (False, failed[config][1]) if config in failed else (True, f"max relative error {worst[config]:.3g}")


def _reported_alg_count() -> Optional[int]:
    """How many alg ids torch says cuSPARSELt has; None where it does not know."""
    try:
        count = torch.backends.cusparselt.get_max_alg_id()
    except (AttributeError, RuntimeError):
        return None
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def _library_search(packed: Tensor, b: Tensor, transpose_result: bool) -> tuple[Optional[CsltConfig], Optional[int]]:
    """cuSPARSELt's own pick for this GEMM (by its timing; unverified) and the highest alg
    id it reports, from ``torch._C._cusparselt.mm_search``; (None, None) where torch has
    no such binding (CPU wheels, builds without cuSPARSELt) or the search fails."""
    search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if search is None:
        return None, None
    try:
        alg_id, split_k, split_k_mode, max_alg_id = search(packed, b, None, None, _out_dtype(b), transpose_result)
    except (RuntimeError, TypeError, ValueError) as exc:
        logger.info("cuSPARSELt's alg-id search failed (%s); trying alg ids in turn", exc)
        return None, None
    limit = int(max_alg_id) if isinstance(max_alg_id, int) and max_alg_id >= 0 else None
    if isinstance(split_k_mode, bool):
        # Older torch returned split_k_one_kernel here, and its _cslt_sparse_mm takes that
        # name, not split_k_mode: keep the alg id, at the default split-k.
        return CsltConfig(int(alg_id)), limit
    return CsltConfig(int(alg_id), int(split_k), int(split_k_mode)), limit


def _candidates(
    configured_alg: int, searched: Optional[CsltConfig] = None, search_limit: Optional[int] = None
) -> tuple[list[CsltConfig], bool]:
    """(configs to verify, in the order to try them under the budget; whether the alg-id
    range is open-ended). The configured id first, then the library's pick, then every
    id: torch's count when it knows one, else up to the highest id the search reports
    (whether that number is the last id or one past it is not documented, so it is
    tried too) or MAX_CANDIDATES, ended early by the first id the library refuses."""
    count = _reported_alg_count()
    if count is not None:
        ids, open_ended = range(min(count, MAX_CANDIDATES)), False
    else:
        ids = range(min(search_limit + 1, MAX_CANDIDATES) if search_limit is not None else MAX_CANDIDATES)
        open_ended = True
    configs = [CsltConfig(configured_alg)] + ([searched] if searched is not None else [])
    configs += [CsltConfig(alg) for alg in ids]
    return list(dict.fromkeys(configs)), open_ended


def _per_call_extras(a: Tensor, shape: GemmShape) -> Callable[[], object]:
    """What the sparse route pays per call besides its GEMM, timed as its "compression":
    compressing the operand and, for FP8, the pass that applies the row and column
    scales to the product (the dense FP8 GEMM applies them in its epilogue)."""
    if a.dtype != FP8:
        return lambda: torch._cslt_compress(a)
    product = torch.empty(shape.m, shape.n, dtype=torch.bfloat16, device=a.device)
    rows, cols = torch.ones(shape.m, 1, device=a.device), torch.ones(shape.n, 1, device=a.device)
    return lambda: (torch._cslt_compress(a), _run_stage(_fp8_scale_stage, product, rows, cols, torch.bfloat16))


def _labels(configs) -> str:
    return "[" + ", ".join(config.label() for config in configs) + "]"


def _describe(shape: GemmShape, choice: GemmChoice, name: str = "") -> str:
    verdict = "sparse" if choice.use_sparse() else "dense"
    speed = f"sparse {choice.speedup():.2f}×" if choice.speedup() == choice.speedup() else choice.reason
    alg = f" (alg {choice.config.label()})" if choice.alg_id >= 0 else ""
    provisional = " (provisional: tuning budget spent)" if choice.provisional and choice.alg_id >= 0 else ""
    return f"{name + ' ' if name else ''}{shape.label()}: {speed}{alg} → {verdict}{provisional}"


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, FakeTensor) or t.device.type == "meta"


class GemmTuner:
    """The verdicts of one process and the tuning budget they share.

    The cuSPARSELt back-end holds one (``gemm_backends``); a new tuner is what a new
    process would see (the table file stays). ``timer(kind, config, run) -> seconds``
    times one candidate (kind "sparse" with the :class:`CsltConfig` timed, or
    "compress"/"dense" with None); ``clock`` is what the budget is measured with
    (seconds, like ``time.perf_counter``).
    """

    def __init__(self, timer: Optional[Callable] = None, clock: Optional[Callable[[], float]] = None):
        self.timer = timer or _default_timer
        self.clock = clock or time.perf_counter
        self.choices: dict[str, GemmChoice] = {}  # "<table key>/<shape key>" -> verdict
        self.budget_spent_s = 0.0
        self._budget_said = False
        self._table_keys: dict[torch.device, str] = {}
        self._tables_read: set[str] = set()
        self._lock = threading.Lock()

    def table_key(self, device) -> str:
        """GPU name + torch + cuSPARSELt versions: a verdict holds only for all three.
        Cached per device: every 2:4 GEMM call looks its verdict up under this key."""
        dev = torch.device(device)
        key = self._table_keys.get(dev)
        if key is None:
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
            try:
                cslt = str(torch.backends.cusparselt.version())
            except (AttributeError, RuntimeError):
                cslt = "none"
            key = self._table_keys[dev] = f"{name} | torch {torch.__version__} | cuSPARSELt {cslt}"
        return key

    def _load_table(self, device) -> None:
        key = self.table_key(device)
        if key in self._tables_read:
            return
        self._tables_read.add(key)
        # read_table passes only entries whose every field has this version's type.
        for shape_key, fields in read_table(table_path()).tables.get(key, {}).items():
            self.choices.setdefault(f"{key}/{shape_key}", GemmChoice(**fields))

    def _save_table(self, device) -> None:
        """Merge this process's final verdicts for ``device`` into the file."""
        key = self.table_key(device)
        prefix = key + "/"
        final = {
            full_key[len(prefix) :]: asdict(choice)
            for full_key, choice in self.choices.items()
            if full_key.startswith(prefix) and choice.forced is None and not choice.provisional
        }
        save_entries(table_path(), key, final)

    def budget_left_s(self) -> float:
        return tune_budget_s() - self.budget_spent_s

    def tune(self, shape: GemmShape, device, configured_alg: int = 0) -> GemmChoice:
        """Verify and time the candidates for ``shape`` (see the module docstring), within
        what is left of this tuner's budget."""
        mode = gemm_mode()
        nan = math.nan
        if mode == "dense":
            return GemmChoice(-1, nan, nan, nan, f"{GEMMS_ENV}=dense", forced=False)
        if mode == "sparse":
            ok, detail = verify_alg_id(shape, device, configured_alg)
            if not ok:
                logger.warning(
                    "2:4 GEMM %s: alg id %d is wrong at this shape (%s); dense GEMM",
                    shape.label(),
                    configured_alg,
                    detail,
                )
                return GemmChoice(-1, nan, nan, nan, f"alg id {configured_alg} wrong ({detail})", forced=False)
            return GemmChoice(configured_alg, nan, nan, nan, f"{GEMMS_ENV}=sparse", forced=True)
        started = self.clock()
        try:
            return self._tune_until(shape, device, configured_alg, deadline=started + self.budget_left_s())
        finally:
            self.budget_spent_s += self.clock() - started

    def _tune_until(self, shape: GemmShape, device, configured_alg: int, deadline: float) -> GemmChoice:
        clock, nan = self.clock, math.nan
        gen = torch.Generator(device=device)
        gen.manual_seed(99)
        a, b = _random_operands(shape, device, gen)
        packed = torch._cslt_compress(a)
        searched, search_limit = (
            _library_search(packed, b, shape.transpose_result) if clock() <= deadline else (None, None)
        )
        candidates, open_ended = _candidates(configured_alg, searched, search_limit)
        failed, _worst = _verify(shape, device, candidates, deadline=deadline, open_ended=open_ended, clock=clock)
        why = {config: reason for config, (reason, _detail) in failed.items()}
        correct = [config for config in candidates if config not in why]
        wrong = [config for config in candidates if why.get(config) == WRONG]
        refused = [config for config in candidates if why.get(config) == REFUSED]
        cut_short = BUDGET_SPENT in why.values()
        if not correct:
            if cut_short:
                return GemmChoice(-1, nan, nan, nan, BUDGET_SPENT, provisional=True)
            return GemmChoice(
                -1, nan, nan, nan, f"no correct alg id (wrong: {_labels(wrong)}, refused: {_labels(refused)})"
            )
        # Dense and the compression first: no verdict without them, whatever the budget then
        # leaves for the candidates. The budget is checked before every timing.
        runs = [("dense", None, lambda: _dense_mm(a, b, shape.transpose_result)),
                ("compress", None, _per_call_extras(a, shape))]  # fmt: skip
        runs += [("sparse", c, lambda c=c: cslt_sparse_mm(packed, b, shape.transpose_result, c)) for c in correct]
        seconds: dict = {}
        for kind, config, run in runs:
            if clock() > deadline:
                cut_short = True
                break
            seconds[config or kind] = self.timer(kind, config, run)
        timed = [config for config in correct if config in seconds]
        if not timed:
            return GemmChoice(-1, nan, nan, nan, BUDGET_SPENT, provisional=True)
        best = min(timed, key=lambda config: seconds[config])
        detail = f"{len(timed)} of {len(candidates)} candidates timed" + (f", wrong: {_labels(wrong)}" if wrong else "")
        detail += f", refused: {_labels(refused)}" if refused else ""
        detail += f", library pick {searched.label()}" if searched is not None else ""
        detail += ", cut short by the budget (provisional)" if cut_short else ""
        return GemmChoice(
            best.alg_id, seconds[best], seconds["compress"], seconds["dense"], detail,
            split_k=best.split_k, split_k_mode=best.split_k_mode, provisional=cut_short,
        )  # fmt: skip

    def gemm_choice(self, a: Tensor, b: Tensor, transpose_result: bool, configured_alg: int = 0, name: str = ""):
        """The verdict for ``a @ b`` (tuned on first sight of the shape, eagerly). Inside
        torch.compile tracing or on fake tensors: a read-only lookup, dense when absent."""
        tracing = torch.compiler.is_compiling() or _is_fake(a) or _is_fake(b)
        return self.choice_for(GemmShape.of(a, b, transpose_result), a.device, configured_alg, name, read_only=tracing)

    def _say_budget_spent(self) -> None:
        if not self._budget_said:
            self._budget_said = True
            logger.warning(
                "2:4 GEMM tuning budget (%s=%g s per process) spent: a shape it cut short keeps its best verdict so "
                "far for this run only (not saved), and shapes met from now on use dense GEMMs. Raise it, or tune "
                "before training (SparsityCallback does at train begin).",
                TUNE_SECONDS_ENV, tune_budget_s(),
            )  # fmt: skip

    def choice_for(
        self, shape: GemmShape, device, configured_alg: int = 0, name: str = "", read_only: bool = False
    ) -> GemmChoice:
        """The verdict for ``shape`` on ``device``: from this process, else the table file,
        else tuned now (unless ``read_only``: then a missing verdict reads as dense, unstored)."""
        key = f"{self.table_key(device)}/{shape.key()}"
        choice = self.choices.get(key)
        if choice is not None or read_only:
            return choice or GemmChoice(-1, math.nan, math.nan, math.nan, "not tuned before tracing")
        with self._lock:
            self._load_table(device)
            choice = self.choices.get(key)
            if choice is None:
                if self.budget_left_s() <= 0 and gemm_mode() == "auto":
                    choice = GemmChoice(-1, math.nan, math.nan, math.nan, BUDGET_SPENT, provisional=True)
                else:
                    choice = self.tune(shape, device, configured_alg)
                self.choices[key] = choice
                logger.info("2:4 GEMM %s", _describe(shape, choice, name))
                if choice.provisional:
                    self._say_budget_spent()
                elif choice.forced is None:
                    self._save_table(device)
        return choice

    def format_table(self, named_shapes: list[tuple[str, GemmShape]], device) -> str:
        """The verdicts of ``named_shapes`` as lines ("y3 4096×3072×768 ...: sparse 1.18× → sparse")."""
        prefix = self.table_key(device)
        lines = [f"2:4 GEMM verdicts on {prefix}:"]
        for name, shape in named_shapes:
            choice = self.choices.get(f"{prefix}/{shape.key()}")
            lines.append("  " + (_describe(shape, choice, name) if choice else f"{name} {shape.label()}: not tuned"))
        return "\n".join(lines)
