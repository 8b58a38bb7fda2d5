"""Per-shape 2:4 GEMM verdicts (hf_sparse/model/gemm_tuning.py) on CPU: the CUDA decision
path runs against the emulated cuSPARSELt (tests/cslt_emulator.py) with an injected timer.

What is checked: the verdict takes the fastest *correct* candidate (every alg id the
library has, whether or not torch knows the count, plus the library's own pick with its
split-k) and compares it, with its compression, against the dense GEMM; a non-finite
product is never correct; the verdict is kept in a JSON table keyed by GPU, torch and
cuSPARSELt versions, which is checked on every read and never crashes a run;
HF_SPARSE_2TO4_GEMMS overrides it; tuning is bounded by one budget per process, and a
verdict the budget cut short is never saved; nothing is ever tuned or cached while
torch.compile traces; and a compiled model runs the sparse GEMMs after compilation, across
the dense->sparse switch.
"""

import json
import logging
import math
import os

import pytest
import torch

from hf_sparse import SparseLlamaForCausalLM, set_training_step
from hf_sparse.model import gemm_backends, gemm_table, gemm_tuning
from hf_sparse.model.gemm_backends import CusparseltGemms
from hf_sparse.model.gemm_tuning import CsltConfig, GemmShape, GemmTuner
from hf_sparse.model.modeling_sparse_llama import prepare_2to4_gemms
from hf_sparse.model.sparse_ffn import ffn_gemm_shapes, relu2_2to4_ffn
from tests import cslt_emulator
from tests.cslt_emulator import NUM_ALG_IDS, UNREPORTED_ALG_IDS, install
from tests.cslt_emulator import emulated_cusparselt_cuda_rules  # noqa: F401  (fixture)
from tests.cslt_emulator import emulated_cusparselt_unknown_count  # noqa: F401  (fixture)
from tests.conftest import tiny_config

BF16 = torch.bfloat16
SHAPE = GemmShape(64, 128, 32, "row", False, "bfloat16")


class FakeTimer:
    """Seconds per call by kind ("sparse" per config, "compress", "dense"); records calls.

    ``sparse`` is keyed by (alg id, split_k, split_k_mode) or, for the library's default
    split-k, by the alg id alone. Each timing advances the budget clock (:meth:`clock`) by
    ``cost_s``, so budget tests run on fake seconds."""

    def __init__(self, sparse, compress=0.1, dense=1.0, cost_s=0.0):
        self.sparse, self.compress, self.dense = sparse, compress, dense
        self.cost_s = cost_s
        self.now = 0.0
        self.calls = []

    def clock(self):
        return self.now

    def __call__(self, kind, config, run):
        self.calls.append((kind, config))
        self.now += self.cost_s
        if kind == "sparse":
            fallback = self.sparse.get(config.alg_id, 10.0) if config.has_default_split_k() else 10.0
            return self.sparse.get(tuple(config), fallback)
        return self.compress if kind == "compress" else self.dense

    def sparse_timed(self):
        return [config for kind, config in self.calls if kind == "sparse"]


@pytest.fixture
def timer(monkeypatch):
    """A FakeTimer for the emulated back-end's tuner, whether it is installed before this
    fixture or after (install() then builds its tuner with it)."""
    fake = FakeTimer({0: 0.9, 1: 0.5, 2: 0.3, 3: 0.6})
    monkeypatch.setattr(cslt_emulator, "GemmTuner", lambda: GemmTuner(fake, fake.clock))
    backend = cpu_backend()
    if isinstance(backend, CusparseltGemms):
        backend.tuner.timer, backend.tuner.clock = fake, fake.clock
    return fake


def cpu_backend():
    return gemm_backends.automatic_gemm_backend("cpu")


def tuner() -> GemmTuner:
    """The tuner of the emulated cuSPARSELt back-end installed for this test."""
    return cpu_backend().tuner


def choice_for(shape, device, configured_alg=0):
    return tuner().choice_for(shape, device, configured_alg)


def new_process():
    """What a new process sees: no verdicts, the whole budget, no warning said yet; the
    table file stays."""
    old = tuner()
    cpu_backend().tuner = GemmTuner(old.timer, old.clock)
    gemm_table._said.clear()


