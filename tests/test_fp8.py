"""FP8 2:4 (activation_2by4_fp8) on CPU, through the emulated cuSPARSELt with real
float8_e4m3fn rounding: the forward and input-gradient GEMMs run as row-wise scaled FP8
2:4 GEMMs with the dense operand column-major; the weight-gradient GEMMs stay bf16; the
result stays close to the bf16 branch; anywhere FP8 2:4 cannot run it is refused in one line."""

import json

import pytest
import torch

from hf_sparse import SparseLlamaConfig
from hf_sparse.model.fp8 import FP8, FP8_MAX, quantize_rows
from hf_sparse.model.sparse_ffn import BACKWARD_MODES, SPARSE_METHODS, make_token_permutation, relu2_2to4_ffn
from hf_sparse.training.config.run_args import ConfigError
from hf_sparse.training.config.run_config import parse_run_config
from tests.cslt_emulator import emulated_cusparselt, emulated_cusparselt_cuda_rules  # noqa: F401  (fixtures)
from tests.test_sparse_ffn import make_inputs, run_op

BF16 = torch.bfloat16
# FP8 e4m3 keeps 3 mantissa bits: each value is off by up to 1/16 of itself; over a GEMM's
# sums of many products the errors average out to a few percent of the result.
FP8_RTOL = 0.06


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_quantize_rows_keeps_zeros_and_rows():
    torch.manual_seed(0)
    t = torch.randn(8, 32) * torch.logspace(-3, 3, 8).unsqueeze(1)  # rows of very different scale
    t[t.abs() < 0.3 * t.abs().amax(1, keepdim=True)] = 0
    t[5] = 0  # an all-zero row
    values, scale = quantize_rows(t)
    assert values.dtype == FP8 and scale.shape == (8, 1) and values.is_contiguous()
    assert torch.equal(values.float() == 0, t == 0)  # zeros stay zeros: a 2:4 row stays 2:4
    assert scale[5].item() == 1.0
    assert torch.allclose(values.float().abs().amax(1)[t.abs().amax(1) > 0], torch.tensor(FP8_MAX))
    back = values.float() * scale
    assert (back - t).abs().max() <= (t.abs() / 16).max()


@pytest.mark.parametrize("backward", BACKWARD_MODES)
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_fp8_branch_close_to_bf16_and_weight_gradients_unchanged(emulated_cusparselt, method, backward):
    x, w_up, w_down, dy = make_inputs(t=64, d=32, f=64, dtype=BF16, seed=40)
    kw = dict(method=method, backward=backward, permutation=make_token_permutation(64, seed=1))
    bf16 = run_op(x, w_up, w_down, dy, **kw)
    emulated_cusparselt.reset()
    fp8 = run_op(x, w_up, w_down, dy, fp8=True, **kw)
    for name, a, b in zip(("y", "dx"), fp8[:2], bf16[:2]):
        assert a.dtype == BF16 and rel_err(a, b) < FP8_RTOL, f"{method}/{backward}/{name}: {rel_err(a, b):.3g}"
    # dW_up reads dy1 = dy3·W_down ⊙ g and dW_down reads dy3 and y2s: none touched by FP8.
    assert torch.equal(fp8[2], bf16[2]) and torch.equal(fp8[3], bf16[3])
    calls = emulated_cusparselt.mm_calls
    fp8_calls = [c for c in calls if c.dtype == FP8]
    # y3 = y2s·W_downᵀ and dx = dy1·W_up, both with the dense operand column-major.
    assert {(c.m, c.k, c.n, c.b_layout) for c in fp8_calls} == {(64, 64, 32, "col")} and len(fp8_calls) == 2
    assert all(c.dtype == BF16 for c in calls if c not in fp8_calls)


