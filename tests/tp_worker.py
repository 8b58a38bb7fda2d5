"""Run by test_tensor_parallel under `torchrun --nproc_per_node 2` (CPU/gloo): for each mode,
a tiny float64 sparse_llama saved by rank 0 is loaded twice in every rank, whole and with
`DistributedConfig(tp_plan="auto")`, and the two are compared: logits, greedy generation,
the training loss, every gradient (gathered from its shards; its layout must be its
parameter's) and the pooled telemetry. Then the 2:4 op alone, sharded by hand, against the
same op unsharded for every method × backward × permutation (plain GEMMs, and the emulated
cuSPARSELt path), and the refusals (weight 2:4; an FFN width whose per-rank slices would
split 2:4 groups). Rank 0 writes the verdicts as JSON."""

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from transformers import DistributedConfig
from transformers.utils import logging as transformers_logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_sparse import SparseLlamaForCausalLM, set_training_step, sparsity_metrics  # noqa: E402
from hf_sparse.model.sparse_ffn import BACKWARD_MODES, SPARSE_METHODS, make_token_permutation  # noqa: E402
from tests.conftest import host_sync_calls, tiny_config  # noqa: E402

TWO_BY_FOUR = dict(squ_relu="relu2", activation_2by4=True, activation_dense_warmup_steps=0)
LOW_RANK = dict(loro_scope="all", loro_attn_rank=4, loro_mlp_rank=4)
# Every recipe is split-invariant: 2:4 groups lie along the FFN width and stay on one rank,
# split_gemm ranks the features of all ranks, MVUE draws by global group index. The models
# run the defaults (naive, split_gemm, permuted) and MVUE; the op checks cover the rest.
MODES = {
    "silu": dict(squ_relu="silu"),
    "relu2": dict(squ_relu="relu2"),
    "relu2_2by4": dict(TWO_BY_FOUR),
    "relu2_2by4_mvue": dict(TWO_BY_FOUR, activation_sparse_method="mvue"),
    "low_rank_silu": dict(LOW_RANK, squ_relu="silu"),
    "low_rank_relu2_2by4": dict(LOW_RANK, **TWO_BY_FOUR, activation_sparse_method="mvue"),
}
REFUSED = {
    "weight_2by4": dict(squ_relu="relu2", weight_2by4=True),
    # 36 features over 2 ranks: slices of 18, not a multiple of 4.
    "misaligned_2by4": dict(TWO_BY_FOUR, nongated_intermediate_size=36),
}


def _save(directory, overrides):
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        SparseLlamaForCausalLM(tiny_config(**overrides)).double().save_pretrained(directory)
    dist.barrier()


def _seeded(fn, *args, **kwargs):
    # MVUE draws one key per call from the global RNG: the sharded and the whole model must
    # start each compared computation from the same RNG state (as TP ranks do in training).
    torch.manual_seed(7)
    return fn(*args, **kwargs)


def _max_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _check_mode(directory, overrides):
    _save(directory, overrides)
    reference = SparseLlamaForCausalLM.from_pretrained(directory, dtype=torch.float64)
    model = SparseLlamaForCausalLM.from_pretrained(
        directory, dtype=torch.float64, distributed_config=DistributedConfig(tp_plan="auto")
    )
    ids = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    result = {
        "sharded": sorted(n for n, p in model.named_parameters() if hasattr(p, "placements")),
        "plan": sorted(model.tp_plan.items()),
    }

    with torch.no_grad():
        result["logits_error"] = _max_error(_seeded(model, ids).logits, _seeded(reference, ids).logits)
    generate = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected_tokens = _seeded(reference.generate, ids, **generate)
    result["generate_equal"] = torch.equal(_seeded(model.generate, ids, **generate), expected_tokens)
    result["generate_static_equal"] = torch.equal(
        _seeded(model.generate, ids, cache_implementation="static", **generate), expected_tokens
    )

    for m in (model, reference):
        m.train()
        set_training_step(m, 1)
    loss = _seeded(model, ids, labels=ids).loss
    expected_loss = _seeded(reference, ids, labels=ids).loss
    loss.backward()
    expected_loss.backward()
    result["loss_error"] = abs(loss.item() - expected_loss.item())
    reference_params = dict(reference.named_parameters())
    grad_errors, bad_layouts = {}, []
    for name, param in model.named_parameters():
        grad = param.grad
        if getattr(grad, "placements", None) != getattr(param, "placements", None):
            bad_layouts.append(
                f"{name}: param {getattr(param, 'placements', None)}, grad {getattr(grad, 'placements', None)}"
            )
        full = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        grad_errors[name] = _max_error(full, reference_params[name].grad)
    result["grad_errors"] = grad_errors
    result["bad_grad_layouts"] = bad_layouts
    # Both ranks ran the same batch: the reference's pooled counts are twice one model's,
    # the TP model's are each rank's own features, summed.
    result["telemetry"] = sparsity_metrics(model)
    result["expected_telemetry"] = sparsity_metrics(reference)
    return result