def test_fastest_correct_alg_id_wins_and_is_compared_with_dense(emulated_cusparselt_cuda_rules, timer):
    emulated_cusparselt_cuda_rules.wrong_alg_ids = {2}  # the fastest one computes garbage
    choice = choice_for(SHAPE, "cpu")
    assert choice.alg_id == 1  # 2 is faster but wrong, so it was never timed
    assert CsltConfig(2) not in timer.sparse_timed() and CsltConfig(1) in timer.sparse_timed()
    assert "wrong: [2]" in choice.reason
    assert choice.use_sparse()  # 0.5 + 0.1 compression < 1.0 dense
    assert choice.speedup() == pytest.approx(1.0 / 0.6)
    # Same shape, dense faster than sparse + compression: dense; with the compression
    # paid once per step (2:4 weights) sparse still wins.
    tuner().choices.clear()
    timer.dense = 0.55
    slower = choice_for(SHAPE, "cpu")
    assert not slower.use_sparse() and slower.use_sparse(amortised_compression=True)


def test_no_correct_alg_id_means_dense(emulated_cusparselt_cuda_rules, timer):
    emulated_cusparselt_cuda_rules.wrong_alg_ids = set(range(8))
    choice = choice_for(SHAPE, "cpu")
    assert choice.alg_id == -1 and not choice.use_sparse()
    assert timer.sparse_timed() == []


LIBRARIES = {
    # (get_max_alg_id() reports the count, torch._C._cusparselt.mm_search exists), the alg ids there are
    "count reported (cuSPARSELt 0.6.2)": (True, True, NUM_ALG_IDS),
    "count unreported, search (0.7/0.8 wheels)": (False, True, UNREPORTED_ALG_IDS),
    "count unreported, no search binding": (False, False, UNREPORTED_ALG_IDS),
}


@pytest.mark.parametrize("library", LIBRARIES)
def test_every_alg_id_the_library_has_is_verified_and_timed(monkeypatch, timer, library):
    """torch 2.13 knows the alg-id count of three cuSPARSELt versions only; on the others
    (what the CUDA wheels ship) the ids are found through the library's search or by
    trying them upwards until one is refused, never only the configured one."""
    reported, search, count = LIBRARIES[library]
    emu = install(monkeypatch, cuda_rules=True, alg_count_reported=reported, library_search=search)
    assert hasattr(torch._C, "_cusparselt") == search
    last = count - 1
    timer.sparse = {0: 0.9, last: 0.2}  # the last id is the fastest
    choice = choice_for(SHAPE, "cpu")
    assert choice.config == CsltConfig(last) and choice.use_sparse() and not choice.provisional
    assert {c.alg_id for c in emu.mm_calls} == set(range(count))
    assert set(timer.sparse_timed()) == {CsltConfig(alg) for alg in range(count)}
    # A reported count is never exceeded; otherwise the one id past the end is refused once
    # (the search's max id, or the probe's first miss) and ends the range.
    assert emu.refused_alg_ids == ([] if reported else [count])
    assert len(emu.search_calls) == (1 if search else 0)


def test_the_library_pick_with_split_k_is_verified_timed_saved_and_replayed(emulated_cusparselt_unknown_count, timer):
    emu = emulated_cusparselt_unknown_count
    emu.search_pick = (5, 4, 1)  # alg 5 with split-k 4 in two kernels
    timer.sparse = {0: 0.9, 5: 0.7, (5, 4, 1): 0.3}
    choice = choice_for(SHAPE, "cpu")
    assert choice.config == CsltConfig(5, 4, 1) and choice.use_sparse()
    verified = {(c.alg_id, c.split_k, c.split_k_mode) for c in emu.mm_calls}
    assert (5, 4, 1) in verified and (5, 1, -1) in verified  # the pick and the id at the default split-k
    with open(gemm_tuning.table_path(), encoding="utf-8") as handle:
        entry = json.load(handle)["tables"][tuner().table_key("cpu")][SHAPE.key()]
    assert (entry["alg_id"], entry["split_k"], entry["split_k_mode"]) == (5, 4, 1)
    new_process()  # a new process reads it back whole
    assert choice_for(SHAPE, "cpu") == choice
    # The op replays exactly what was verified and timed.
    emu.reset()
    a, b = gemm_tuning._random_operands(SHAPE, "cpu", torch.Generator().manual_seed(0))
    out = cpu_backend().mm(a, b)
    assert [(c.alg_id, c.split_k, c.split_k_mode) for c in emu.mm_calls] == [(5, 4, 1)]
    assert (out.float() - a.float() @ b.float()).norm() <= 1e-2 * (a.float() @ b.float()).norm()


