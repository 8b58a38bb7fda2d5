"""torch.compile: every FFN mode traces as one graph, trains like eager, recompiles once at most.

Compilation on CPU is slow, so the Trainer runs use the `aot_eager` backend: it runs
dynamo and AOTAutograd (graph capture, guards, functionalised stat updates, the
checkpointing partitioner), which is where this model's compile problems live, with
eager kernels, so compiled and eager losses agree bitwise. One MLP case goes through
inductor to check its generated code. `HF_SPARSE_TEST_COMPILE_BACKEND=inductor` runs
every case through inductor (several minutes on 2 vCPUs).
"""

import copy
import os

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Trainer, TrainerCallback

from hf_sparse import SparseLlamaForCausalLM, SparsityCallback, set_training_step
from hf_sparse.model.modeling_sparse_llama import STAT_TOTAL, SparseLlamaMLP, ensure_activation_stats
from tests.conftest import host_sync_calls, tiny_config, tiny_training_args
from tests.test_telemetry import RandomTokens

BACKEND = os.environ.get("HF_SPARSE_TEST_COMPILE_BACKEND", "aot_eager")
LOW_RANK = dict(loro_scope="all", loro_attn_rank=8, loro_mlp_rank=8)
MODES = {
    "silu": dict(squ_relu="silu"),
    "relu2": dict(),
    "relu2_2by4": dict(activation_2by4=True),
    "lowrank": dict(LOW_RANK),
    "lowrank_2by4": dict(LOW_RANK, activation_2by4=True),
}
# Compiled vs eager loss: bitwise under aot_eager; inductor reorders float32 reductions.
LOSS_RTOL = 1e-5
TELEMETRY_PREFIXES = ("sparsity_relu/", "sparsity_24/", "weight_sparsity/")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


# --- (a) the MLP alone, fullgraph ----------------------------------------------------------


@pytest.mark.parametrize(
    "mode,backend",
    [(mode, BACKEND) for mode in MODES] + ([("relu2_2by4", "inductor")] if BACKEND != "inductor" else []),
)
def test_mlp_compiles_fullgraph_and_matches_eager(monkeypatch, mode, backend):
    config = tiny_config(activation_dense_warmup_steps=0, **MODES[mode])
    eager = SparseLlamaMLP(config, layer_idx=0).train()
    compiled_mlp = copy.deepcopy(eager)
    for mlp in (eager, compiled_mlp):
        set_training_step(mlp, 3)  # past the warm-up: the 2:4 modes run sparse
    # As SparsityCallback does at on_train_begin: created inside the compiled forward, the
    # stat tensor would be a module-attribute mutation and cost a recompile at the next call.
    ensure_activation_stats(compiled_mlp)
    compiled = torch.compile(compiled_mlp, backend=backend, fullgraph=True)  # any graph break raises

    x = torch.randn(2, 16, 32)
    grad_out = torch.randn(2, 16, 32)
    results = []
    for module in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(grad_out)
        grads = [xi.grad] + [p.grad for p in module.parameters()]
        results.append((y.detach(), grads))
    tol = {} if backend == "inductor" else dict(rtol=0, atol=0)
    torch.testing.assert_close(results[1][0], results[0][0], **tol)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, **tol)
    # Element counts, the non-finite guard and the device-side step are exact in both.
    assert torch.equal(compiled_mlp.activation_stats, eager.activation_stats)

    # A new input of the same shape and a new step reuse the graph (no per-step guard) ...
    set_training_step(compiled_mlp, 4)
    compiled(torch.randn(2, 16, 32, requires_grad=True)).sum().backward()
    assert _unique_graphs() == 1
    # ... and the compiled step waits for the device nowhere.
    xs = torch.randn(2, 16, 32, requires_grad=True)
    assert host_sync_calls(monkeypatch, lambda: compiled(xs).sum().backward()) == []


# --- (b) the Trainer with torch_compile=True -----------------------------------------------


class _Recorder(TrainerCallback):
    """Graphs compiled so far and each MLP's counted elements, at the end of every step
    (before on_log resets the telemetry window)."""

    def __init__(self):
        self.graphs, self.counted = {}, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.graphs[state.global_step] = _unique_graphs()
        mlps = [m for m in model.modules() if isinstance(m, SparseLlamaMLP)]
        if all(m.activation_stats is not None for m in mlps):
            self.counted[state.global_step] = [m.activation_stats[STAT_TOTAL].item() for m in mlps]


