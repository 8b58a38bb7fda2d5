"""benchmarks/ffn_traffic.py counts what the op launches: kernels and bytes come from a trace of
the op as implemented (on meta tensors), not from a hand-written list. CPU only, a few seconds."""

import importlib
import os
import re
import sys

import pytest
import torch

from hf_sparse.model import fp8, gemm_backends, sparse_ffn

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
T, D, F = 1024, 256, 1024  # aligned for the cuSPARSELt path; meta tensors, so nothing is allocated


@pytest.fixture(scope="module")
def traffic():
    sys.path.insert(0, BENCHMARKS)  # the script imports its neighbour machine.py
    try:
        return importlib.import_module("ffn_traffic")
    finally:
        sys.path.remove(BENCHMARKS)


@pytest.fixture
def hw(traffic):
    return traffic.Machine(3.35e12, 700e12, 1400e12, 1.2, 1.5, 3e-6)


def _kernels_of(traffic, fn, *args):
    rec = traffic.KernelRecorder()
    with rec:
        fn(*args)
    return rec.kernels


def _signature(ks):
    return [(k.name, k.read, k.written) for k in ks]


def _contains_run(trace, run) -> bool:
    """True when ``run`` appears in ``trace`` as consecutive kernels."""
    return any(trace[i : i + len(run)] == run for i in range(len(trace) - len(run) + 1))


def test_fp8_mode_traces_the_weights_quantized_by_the_caller_and_one_scale_pass(traffic):
    """FP8 mode as the op now runs: the weights arrive quantized (relu2_2to4_ffn, compiled
    with the model or once per optimizer step), so none of fp8.quantize_rows' eager kernels
    appear in the op's trace, and each FP8 2:4 GEMM's scales are one compiled pass."""
    trace = traffic.trace_sparse_op(T, D, F, fp8_mode=True)
    meta = traffic.meta
    weights = [k for k in trace if k.name.startswith("fused FP8 rows of W_")]
    assert len(weights) == 2
    assert all(k.read == D * F * 2 and k.written == D * F + D * 4 for k in weights)  # bf16 in, FP8 + scales out
    # What fp8.quantize_rows launches eagerly on a weight (7 full-size passes and more) is
    # nowhere in the op's trace.
    quantize = _signature(_kernels_of(traffic, fp8.quantize_rows, meta(D, F)))
    assert len([k for k in quantize if k[1] + k[2] >= D * F]) >= 7
    assert not _contains_run(_signature(trace), quantize)
    scales = [k for k in trace if k.stage == "_fp8_scale_stage"]
    assert len(scales) == 2 and all(k.written == T * D * 2 for k in scales)
    assert all(k.read == T * D * 2 + (T + D) * 4 for k in scales)  # the bf16 product and both scale vectors
    fp8_gemms = [k for k in trace if k.kind == "sparse_gemm" and k.precision == "fp8"]
    assert len(fp8_gemms) == 2 and all("fp8" in k.name for k in fp8_gemms)


def test_bf16_totals_are_the_sum_of_the_traced_kernels(traffic, hw):
    trace = traffic.trace_sparse_op(T, D, F)
    summary = traffic.summarize(trace, hw)
    assert summary.total_s == pytest.approx(sum(hw.seconds(k) for k in trace))
    assert summary.memory_bytes == sum(k.bytes for k in trace if k.kind == "memory")
    assert summary.memory_kernels + summary.gemms == len(trace)
    # The stages as one fused kernel each, the rest as the op runs it: four compressions and
    # four 2:4 GEMMs at the shapes the op names, the weight-gradient assembly's index copies.
    assert [k.stage for k in trace if k.stage] == ["_forward_stage", "_backward_stage"]
    compress = [k for k in trace if k.name.startswith("cslt_compress")]
    sparse = [k for k in trace if k.kind == "sparse_gemm"]
    assert len(compress) == len(sparse) == 4
    for c in compress:
        m, k = (int(v) for v in re.search(r"\[(\d+)x(\d+)\]", c.name).groups())
        assert c.read == m * k * 2 and c.written == m * k + m * k // 8  # kept bf16 values + 2-bit metadata
    shapes = sparse_ffn.ffn_gemm_shapes(T, D, F, torch.bfloat16)
    assert sorted(k.flops for k in sparse) == sorted(2.0 * s.m * s.k * s.n for _name, s in shapes)
    assert sum(1 for k in trace if k.name.startswith("aten.index_copy_")) == 4


def test_the_last_two_lines_come_from_the_traced_op(traffic, hw, capsys):
    traffic.main(["--shapes", "130m,7b", "--tokens", str(T)])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    bf16 = re.fullmatch(r"modelled 2:4/dense fwd\+bwd at 7b: (\d+\.\d\d)", lines[-2])
    fp8_line = re.fullmatch(r"modelled fp8 2:4/fp8 dense fwd\+bwd at 7b: (\d+\.\d\d)", lines[-1])
    assert bf16 and fp8_line, lines[-2:]
    d, f = 4096, 16384
    want_bf16 = (
        traffic.summarize(traffic.trace_sparse_op(T, d, f), hw).total_s
        / traffic.summarize(traffic.trace_dense_fused(T, d, f), hw).total_s
    )
    want_fp8 = (
        traffic.summarize(traffic.trace_sparse_op(T, d, f, fp8_mode=True), hw).total_s
        / traffic.summarize(traffic.trace_dense_fused(T, d, f, fp8_gemms=True), hw).total_s
    )
    assert float(bf16.group(1)) == pytest.approx(want_bf16, abs=0.005)
    assert float(fp8_line.group(1)) == pytest.approx(want_fp8, abs=0.005)
    # Both GEMM speed-up sets, cited, and a row per shape.
    for cited in ("issue 203", "2503.16672", "SlideSparse", "2603.05232", "H100 PCIe", "M=N=K"):
        assert cited in out
    assert re.search(r"130m 768x3072 bf16 +[\d.]+ +[\d.]+-[\d.]+", out)
    assert re.search(r"7b 4096x16384 fp8 +[\d.]+ +[\d.]+-[\d.]+", out)
    assert "Sensitivity at 7b" in out