def test_a_wrong_library_pick_is_never_timed(emulated_cusparselt_unknown_count, timer):
    """The search goes by speed only: its pick is verified like any other candidate."""
    emu = emulated_cusparselt_unknown_count
    emu.search_pick = (3, 2, 0)
    emu.wrong_alg_ids = {3}
    timer.sparse = {(3, 2, 0): 0.01, 1: 0.5}
    choice = choice_for(SHAPE, "cpu")
    assert choice.config == CsltConfig(1)
    assert CsltConfig(3, 2, 0) not in timer.sparse_timed()
    assert "3 split-k 2 mode 0" in choice.reason and "wrong: [" in choice.reason


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_non_finite_product_fails_verification_and_never_wins(emulated_cusparselt_cuda_rules, timer, value):
    """An alg id whose product holds one NaN (or inf) is wrong, however fast: the check
    must fail it, not let a NaN error compare as small."""
    emulated_cusparselt_cuda_rules.non_finite_alg_ids = {2: value}
    choice = choice_for(SHAPE, "cpu")
    assert choice.alg_id == 1 and "wrong: [2]" in choice.reason  # 2 is the fastest in the timer
    assert CsltConfig(2) not in timer.sparse_timed()
    ok, detail = gemm_tuning.verify_alg_id(SHAPE, "cpu", 2)
    assert not ok and detail.endswith(("nan", "inf"))
    # Nor may it become a verdict when it is the configured id and forced.
    tuner().choices.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gemm_tuning.GEMMS_ENV, "sparse")
        assert not choice_for(SHAPE, "cpu", configured_alg=2).use_sparse()


def test_verdicts_persist_in_a_table_keyed_by_gpu_and_versions(emulated_cusparselt_cuda_rules, timer, monkeypatch):
    first = choice_for(SHAPE, "cpu")
    path = gemm_tuning.table_path()
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    key = tuner().table_key("cpu")
    assert "cuSPARSELt emulated" in key and f"torch {torch.__version__}" in key
    assert data["tables"][key][SHAPE.key()]["alg_id"] == first.alg_id
    # A new process (same GPU and versions) reads the verdict instead of tuning.
    new_process()
    timer.calls.clear()
    again = choice_for(SHAPE, "cpu")
    assert again == first and timer.calls == []
    # Another cuSPARSELt version invalidates it: tuned anew, both entries kept.
    new_process()
    monkeypatch.setattr(torch.backends.cusparselt, "version", lambda: "emulated-2")
    choice_for(SHAPE, "cpu")
    assert timer.calls
    with open(path, encoding="utf-8") as handle:
        assert len(json.load(handle)["tables"]) == 2


def test_unreadable_table_is_ignored_with_a_warning(emulated_cusparselt_cuda_rules, timer, caplog):
    with open(gemm_tuning.table_path(), "w", encoding="utf-8") as handle:
        handle.write("{not json")
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        assert choice_for(SHAPE, "cpu").alg_id == 2
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1
    with open(gemm_tuning.table_path(), encoding="utf-8") as handle:
        assert json.load(handle)["format"] == gemm_tuning.TABLE_FORMAT  # rewritten whole


def test_env_override(emulated_cusparselt_cuda_rules, timer, monkeypatch):
    monkeypatch.setenv(gemm_tuning.GEMMS_ENV, "dense")
    assert not choice_for(SHAPE, "cpu").use_sparse()
    monkeypatch.setenv(gemm_tuning.GEMMS_ENV, "sparse")
    tuner().choices.clear()
    forced = choice_for(SHAPE, "cpu")
    assert forced.use_sparse() and forced.alg_id == 0 and timer.calls == []  # verified, not timed
    # A forced alg id that is wrong at the shape still never runs.
    emulated_cusparselt_cuda_rules.wrong_alg_ids = {0}
    tuner().choices.clear()
    assert not choice_for(SHAPE, "cpu").use_sparse()
    monkeypatch.setenv(gemm_tuning.GEMMS_ENV, "fastest")
    tuner().choices.clear()
    with pytest.raises(ValueError, match=r"HF_SPARSE_2TO4_GEMMS='fastest' is not valid; choose one of 'auto'"):
        choice_for(SHAPE, "cpu")