def test_fp8_unaligned_tokens_run_the_plain_path(emulated_cusparselt):
    x, w_up, w_down, dy = make_inputs(t=30, d=32, f=64, dtype=BF16, seed=41)
    got = run_op(x, w_up, w_down, dy, fp8=True)
    assert emulated_cusparselt.mm_calls == []
    want = run_op(x, w_up, w_down, dy, gemms="plain")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_fp8_refused_where_it_cannot_run():
    x, w_up, w_down, _ = make_inputs(t=64, d=32, f=64, dtype=BF16, seed=42)
    with pytest.raises(ValueError, match=r"activation_2by4_fp8: FP8 2:4 GEMMs cannot run here \(device is cpu"):
        relu2_2to4_ffn(x, w_up, w_down, fp8=True)
    with pytest.raises(ValueError, match="activation_2by4_fp8=True requires activation_2by4=True"):
        SparseLlamaConfig(squ_relu="relu2", activation_2by4_fp8=True)


def test_run_json_with_fp8_fails_up_front_on_this_machine(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({
        "model_config": "configs/llama_quickstart.json", "squ_relu": "relu2", "activation_2by4": True,
        "activation_2by4_fp8": True, "output_dir": str(tmp_path / "out"), "max_steps": 2, "report_to": [],
    }))  # fmt: skip
    with pytest.raises(ConfigError) as err:
        parse_run_config([str(run)])
    message = str(err.value)
    assert "\n" not in message and "activation_2by4_fp8=True needs FP8 2:4 GEMMs" in message
    assert "set activation_2by4_fp8 to false" in message
    assert not (tmp_path / "out").exists()


def test_tiny_model_trains_with_fp8(emulated_cusparselt):
    from hf_sparse import SparseLlamaForCausalLM, set_training_step
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(
        tiny_config(activation_2by4=True, activation_2by4_fp8=True, activation_dense_warmup_steps=0, vocab_size=64)
    ).to(BF16)
    set_training_step(model, 1, 4)
    ids = torch.randint(0, 64, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and any(c.dtype == FP8 for c in emulated_cusparselt.mm_calls)


@pytest.mark.parametrize("verdicts", ["dense", "sparse"])
def test_fp8_on_either_gemm_verdict_matches_bf16(emulated_cusparselt_cuda_rules, monkeypatch, verdicts):
    """The FP8 GEMMs as training decides them (CUDA decision path, emulated backend): where
    the verdict is dense, `torch._scaled_mm` runs instead of the 2:4 GEMM, with the same
    row and column scales, applied once (applied twice, the result would be off by ~100%)."""
    from hf_sparse.model.gemm_tuning import GEMMS_ENV

    monkeypatch.setenv(GEMMS_ENV, verdicts)
    x, w_up, w_down, dy = make_inputs(t=64, d=32, f=64, dtype=BF16, seed=40)
    bf16 = run_op(x, w_up, w_down, dy)
    emulated_cusparselt_cuda_rules.reset()
    fp8 = run_op(x, w_up, w_down, dy, fp8=True)
    for name, a, b in zip(("y", "dx"), fp8[:2], bf16[:2]):
        assert rel_err(a, b) < FP8_RTOL, f"{verdicts}/{name}: {rel_err(a, b):.3g}"
    fp8_calls = [c for c in emulated_cusparselt_cuda_rules.mm_calls if c.dtype == FP8]
    assert (len(fp8_calls) >= 2) == (verdicts == "sparse")  # dense verdicts: no FP8 2:4 GEMM at all


def test_fp8_weights_are_quantized_once_per_optimizer_step(emulated_cusparselt, monkeypatch):
    """With the step counter (SparsityCallback's next_weight_generation) the op's FP8
    weights are quantized once per optimizer step, not per call: micro-batches and
    evaluations of one step reuse them, and the results are the same bits."""
    from hf_sparse.model import fp8

    calls = []
    real = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda t: calls.append(tuple(t.shape)) or real(t))
    x, w_up, w_down, dy = make_inputs(t=64, d=32, f=64, dtype=BF16, seed=43)
    every_call = run_op(x, w_up, w_down, dy, fp8=True)
    assert sorted(calls) == [(32, 64), (32, 64)]  # W_down and W_upᵀ (d×F each), this call
    calls.clear()
    w_up_param, w_down_param = w_up.clone().requires_grad_(), w_down.clone().requires_grad_()
    for step, micro_batches in ((1, 3), (2, 2)):
        for _ in range(micro_batches):
            torch.manual_seed(123)
            y = relu2_2to4_ffn(x, w_up_param, w_down_param, fp8=True, weight_generation=step)
            y.backward(dy)
            assert torch.equal(y.detach(), every_call[0])
        assert len(calls) == 2 * step  # two weights per step, whatever the micro-batches
    # An in-place change within a step (loading, a manual edit) is seen through the version.
    with torch.no_grad():
        w_down_param.mul_(2)
    relu2_2to4_ffn(x, w_up_param, w_down_param, fp8=True, weight_generation=2)
    assert len(calls) == 6