def _op_inputs(t, d, f):
    """Float64 op inputs where the densest features crowd into rank 0's half (so the ranks
    keep different numbers of dense features) and many counts tie across the boundary."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(t, d, generator=g, dtype=torch.float64)
    x[:, 0] = 1.0
    w_up = torch.randn(f, d, generator=g, dtype=torch.float64) / d**0.5
    w_up[:, 0] = torch.linspace(1.5, -1.5, f, dtype=torch.float64)  # feature j positive less often as j grows
    w_down = torch.randn(d, f, generator=g, dtype=torch.float64) / f**0.5
    dy = torch.randn(t, d, generator=g, dtype=torch.float64)
    return x, w_up, w_down, dy


def _op_grads(x, w_up, w_down, dy, mesh=None, **kw):
    """(y, dx, dw_up, dw_down) of the op; with ``mesh`` the weights are sharded as
    tp_plan="auto" shards them and the weight gradients gathered."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from hf_sparse.model.sparse_ffn import relu2_2to4_ffn

    x = x.clone().requires_grad_()
    if mesh is not None:
        w_up, w_down = distribute_tensor(w_up, mesh, [Shard(0)]), distribute_tensor(w_down, mesh, [Shard(1)])
    w_up, w_down = w_up.detach().requires_grad_(), w_down.detach().requires_grad_()
    torch.manual_seed(11)  # MVUE's key: every rank and the reference draw the same
    y = relu2_2to4_ffn(x, w_up, w_down, **kw)
    y.backward(dy)
    grads = [w.grad.full_tensor() if hasattr(w.grad, "full_tensor") else w.grad for w in (w_up, w_down)]
    return [y.detach(), x.grad, *grads]


def _check_ops():
    """The op sharded on 2 ranks against the same op unsharded, for every method × backward ×
    permutation: max relative error of (y, dx, dW_up, dW_down). Not bitwise: GEMMs over a
    slice of the width round differently in the last bit; the recipe itself is the same."""
    import pytest
    from torch.distributed.device_mesh import init_device_mesh

    from tests.cslt_emulator import install

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    # T = 30: a partial last token group. dense_features 0.25 (16 of 64, unevenly split) and
    # 0.75 (48: more than a rank's 32, every local feature a candidate).
    x, w_up, w_down, dy = _op_inputs(30, 16, 64)
    perm = make_token_permutation(30, seed=5)
    cases = [(m, b, p, 0.25) for m in SPARSE_METHODS for b in BACKWARD_MODES for p in (False, True)]
    cases += [("mvue", "split_gemm", True, 0.75), ("naive", "split_gemm", False, 0.75)]
    for method, backward, permute, dense in cases:
        kw = dict(method=method, backward=backward, dense_features=dense, permutation=perm if permute else None)
        expected, got = _op_grads(x, w_up, w_down, dy, **kw), _op_grads(x, w_up, w_down, dy, mesh, **kw)
        results[f"plain/{method}/{backward}/{'perm' if permute else 'noperm'}/{dense}"] = {
            "errors": [_max_error(a, b) for a, b in zip(got, expected)],
        }
    # The cuSPARSELt path (emulated, float64 allowed): T, d and each rank's 32 features aligned.
    monkeypatch = pytest.MonkeyPatch()
    try:
        install(monkeypatch, allow_wide_dtypes=True)
        x, w_up, w_down, dy = _op_inputs(32, 16, 64)
        perm = make_token_permutation(32, seed=5)
        for method, dense in (("naive", 0.05), ("mvue", 0.25), ("naive", 0.75)):
            kw = dict(method=method, backward="split_gemm", dense_features=dense, permutation=perm)
            expected, got = _op_grads(x, w_up, w_down, dy, **kw), _op_grads(x, w_up, w_down, dy, mesh, **kw)
            results[f"cusparselt/{method}/split_gemm/perm/{dense}"] = {
                "errors": [_max_error(a, b) for a, b in zip(got, expected)],
            }
    finally:
        monkeypatch.undo()
    # No host sync on the tensor-parallel path either (the gather stays on device).
    x, w_up, w_down, dy = _op_inputs(32, 16, 64)
    kw = dict(method="mvue", backward="split_gemm", permutation=make_token_permutation(32, seed=5))
    results["host_syncs"] = host_sync_calls(pytest.MonkeyPatch(), lambda: _op_grads(x, w_up, w_down, dy, mesh, **kw))
    return results


def _check_refused(directory, overrides):
    _save(directory, overrides)
    try:
        SparseLlamaForCausalLM.from_pretrained(directory, distributed_config=DistributedConfig(tp_plan="auto"))
    except ValueError as error:
        return str(error)
    return None


def _check_op_refuses_straddling_groups():
    """The op's own guard, for weights sharded by other means than from_pretrained."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hf_sparse.model.sparse_ffn import relu2_2to4_ffn

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)  # distribute_tensor needs the same full tensor on every rank
    w_up = distribute_tensor(torch.randn(36, 8), mesh, [Shard(0)])
    w_down = distribute_tensor(torch.randn(8, 36), mesh, [Shard(1)])
    try:
        relu2_2to4_ffn(torch.randn(5, 8), w_up, w_down)
    except ValueError as error:
        return str(error)
    return None


def main(out_path, work_dir):
    dist.init_process_group("gloo")
    transformers_logging.set_verbosity_error()
    results, refused = {}, {}
    for mode, overrides in MODES.items():
        try:
            results[mode] = _check_mode(os.path.join(work_dir, mode), overrides)
        except Exception:  # noqa: BLE001 - reported per mode, the other modes still run
            results[mode] = {"error": traceback.format_exc()}
            print(results[mode]["error"], file=sys.stderr)
    for name, overrides in REFUSED.items():
        refused[name] = _check_refused(os.path.join(work_dir, name), overrides)
    refused["op_straddling_groups"] = _check_op_refuses_straddling_groups()
    try:
        ops = _check_ops()
    except Exception:  # noqa: BLE001 - reported, the rest of the verdicts still get written
        ops = {"error": traceback.format_exc()}
        print(ops["error"], file=sys.stderr)
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump({"modes": results, "refused": refused, "ops": ops}, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from tests.dist_exit import run_then_exit

    run_then_exit(main, sys.argv[1], sys.argv[2])