def test_tuning_budget_is_bounded_and_said(emulated_cusparselt_cuda_rules, timer, monkeypatch, caplog):
    monkeypatch.setenv(gemm_tuning.TUNE_SECONDS_ENV, "0")
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        first = choice_for(SHAPE, "cpu")
        choice_for(GemmShape(32, 64, 16, "col", True, "bfloat16"), "cpu")
    assert not first.use_sparse() and first.reason == "budget spent"
    assert timer.calls == []
    assert sum("tuning budget" in r.getMessage() for r in caplog.records) == 1


TIMINGS_PER_SHAPE = 2 + NUM_ALG_IDS  # dense, compression, every alg id


def test_one_budget_per_process_across_a_models_shapes_said_once(
    emulated_cusparselt_cuda_rules, timer, monkeypatch, caplog
):
    """The budget is the process's, not each shape's: of the model's four FFN GEMM shapes
    the first is tuned whole, the second cut short (provisional), the last two find
    nothing left; one warning, and never more than one timing over."""
    timer.cost_s = 1.0  # each timing costs one second of the budget clock
    budget = TIMINGS_PER_SHAPE + 5
    monkeypatch.setenv(gemm_tuning.TUNE_SECONDS_ENV, str(budget))
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        named = prepare_2to4_gemms(quick_model(), tokens=32)
    key = tuner().table_key("cpu")
    choices = [tuner().choices[f"{key}/{shape.key()}"] for _, shape in named]
    assert len(choices) == 4
    assert not choices[0].provisional and "8 of 8 candidates timed" in choices[0].reason
    assert choices[1].provisional and choices[1].alg_id >= 0 and "cut short" in choices[1].reason
    assert all(c.provisional and c.reason == "budget spent" and not c.use_sparse() for c in choices[2:])
    assert len(timer.calls) == TIMINGS_PER_SHAPE + 6  # the second shape: 5 timings fit, a 6th started in time
    # Checked before each timing: overrun by one timing at most.
    assert budget <= tuner().budget_spent_s <= budget + timer.cost_s
    assert sum("tuning budget" in r.getMessage() for r in caplog.records) == 1
    saved = json.load(open(gemm_tuning.table_path(), encoding="utf-8"))["tables"][key]
    assert set(saved) == {named[0][1].key()}  # provisional verdicts are not saved


def test_a_provisional_verdict_is_not_read_back_as_final(emulated_cusparselt_cuda_rules, timer, monkeypatch):
    """A 3 s budget once saved the best of the first 3 ids for good, and a later 600 s run
    read it back though id 7 was the fastest: now the next process tunes it whole."""
    timer.sparse = {0: 0.9, 1: 0.8, 2: 0.7, 7: 0.2}
    timer.cost_s = 1.0
    monkeypatch.setenv(gemm_tuning.TUNE_SECONDS_ENV, "4.5")  # dense, compression, ids 0-2
    cut = choice_for(SHAPE, "cpu")
    assert cut.provisional and cut.alg_id == 2
    assert choice_for(SHAPE, "cpu") is cut  # used for the rest of this process
    assert not os.path.exists(gemm_tuning.table_path())
    # A table entry marked provisional (another version's, a hand edit) is not final either.
    key = tuner().table_key("cpu")
    marked = dict(gemm_tuning.asdict(cut))
    with open(gemm_tuning.table_path(), "w", encoding="utf-8") as handle:
        json.dump({"format": gemm_tuning.TABLE_FORMAT, "tables": {key: {SHAPE.key(): marked}}}, handle)
    new_process()  # the next process, with time to spare
    monkeypatch.setenv(gemm_tuning.TUNE_SECONDS_ENV, "600")
    timer.calls.clear()
    final = choice_for(SHAPE, "cpu")
    assert final.alg_id == 7 and not final.provisional and timer.sparse_timed()
    new_process()
    timer.calls.clear()
    assert choice_for(SHAPE, "cpu") == final and timer.calls == []  # saved, read back