def _train(tmp_path, config, compile_backend=None, **extra_args):
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(config)
    recorder = _Recorder()
    if compile_backend:
        extra_args.update(torch_compile=True, torch_compile_backend=compile_backend)
    args = tiny_training_args(tmp_path / ("compiled" if compile_backend else "eager"), **extra_args)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64), callbacks=[SparsityCallback(), recorder])
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    return rows, recorder


# silu alone; the 2:4 modes also cover their dense warm-up (plain relu2 / low-rank relu2 MLP)
# and the switch to sparse; the low-rank run adds gradient checkpointing.
@pytest.mark.parametrize("mode,checkpointing", [("silu", False), ("relu2_2by4", False), ("lowrank_2by4", True)])
def test_trainer_torch_compile_matches_eager(tmp_path, mode, checkpointing):
    warmup = 2
    config = tiny_config(activation_dense_warmup_steps=warmup, **MODES[mode])
    extra = dict(activation_checkpointing=True) if checkpointing else {}
    eager_rows, eager_rec = _train(tmp_path, config, **extra)
    rows, rec = _train(tmp_path, config, compile_backend=BACKEND, **extra)

    assert [r["step"] for r in rows] == [r["step"] for r in eager_rows] == [1, 2, 3, 4]
    for got, want in zip(rows, eager_rows):
        assert got["loss"] == pytest.approx(want["loss"], rel=LOSS_RTOL), got["step"]
        telemetry = {k: v for k, v in want.items() if k.startswith(TELEMETRY_PREFIXES)}
        assert telemetry and {k: got.get(k) for k in telemetry} == telemetry, got["step"]
    if config.activation_2by4:
        assert any(k.startswith("sparsity_24/") for k in rows[-1])

    # One graph for the whole model (no graph break), compiled at the first step; the 2:4
    # modes add exactly one at the dense->sparse switch, and nothing recompiles per step.
    switch = 1 if config.activation_2by4 else 0
    assert rec.graphs == {s: 1 + (switch if s > warmup else 0) for s in range(1, 5)}

    # Every element counted once per training forward, with checkpointing too.
    if config.squ_relu != "silu":
        tokens = 4 * 16
        expected = [float(tokens * config.ffn_width)] * config.num_hidden_layers
        assert rec.counted == eager_rec.counted == {s: expected for s in range(1, 5)}


def test_compiled_reentrant_checkpointing_counts_once():
    """The recompute of a reentrant checkpoint (not the Trainer's default) is not counted
    either, though the compiled forward cannot ask autograd whether it runs in backward:
    dynamo traces the checkpoint into the one graph, so the recompute is part of the
    compiled backward, which carries no stat updates."""
    # use_cache=False as the Trainer sets it: Llama's warning about the cache under
    # checkpointing is a graph break of its own.
    config = tiny_config(activation_2by4=True, activation_dense_warmup_steps=0, use_cache=False)
    model = SparseLlamaForCausalLM(config).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    set_training_step(model, 1)
    ensure_activation_stats(model)
    ids = torch.randint(0, 128, (2, 16))
    torch.compile(model, backend=BACKEND)(ids, labels=ids).loss.backward()
    counted = [layer.mlp.activation_stats[STAT_TOTAL].item() for layer in model.model.layers]
    assert counted == [float(ids.numel() * config.ffn_width)] * config.num_hidden_layers
    assert _unique_graphs() == 1


def test_run_json_accepts_torch_compile(tmp_path):
    """`"torch_compile": true` in the run JSON reaches TrainingArguments (the Trainer compiles)."""
    import json

    from hf_sparse.training.config.run_config import parse_run_config

    path = tmp_path / "run.json"
    path.write_text(
        json.dumps(
            {
                "model_config": os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "llama_tiny.json"),
                "squ_relu": "relu2",
                "activation_2by4": True,
                "output_dir": str(tmp_path / "run"),
                "max_length": 32,
                "torch_compile": True,
                "report_to": [],
            }
        )
    )
    args = parse_run_config([str(path)]).training_args
    assert args.torch_compile and args.torch_compile_backend == "inductor"
