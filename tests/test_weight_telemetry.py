"""Telemetry of 2:4 weights: `weight_sparsity` of the weight the forward uses, mask flip
rates, their trip to every backend and the report's flip-rate curve.

References are computed here independently of hf_sparse: keep masks from a stable sort of
|w| in each group of 4 along the input dim, S-STE values by soft thresholding.
"""

import glob
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState

from hf_sparse import SparseLlamaForCausalLM, SparsityCallback, set_training_step, sparsity_metrics
from hf_sparse.report import FLIP_RATE_NAME, write_report
from hf_sparse.training.callbacks.telemetry import PREVIOUS_MASKS_ATTR, snapshot_weight_masks
from tests.conftest import callback_training_step, host_sync_calls, tiny_config, tiny_training_args
from tests.test_telemetry import RandomTokens

LOW_RANK_MLP = dict(loro_scope="mlp", loro_mlp_rank=8)
# Module path inside a decoder layer -> contract name.
MATRICES = {
    "self_attn.q_proj": "attn_q_proj",
    "self_attn.k_proj": "attn_k_proj",
    "self_attn.v_proj": "attn_v_proj",
    "self_attn.o_proj": "attn_o_proj",
    "mlp.up_proj": "mlp_up_proj",
    "mlp.down_proj": "mlp_down_proj",
}


def _keep_mask(w):
    """Top-2 |w| of every 4 consecutive entries along dim 1 (ties to the lower index)."""
    groups = w.reshape(w.shape[0], -1, 4).abs()
    top2 = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True).reshape(w.shape)


def _effective(w, method, scale):
    """scale·S(w) along dim 1: S-STE shrinks |w| by the group's third largest |w|."""
    if method == "ste":
        return w * _keep_mask(w) * scale
    groups = w.reshape(w.shape[0], -1, 4)
    third = torch.sort(groups.abs(), dim=-1, descending=True).values[..., 2:3]
    return (torch.sign(groups) * (groups.abs() - third).clamp(min=0)).reshape(w.shape) * scale


def _factors(linear):
    """(metric suffix, out x in view of the factor, its scale buffer) of a 2:4 linear."""
    if hasattr(linear, "weight_in"):
        # x -> x·weight_in: 2:4 along `in`, i.e. along dim 1 of weight_inᵀ.
        return [
            ("_in", linear.weight_in.detach().t(), linear.weight_in_2by4_scale),
            ("_out", linear.weight_out.detach(), linear.weight_out_2by4_scale),
        ]
    return [("", linear.weight.detach(), linear.weight_2by4_scale)]


def _sparse_linears(model):
    """("layer_i/<matrix>", linear) of every 2:4-weight decoder linear."""
    for i, layer in enumerate(model.model.layers):
        for path, name in MATRICES.items():
            linear = layer.get_submodule(path)
            if hasattr(linear, "weight_masks"):
                yield f"layer_{i}/{name}", linear


def _reference_masks(model):
    return {
        key + suffix: _keep_mask(w).clone()
        for key, linear in _sparse_linears(model)
        for suffix, w, _ in _factors(linear)
    }


def _reference_flips(before, after):
    """Per-matrix flip rates and the mean / max / total a log row should carry."""
    rates = {f"flip_rate/{k}": (before[k] != after[k]).sum().item() / before[k].numel() for k in before}
    changed = sum((before[k] != after[k]).sum().item() for k in before)
    rates["flip_rate/mean"] = sum(rates.values()) / len(before)
    rates["flip_rate/max"] = max(rates[f"flip_rate/{k}"] for k in before)
    rates["flip_rate/total"] = changed / sum(m.numel() for m in before.values())
    return rates


def _train_step(model, optimizer, seed):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# --- weight_sparsity is that of the forward's weight ----------------------------------------