def test_the_budget_also_bounds_verification(emulated_cusparselt_cuda_rules, timer, monkeypatch):
    """Verification is checked against the same budget clock before every product."""
    clock = iter(range(1000))
    tuner().clock = lambda: float(next(clock))  # each clock read: one more second
    monkeypatch.setenv(gemm_tuning.TUNE_SECONDS_ENV, "3")
    emu = emulated_cusparselt_cuda_rules
    choice = choice_for(SHAPE, "cpu")
    assert choice.provisional and not choice.use_sparse()
    assert len(emu.mm_calls) <= 3 and timer.calls == []


def test_nothing_is_tuned_or_cached_while_tracing(emulated_cusparselt_cuda_rules, timer, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = torch.empty(64, 128, dtype=BF16), torch.empty(128, 32, dtype=BF16)
        choice = tuner().gemm_choice(a, b, False)
    assert not choice.use_sparse() and choice.reason == "not tuned before tracing"
    assert tuner().choices == {} and timer.calls == []
    # Real tensors while dynamo traces: a read too (a sync there would raise).
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real = torch.zeros(64, 128, dtype=BF16), torch.zeros(128, 32, dtype=BF16)
    assert cpu_backend().verdict(*real).reason == "not tuned before tracing"
    assert tuner().choices == {} and timer.calls == []


def test_op_takes_each_gemm_as_its_verdict_says(emulated_cusparselt_cuda_rules, timer):
    """Dense for the forward GEMM, sparse for the rest: only three shapes reach cuSPARSELt,
    and the result is the plain path's up to the GEMMs' accumulation order."""
    t, d, f = 64, 32, 128
    shapes = dict(ffn_gemm_shapes(t, d, f, BF16))
    for name, shape in shapes.items():
        timer.dense = 0.3 if name == "y3" else 1.0  # y3: dense beats 0.5 + 0.1
        choice_for(shape, "cpu")
    emu = emulated_cusparselt_cuda_rules
    emu.reset()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(t, d, generator=gen).to(BF16).requires_grad_()
    w_up = (torch.randn(f, d, generator=gen) / d**0.5).to(BF16).requires_grad_()
    w_down = (torch.randn(d, f, generator=gen) / f**0.5).to(BF16).requires_grad_()
    y = relu2_2to4_ffn(x, w_up, w_down)
    y.float().square().sum().backward()
    ran = {(c.m, c.k, c.n, c.b_layout, c.transpose_result) for c in emu.mm_calls}
    expected = {(s.m, s.k, s.n, s.b_layout, s.transpose_result) for n, s in shapes.items() if n != "y3"}
    assert ran == expected
    ref = [a.detach().clone() for a in (x, w_up, w_down)]
    ref = [a.requires_grad_() for a in ref]
    y_ref = relu2_2to4_ffn(*ref, gemms="plain")
    y_ref.float().square().sum().backward()
    for got, want in ((y, y_ref), (x.grad, ref[0].grad), (w_up.grad, ref[1].grad), (w_down.grad, ref[2].grad)):
        assert (got.float() - want.float()).norm() <= 2e-2 * want.float().norm()


def quick_model():
    config = tiny_config(activation_2by4=True, activation_dense_warmup_steps=1, torch_dtype="bfloat16", vocab_size=64)
    torch.manual_seed(0)
    return SparseLlamaForCausalLM(config).to(BF16).train()


@pytest.mark.parametrize("prepared", [False, True])
def test_compiled_model_runs_sparse_gemms_after_the_switch(emulated_cusparselt_cuda_rules, timer, prepared):
    """The review's bug: a self-check reached while torch.compile traced the model cached
    "broken" and the run trained on dense GEMMs for good. Now verdicts are made eagerly,
    before the first step (``prepared``, as SparsityCallback does at train begin) or at
    the op's first run-time call; tracing only reads them. Either way the compiled steps
    after the dense->sparse recompile run the emulated 2:4 GEMMs."""
    # A fresh trace, as in a new process: compiled-graph caches would replay an earlier
    # test's trace-time decisions instead of making them again.
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        run_compiled_steps(emulated_cusparselt_cuda_rules, prepared)


def run_compiled_steps(emu, prepared):
    model = quick_model()
    batch, seq = 2, 16
    tokens = batch * seq
    if prepared:
        named = prepare_2to4_gemms(model, tokens)
        assert {name for name, _ in named} == {"FFN y3", "FFN dx", "FFN dW_up", "FFN dW_down"}
        assert all(choice.use_sparse() for choice in tuner().choices.values())
    compiled = torch.compile(model)
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(0))
    for step in range(4):
        emu.reset()
        set_training_step(model, step, 4)
        compiled(input_ids=ids, labels=ids).loss.backward()
        ffn_calls = [c for c in emu.mm_calls if tokens in (c.m, c.k)]
        if step == 0:
            assert ffn_calls == []  # dense warm-up: no 2:4 op in the graph
        elif step == 1 and not prepared:
            assert len(ffn_calls) > 8  # the op's first calls verify and time each shape
        else:
            # Forward and dx per layer, both weight gradients per layer: 4 x 2 layers.
            assert len(ffn_calls) == 8, ffn_calls
    assert all(math.isfinite(float(p.grad.float().norm())) for p in model.parameters() if p.grad is not None)
    assert all(choice.use_sparse() for choice in tuner().choices.values())