def test_fp8_takes_32_aligned_operands_else_bf16_2to4(emulated_cusparselt):
    """PyTorch's cuSPARSELt FP8 operands need dims that are multiples of 32 (16-bit ones 16),
    which the emulator enforces: T=48 runs the bf16 2:4 GEMMs instead, identical to fp8=False."""
    x, w_up, w_down, dy = make_inputs(t=48, d=32, f=64, dtype=BF16, seed=44)
    got = run_op(x, w_up, w_down, dy, fp8=True)
    calls = emulated_cusparselt.mm_calls
    assert calls and all(c.dtype == BF16 for c in calls)
    for a, b in zip(got, run_op(x, w_up, w_down, dy)):
        assert torch.equal(a, b)
    # The emulator refuses a 16-aligned FP8 operand, as the library would.
    from tests.cslt_emulator import CusparseLtPreconditionError

    a, _ = quantize_rows(torch.zeros(48, 64))
    with pytest.raises(CusparseLtPreconditionError, match="multiples of 32"):
        torch._cslt_compress(a)


def test_fp8_shapes_are_prepared_and_a_dense_verdict_is_said_once(emulated_cusparselt_cuda_rules, monkeypatch, caplog):
    """prepare_2to4_gemms tunes the FP8 GEMM shape the op will run (y3 and dx share it), not
    the bf16 ones; where the FP8 2:4 GEMM with its compression and scale pass is measured
    slower than the dense FP8 GEMM, the op runs dense FP8 GEMMs there and says so once."""
    import logging

    from hf_sparse import SparseLlamaForCausalLM
    from hf_sparse.model.modeling_sparse_llama import prepare_2to4_gemms
    from tests.conftest import tiny_config

    kinds = []

    def timer(kind, config, run):
        run()
        kinds.append(kind)
        return {"dense": 0.1, "compress": 0.2}.get(kind, 0.15)  # 0.15 + 0.2 > 0.1: dense wins

    emulated_cusparselt_cuda_rules.backend.tuner.timer = timer
    model = SparseLlamaForCausalLM(
        tiny_config(activation_2by4=True, activation_2by4_fp8=True, activation_dense_warmup_steps=0, vocab_size=64)
    ).to(BF16)
    named = dict(prepare_2to4_gemms(model, tokens=64))
    assert named["FFN dx"].dtype == "float8_e4m3fn" and named["FFN dx"].b_layout == "col"
    assert {shape.dtype for shape in named.values()} == {"float8_e4m3fn", "bfloat16"}  # dW GEMMs stay bf16
    tuned = emulated_cusparselt_cuda_rules.backend.tuner.choices
    assert len(tuned) == 3 and "dense" in kinds  # the FP8 shape once, dW_up, dW_down
    emulated_cusparselt_cuda_rules.reset()  # the products verification made
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        for _ in range(2):
            ids = torch.randint(0, 64, (4, 16))
            model(input_ids=ids, labels=ids).loss.backward()
    said = [r for r in caplog.records if "measured slower than the dense FP8 GEMM" in r.getMessage()]
    assert len(said) == 1
    assert not any(c.dtype == FP8 for c in emulated_cusparselt_cuda_rules.mm_calls)  # dense FP8 GEMMs ran