@pytest.mark.parametrize("method", ["s_ste", "ste"])
def test_weight_sparsity_is_the_zero_fraction_of_the_forward_weight(method):
    model = SparseLlamaForCausalLM(tiny_config(weight_2by4=True, weight_sparse_method=method)).train()
    layer0 = model.model.layers[0]
    with torch.no_grad():
        layer0.mlp.up_proj.weight[0] = 0  # whole groups of zeros: 4 of 4 zero, not 2
        # A tie between the 2nd and 3rd largest |w|: S-STE shrinks the 2nd to 0 (3 zeros).
        layer0.mlp.down_proj.weight[3, 4:8] = torch.tensor([0.3, -0.2, 0.2, 0.1])
        model.model.layers[1].self_attn.k_proj.weight[:, :8] = 0  # an untouched dense matrix
    ids = torch.randint(0, 128, (2, 16))
    model(ids, labels=ids).loss.backward()  # the first sparse forward fixes the scales
    metrics = sparsity_metrics(model)

    for key, linear in _sparse_linears(model):
        ((_, w, scale),) = _factors(linear)
        effective = _effective(w, method, scale)
        # The reference really is what the forward multiplies by ...
        x = torch.randn(3, w.shape[1])
        torch.testing.assert_close(linear(x), F.linear(x, effective))
        # ... and the metric is its exact zero count over its size.
        expected = (effective == 0).sum().item() / effective.numel()
        assert metrics[f"weight_sparsity/{key}"] == expected, key
    assert metrics["weight_sparsity/layer_1/mlp_up_proj"] == 0.5  # random weights: exactly 2 of 4
    # The zeroed row's groups keep 2 more zeros each: 16 more of 32 in that row.
    out_features, in_features = layer0.mlp.up_proj.weight.shape
    assert metrics["weight_sparsity/layer_0/mlp_up_proj"] == 0.5 + 0.5 / out_features
    extra = 1 if method == "s_ste" else 0
    assert metrics["weight_sparsity/layer_0/mlp_down_proj"] == 0.5 + extra / layer0.mlp.down_proj.weight.numel()
    # Dense matrices keep the stored-weight semantics.
    assert metrics["weight_sparsity/layer_1/attn_k_proj"] == 0.25
    assert metrics["weight_sparsity/layer_0/attn_k_proj"] == 0.0


def test_dense_phases_report_the_dense_master():
    """Before `weight_2by4_start_step` and in the dense tail the forward uses the master."""
    config = tiny_config(weight_2by4=True, weight_2by4_start_step=2, sparse_dense_finetune_steps=3)
    model = SparseLlamaForCausalLM(config).train()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :8] = 0  # 2 of 8 groups per row all zero
    key = "weight_sparsity/layer_0/mlp_up_proj"
    for step, expected in ((0, 0.25), (2, (2 * 4 + 6 * 2) / 32), (7, 0.25)):
        set_training_step(model, step, 10)
        assert sparsity_metrics(model)[key] == expected, step


def test_low_rank_factors_report_in_and_out():
    config = tiny_config(weight_2by4=True, weight_2by4_scope="all", **LOW_RANK_MLP)
    model = SparseLlamaForCausalLM(config).train()
    with torch.no_grad():
        # weight_in is in x r, 2:4 along `in`: zeroing 4 rows empties one group per column.
        model.model.layers[0].mlp.up_proj.weight_in[:4] = 0
    ids = torch.randint(0, 128, (2, 16))
    model(ids, labels=ids).loss.backward()
    metrics = sparsity_metrics(model)

    seen = set()
    for key, linear in _sparse_linears(model):
        factors = _factors(linear)
        effective = [_effective(w, "s_ste", scale) for _, w, scale in factors]
        x = torch.randn(3, factors[0][1].shape[1])
        y = x
        for weight in effective:  # x·W_inᵀ... then ·W_outᵀ: the forward of either kind
            y = F.linear(y, weight)
        torch.testing.assert_close(linear(x), y)
        for (suffix, _, _), weight in zip(factors, effective):
            name = f"weight_sparsity/{key}{suffix}"
            assert metrics[name] == (weight == 0).sum().item() / weight.numel(), name
            seen.add(name)
    assert "weight_sparsity/layer_1/mlp_down_proj_in" in seen and "weight_sparsity/layer_1/attn_q_proj" in seen
    assert metrics["weight_sparsity/layer_0/mlp_up_proj_in"] == 0.5 + 2 * 8 / (32 * 8)
    assert metrics["weight_sparsity/layer_1/mlp_up_proj_out"] == 0.5