@pytest.mark.parametrize("streamed", [False, True], ids=["map-style", "streamed"])
def test_sparsity_callback_makes_the_verdicts_at_train_begin(emulated_cusparselt_cuda_rules, timer, tmp_path, streamed):
    """With the Trainer, the verdicts for the training shapes and, forward only, for a full
    evaluation batch exist before step 1 runs (bf16 autocast, as a GPU run would use), so
    no step ever pays for tuning. A streamed dataset (the C4 recipe's) does not say its
    block length: the callback is told it (train_hf passes max_length)."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback

    from hf_sparse import SparsityCallback
    from tests.conftest import tiny_training_args

    seen_at_first_step = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                seen_at_first_step.append(sorted(tuner().choices))

    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(tiny_config(activation_2by4=True, activation_dense_warmup_steps=0, vocab_size=64))
    seq = 16
    ids = torch.randint(0, 64, (8, seq), generator=torch.Generator().manual_seed(1)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    if streamed:
        data = data.to_iterable_dataset()
    args = tiny_training_args(
        tmp_path, max_steps=1, per_device_train_batch_size=2, per_device_eval_batch_size=4, bf16=True
    )
    callback = SparsityCallback(sequence_length=seq if streamed else None)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Probe()]).train()
    key = tuner().table_key("cpu")
    train = {f"{key}/{s.key()}" for _, s in ffn_gemm_shapes(2 * seq, 32, 128, BF16)}
    evaluation = {f"{key}/{s.key()}" for name, s in ffn_gemm_shapes(4 * seq, 32, 128, BF16) if name == "y3"}
    assert seen_at_first_step and set(seen_at_first_step[0]) == train | evaluation
    assert any(c.m == 2 * seq or c.k == 2 * seq for c in emulated_cusparselt_cuda_rules.mm_calls)


def test_compiled_2to4_weights_follow_verdicts_made_after_compiling(emulated_cusparselt_cuda_rules, timer):
    """The audit's bug: a 2:4-weight linear read its verdict while dynamo traced, found
    none (nothing prepared, as with a streamed dataset) and baked the dense F.linear into
    the graph for good: 0 sparse calls per step compiled, one per linear eager. The weight GEMM is now
    a custom op that reads the verdict when it runs: the first compiled step tunes each
    shape, every later step runs the 2:4 GEMMs."""
    from hf_sparse.model.weight_sparse import next_weight_generation

    torch._dynamo.reset()
    config = tiny_config(
        weight_2by4=True, weight_2by4_scope="all", torch_dtype="bfloat16", vocab_size=64, num_hidden_layers=1
    )
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(config).to(BF16).train()
    linears = sum(1 for m in model.modules() if getattr(m, "sparse_weight_on", None) is not None)
    assert linears == 6  # q, k, v, o, up, down
    batch, seq = 2, 16
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model)
    emu = emulated_cusparselt_cuda_rules
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        for step in range(2):
            emu.reset()
            set_training_step(model, step, 2)
            next_weight_generation(model)
            compiled(input_ids=ids, labels=ids).loss.backward()
            weight_gemms = [c for c in emu.mm_calls if c.n == batch * seq and c.transpose_result]
            if step == 0:
                assert len(weight_gemms) > linears  # each shape verified and timed at its first call
            else:
                assert len(weight_gemms) == linears, weight_gemms  # one 2:4 forward GEMM per linear
    assert all(choice.use_sparse(amortised_compression=True) for choice in tuner().choices.values())