def _replace_everywhere(monkeypatch, original, replacement):
    """Rebind ``original`` wherever the op's modules imported it by name."""
    for name, module in list(sys.modules.items()):
        if name.startswith("hf_sparse.model") and module is not None:
            for attr, value in vars(module).items():
                if value is original:
                    monkeypatch.setattr(module, attr, replacement)


def test_the_model_follows_the_code(traffic, hw, monkeypatch):
    """A change in the op's code changes the modelled ratio by exactly the passes it adds."""

    def ratio(ks_sparse, ks_dense):
        return traffic.summarize(ks_sparse, hw).total_s / traffic.summarize(ks_dense, hw).total_s

    dense = traffic.trace_dense_fused(T, D, F, fp8_gemms=True)
    before = traffic.trace_sparse_op(T, D, F, fp8_mode=True)
    real_forward, real_backward = sparse_ffn._ffn_forward_impl, sparse_ffn._ffn_backward_impl

    def forward_quantizing_itself(*args, w_down_fp8=None, w_down_scale=None, **kwargs):
        return real_forward(*args, **kwargs)

    def backward_quantizing_itself(*args, w_up_fp8=None, w_up_scale=None, **kwargs):
        return real_backward(*args, **kwargs)

    # The op as it was: the caller's FP8 weights ignored, each quantized eagerly per call.
    monkeypatch.setattr(sparse_ffn, "_ffn_forward_impl", forward_quantizing_itself)
    monkeypatch.setattr(sparse_ffn, "_ffn_backward_impl", backward_quantizing_itself)
    after = traffic.trace_sparse_op(T, D, F, fp8_mode=True)
    w_down_passes = _kernels_of(traffic, fp8.quantize_rows, traffic.meta(D, F))
    w_up_t_passes = _kernels_of(traffic, fp8.quantize_rows, traffic.meta(F, D).t())  # a copy more: the transpose
    assert len(after) == len(before) + len(w_down_passes) + len(w_up_t_passes)
    assert ratio(after, dense) > ratio(before, dense)

    # bf16: the custom op runs its real implementation, so a change there shows too.
    monkeypatch.undo()
    base = traffic.trace_sparse_op(T, D, F)
    real_impl = gemm_backends._sparse24_mm_impl
    monkeypatch.setattr(gemm_backends, "_sparse24_mm_impl", lambda a, b, t, gemms: real_impl(a.clone(), b, t, gemms))
    changed = traffic.trace_sparse_op(T, D, F)
    assert sum(1 for k in changed if k.name.startswith("aten.clone")) == 4
    dense_bf16 = traffic.trace_dense_fused(T, D, F)
    assert ratio(changed, dense_bf16) > ratio(base, dense_bf16)


def test_fp8_baseline_is_compiled_like_the_op_stages(traffic):
    trace = traffic.trace_dense_fused(T, D, F, fp8_gemms=True)
    fused = [k for k in trace if k.kind == "memory"]
    assert len(fused) == 4  # relu² + rows, its backward + rows, one quantization per weight
    scaled = [k for k in trace if k.name.startswith("scaled_mm")]
    assert len(scaled) == 2 and all(k.precision == "fp8" for k in scaled)
    # The weights' quantization writes what fp8.quantize_rows returns: FP8 values + fp32 scales.
    weights = [k for k in fused if "W_" in k.name]
    assert [k.written for k in weights] == [D * F + D * 4, D * F + D * 4]
    assert all(k.read == D * F * 2 for k in weights)


def test_the_traced_path_leaves_the_switches_as_they_were(traffic):
    before = dict(gemm_backends._BACKENDS), dict(gemm_backends._AUTOMATIC)
    stage = sparse_ffn._run_stage
    traffic.trace_sparse_op(T, D, F)
    assert (gemm_backends._BACKENDS, gemm_backends._AUTOMATIC) == before
    assert sparse_ffn._run_stage is stage


def test_the_readmes_quote_the_script(traffic, capsys):
    """benchmarks/README.md holds the script's last two lines as it prints them now, and the
    project README quotes the same two ratios: a change to the op that moves the model
    fails here until the documents say the new numbers."""
    traffic.main([])
    last_two = capsys.readouterr().out.strip().splitlines()[-2:]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_readme = open(os.path.join(root, "benchmarks", "README.md"), encoding="utf-8").read()
    for line in last_two:
        assert f"    {line}\n" in bench_readme, line
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    bf16, fp8_ratio = (line.rsplit(" ", 1)[1] for line in last_two)
    assert f"**{bf16}×** at 7B" in readme and f"models at **{fp8_ratio}×**" in readme