# --- flip rate ------------------------------------------------------------------------------


@pytest.mark.parametrize("low_rank", [False, True], ids=["full", "low_rank"])
def test_flip_rate_equals_reference_from_saved_masks(low_rank):
    config = tiny_config(weight_2by4=True, **(LOW_RANK_MLP if low_rank else {}))
    model = SparseLlamaForCausalLM(config).train()
    # No stored mask yet: nothing to compare with, this read only sets the baseline.
    assert not any(k.startswith("flip_rate/") for k in sparsity_metrics(model, flip_rate=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # steps of ~lr: many flips

    before = _reference_masks(model)
    for seed in (1, 2):
        _train_step(model, optimizer, seed)
    after = _reference_masks(model)
    metrics = sparsity_metrics(model, flip_rate=True)
    expected = _reference_flips(before, after)
    assert {k for k in metrics if k.startswith("flip_rate/")} == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-15), key
    assert 0.01 < metrics["flip_rate/total"] < 0.5
    assert metrics["flip_rate/max"] > metrics["flip_rate/mean"]
    if low_rank:
        assert "flip_rate/layer_0/mlp_up_proj_in" in metrics and "flip_rate/layer_0/mlp_down_proj_out" in metrics

    # reset=False compares without moving the baseline; reset=True moves it.
    _train_step(model, optimizer, 3)
    later = _reference_masks(model)
    for reset in (False, False, True):
        assert sparsity_metrics(model, flip_rate=True, reset=reset)["flip_rate/total"] == pytest.approx(
            _reference_flips(after, later)["flip_rate/total"], abs=1e-15
        )
    assert sparsity_metrics(model, flip_rate=True)["flip_rate/max"] == 0.0

    # The baseline is bit-packed on device and never part of the state dict.
    linear = model.model.layers[0].mlp.up_proj
    stored = getattr(linear, PREVIOUS_MASKS_ATTR)
    for name, packed in stored.items():
        assert packed.dtype == torch.uint8 and packed.numel() == -(-getattr(linear, name).numel() // 8)
    assert not any("mask" in key or "flip" in key for key in model.state_dict())


def test_sharded_2by4_weight_falls_back_to_the_stored_weight(caplog):
    """What FSDP1 leaves in a module (a flat 1-D shard) has no 2:4 groups: count it as
    stored and skip its flip rate, without breaking the other matrices."""
    model = SparseLlamaForCausalLM(tiny_config(weight_2by4=True)).train()
    linear = model.model.layers[0].mlp.up_proj
    shard = linear.weight.detach().flatten()[:100].clone()
    shard[:30] = 0
    linear.weight = torch.nn.Parameter(shard)
    snapshot_weight_masks(model)
    with caplog.at_level("WARNING", logger="hf_sparse.training.callbacks.telemetry"):
        metrics = sparsity_metrics(model, flip_rate=True)
    assert metrics["weight_sparsity/layer_0/mlp_up_proj"] == 0.3
    assert "flip_rate/layer_0/mlp_up_proj" not in metrics
    assert metrics["flip_rate/layer_0/mlp_down_proj"] == 0.0
    assert metrics["weight_sparsity/layer_1/mlp_up_proj"] == 0.5


def test_flip_rate_adds_no_host_sync_outside_logging_steps(tmp_path, monkeypatch):
    model = SparseLlamaForCausalLM(tiny_config(weight_2by4=True)).train()
    callback = SparsityCallback(flip_rate=True)
    args, state, control = tiny_training_args(tmp_path), TrainerState(max_steps=4), TrainerControl()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = torch.randint(0, 128, (2, 16))

    def step():
        callback_training_step(callback, args, state, control, model, ids)

    # The train-begin snapshot and a step wait for the device nowhere ...
    assert host_sync_calls(monkeypatch, lambda: callback.on_train_begin(args, state, control, model=model)) == []
    step()  # the first step creates the stat tensors and fixes the scales
    optimizer.step()
    assert host_sync_calls(monkeypatch, step) == []
    optimizer.step()
    # ... and a logging step reads everything, flip counts included, in one transfer.
    logs = {"loss": 1.0}
    assert host_sync_calls(monkeypatch, lambda: callback.on_log(args, state, control, logs=logs, model=model)) == [
        "tolist"
    ]
    assert logs["flip_rate/total"] > 0


# --- a real Trainer, every backend, the report ----------------------------------------------


class _MaskRecorder(TrainerCallback):
    """Reference masks at train begin and at every training log row (runs after
    SparsityCallback, which moves itself first; the weights are the same for both)."""

    def __init__(self):
        self.masks = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.masks.append(_reference_masks(model))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs and "loss" in logs:
            self.masks.append(_reference_masks(model))


def test_flip_rate_reaches_log_history_wandb_tensorboard_and_the_report(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.wandb_offline import wait_for_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "hf_sparse_tests")
    out = tmp_path / "out"
    recorder = _MaskRecorder()
    trainer = Trainer(
        model=SparseLlamaForCausalLM(tiny_config(weight_2by4=True)),
        args=tiny_training_args(out, max_steps=3, per_device_train_batch_size=2, report_to=["wandb", "tensorboard"]),
        train_dataset=RandomTokens(16),
        callbacks=[SparsityCallback(flip_rate=True), recorder],
    )
    trainer.train()

    # log_history: every loss row (the first one too, against the train-begin snapshot).
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3] and len(recorder.masks) == 4
    for row, before, after in zip(rows, recorder.masks, recorder.masks[1:]):
        for key, value in _reference_flips(before, after).items():
            assert row[key] == pytest.approx(value, abs=1e-15), (row["step"], key)
            assert isinstance(row[key], float)
        assert row["weight_sparsity/layer_0/mlp_up_proj"] == pytest.approx(0.5, abs=0.01)
    assert rows[0]["flip_rate/total"] > 0
    flip_keys = sorted(k for k in rows[0] if k.startswith("flip_rate/"))

    import wandb

    run_dir = os.path.dirname(wandb.run.dir)  # wandb keeps the first WANDB_DIR of the process
    wandb.finish()
    logged = wait_for_rows(run_dir, lambda r: "train/loss" in r, expected=3)
    assert [r["train/global_step"] for r in logged] == [1, 2, 3]
    for got, row in zip(logged, rows):
        assert {k: got.get(f"train/{k}") for k in flip_keys} == pytest.approx({k: row[k] for k in flip_keys})

    event_files = glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(os.path.dirname(event_files[0]))
    acc.Reload()
    for key in flip_keys:
        assert [e.step for e in acc.Scalars(f"train/{key}")] == [1, 2, 3], key

    trainer.state.save_to_json(str(out / "trainer_state.json"))
    result = write_report(str(out))
    with open(out / FLIP_RATE_NAME, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"flip rate: last mean {rows[-1]['flip_rate/mean']:.6f}" in result["summary"]


def test_after_a_resume_the_first_flip_rate_is_against_the_restored_weights(tmp_path):
    from safetensors.torch import load_file

    config = tiny_config(weight_2by4=True)
    args = tiny_training_args(tmp_path, max_steps=2, per_device_train_batch_size=2, save_strategy="steps", save_steps=1)
    data = RandomTokens(16)
    Trainer(
        model=SparseLlamaForCausalLM(config),
        args=args,
        train_dataset=data,
        callbacks=[SparsityCallback(flip_rate=True)],
    ).train()

    torch.manual_seed(123)  # a different init: only the restored weights can match
    recorder = _MaskRecorder()
    trainer = Trainer(
        model=SparseLlamaForCausalLM(config),
        args=args,
        train_dataset=data,
        callbacks=[SparsityCallback(flip_rate=True), recorder],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))

    restored = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    assert torch.equal(
        recorder.masks[0]["layer_1/mlp_down_proj"], _keep_mask(restored["model.layers.1.mlp.down_proj.weight"])
    )
    row = [r for r in trainer.state.log_history if "loss" in r][-1]  # step 1's row came with the state
    assert row["step"] == 2 and len(recorder.masks) == 2
    for key, value in _reference_flips(recorder.masks[0], recorder.masks[1]).items():
        assert row[key] == pytest.approx(value, abs=1e-15), key
