"""Sparsity telemetry: exact values, what is (not) counted, and the trip to every backend."""

import glob
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_sparse import SparseLlamaForCausalLM, SparsityCallback, sparsity_metrics
from hf_sparse.model.modeling_sparse_llama import set_training_step
from tests.conftest import tiny_config
from tests import processes  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seq_len=16, vocab=128, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _mlp_inputs(model, ids):
    """The input of every layer's MLP for `ids` (captured with hooks, eval mode)."""
    captured, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        hooks.append(
            layer.mlp.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, args[0].detach()))
        )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(ids)
    model.train(was_training)
    for h in hooks:
        h.remove()
    return captured


def _expected_relu2_zero_fraction(mlp, x):
    act = torch.relu(x @ mlp.up_proj.weight.detach().T) ** 2
    return (act == 0).double().mean().item()


def test_activation_sparsity_equals_hand_computation():
    model = SparseLlamaForCausalLM(tiny_config(squ_relu="relu2")).train()
    ids = torch.randint(0, 128, (3, 16))
    inputs = _mlp_inputs(model, ids)
    expected = [_expected_relu2_zero_fraction(layer.mlp, inputs[i]) for i, layer in enumerate(model.model.layers)]
    assert 0.2 < expected[0] < 0.8  # a meaningful fraction, not a degenerate 0 or 1

    model(ids, labels=ids).loss.backward()
    metrics = sparsity_metrics(model)
    for i, value in enumerate(expected):
        assert metrics[f"sparsity_relu/layer_{i}"] == pytest.approx(value, abs=1e-12)
    assert metrics["sparsity_relu/mean_across_layers"] == pytest.approx(sum(expected) / len(expected))
    # reset=True started a new window: nothing counted since.
    assert not any(k.startswith("sparsity_relu") for k in sparsity_metrics(model))


def test_eval_forwards_are_not_counted():
    model = SparseLlamaForCausalLM(tiny_config(squ_relu="relu2")).train()
    ids = torch.randint(0, 128, (2, 16))
    model(ids)
    before = sparsity_metrics(model, reset=False)
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 128, (4, 16)))
    model.train()
    assert sparsity_metrics(model, reset=False) == before


def test_element_weighted_over_micro_batches():
    model = SparseLlamaForCausalLM(tiny_config(squ_relu="relu2")).train()
    small, large = torch.randint(0, 128, (1, 8)), torch.randint(0, 128, (4, 16))
    fractions = []
    for ids in (small, large):
        inputs = _mlp_inputs(model, ids)
        fractions.append((_expected_relu2_zero_fraction(model.model.layers[0].mlp, inputs[0]), ids.numel()))
        model(ids)
    pooled = sum(f * n for f, n in fractions) / sum(n for _, n in fractions)
    assert sparsity_metrics(model)["sparsity_relu/layer_0"] == pytest.approx(pooled, abs=1e-12)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_once(reentrant):
    ids = torch.randint(0, 128, (2, 16))
    values = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SparseLlamaForCausalLM(tiny_config(squ_relu="relu2")).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(ids, labels=ids).loss.backward()
        # A recount would leave the fraction unchanged, so check the element count itself.
        counted = [mlp.activation_stats[1].item() for mlp in (layer.mlp for layer in model.model.layers)]
        assert counted == [ids.numel() * model.config.ffn_width] * model.config.num_hidden_layers
        values.append(sparsity_metrics(model))
    assert values[0] == values[1]


def test_second_model_does_not_shift_layer_numbers():
    first = SparseLlamaForCausalLM(tiny_config(squ_relu="relu2", num_hidden_layers=3)).train()
    second = SparseLlamaForCausalLM(tiny_config(squ_relu="relu2", num_hidden_layers=2)).train()
    ids = torch.randint(0, 128, (2, 16))
    first(ids)
    second(ids)
    first(ids)
    assert sorted(k for k in sparsity_metrics(second) if k.startswith("sparsity_relu/layer")) == [
        "sparsity_relu/layer_0",
        "sparsity_relu/layer_1",
    ]
    assert sorted(k for k in sparsity_metrics(first) if k.startswith("sparsity_relu/layer")) == [
        "sparsity_relu/layer_0",
        "sparsity_relu/layer_1",
        "sparsity_relu/layer_2",
    ]


def test_stats_stay_out_of_checkpoints_and_start_at_zero(tmp_path):
    model = SparseLlamaForCausalLM(tiny_config(activation_2by4=True, activation_dense_warmup_steps=0)).train()
    set_training_step(model, 1)
    ids = torch.randint(0, 128, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert "sparsity_relu/layer_0" in sparsity_metrics(model, reset=False)  # counted something
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not any("stat" in key or "perm" in key for key in saved)
    loaded = SparseLlamaForCausalLM.from_pretrained(tmp_path)
    metrics = sparsity_metrics(loaded)
    assert not any(key.startswith(("sparsity_relu", "sparsity_24")) for key in metrics)  # an empty window
    assert all(
        m.activation_stats is None or not m.activation_stats.any() for m in (layer.mlp for layer in loaded.model.layers)
    )


def test_weight_sparsity_per_matrix():
    model = SparseLlamaForCausalLM(tiny_config(squ_relu="relu2"))
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[:, :8] = 0  # 8 of 32 input columns
    metrics = sparsity_metrics(model)
    assert metrics["weight_sparsity/layer_1/attn_k_proj"] == pytest.approx(0.25)
    assert metrics["weight_sparsity/layer_0/attn_k_proj"] == 0.0
    assert "weight_sparsity/layer_0/mlp_gate_proj" not in metrics
    silu = sparsity_metrics(SparseLlamaForCausalLM(tiny_config(squ_relu="silu")))
    assert "weight_sparsity/layer_0/mlp_gate_proj" in silu
    assert not any(k.startswith("sparsity_relu") for k in silu)


def test_2by4_drop_fraction_during_warmup_is_would_drop():
    model = SparseLlamaForCausalLM(
        tiny_config(squ_relu="relu2", activation_2by4=True, activation_dense_warmup_steps=10)
    ).train()
    set_training_step(model, 0)
    ids = torch.randint(0, 128, (2, 16))
    inputs = _mlp_inputs(model, ids)
    model(ids)
    metrics = sparsity_metrics(model)
    act = torch.relu(inputs[0] @ model.model.layers[0].mlp.up_proj.weight.detach().T) ** 2
    groups = act.reshape(-1, 4)
    nonzero_per_group = (groups != 0).sum(-1)
    dropped = (nonzero_per_group - 2).clamp(min=0).sum().item()
    assert metrics["sparsity_24/layer_0"] == pytest.approx(dropped / (groups != 0).sum().item())
    assert metrics["sparsity_24/layer_0"] > 0


def _dropped_fraction_by_hand(mlp_inputs, model):
    """Per layer: non-zeros of relu(x W_upᵀ)² that a 2:4 mask drops / all non-zeros."""
    fractions = []
    for i, layer in enumerate(model.model.layers):
        act = torch.relu(mlp_inputs[i] @ layer.mlp.up_proj.weight.detach().T) ** 2
        nonzero_per_group = (act.reshape(-1, 4) != 0).sum(-1)
        dropped = (nonzero_per_group - 2).clamp(min=0).sum().item()
        fractions.append(dropped / nonzero_per_group.sum().item())
    return fractions


def test_2by4_drop_fraction_is_per_logging_window():
    """Each read of `sparsity_24/*` covers only the forwards since the previous read: the
    dropped count is reset with the zero and element counts (window 1 in the dense warm-up,
    window 2 sparse, as a Trainer logs across the switch)."""
    model = SparseLlamaForCausalLM(
        tiny_config(squ_relu="relu2", activation_2by4=True, activation_dense_warmup_steps=1)
    ).train()
    captured = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, args[0].detach()))

    windows = []
    for step, batch in ((0, (4, 16)), (1, (1, 8))):  # very different sizes: pooling would show
        set_training_step(model, step)
        ids = torch.randint(0, 128, batch)
        model(ids, labels=ids).loss.backward()
        expected = _dropped_fraction_by_hand(captured, model)
        windows.append((sparsity_metrics(model, reset=True), expected))

    for metrics, expected in windows:
        for i, value in enumerate(expected):
            assert metrics[f"sparsity_24/layer_{i}"] == pytest.approx(value, abs=1e-12)
        assert metrics["sparsity_24/mean_across_layers"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    # The two windows really differ, so a carried-over count could not pass unnoticed.
    assert windows[0][1] != windows[1][1]


# --- a real Trainer, every backend ---------------------------------------------------------


def _train(tmp_path, callbacks_how, config, report_to=("wandb", "tensorboard"), **args):
    model = SparseLlamaForCausalLM(config)
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=3,
        logging_first_step=True,
        report_to=list(report_to),
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        **args,
    )
    callback = SparsityCallback()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=RandomTokens(32, vocab=config.vocab_size),
        callbacks=[callback] if callbacks_how == "init" else None,
    )
    if callbacks_how == "add":
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def _expected_keys(config):
    keys = [f"sparsity_relu/layer_{i}" for i in range(config.num_hidden_layers)]
    keys.append("sparsity_relu/mean_across_layers")
    if config.activation_2by4:
        for family in ("sparsity_24", "sparsity_nm/4:8", "sparsity_nm/8:16"):  # N:M: on by default with 2:4
            keys += [f"{family}/layer_{i}" for i in range(config.num_hidden_layers)]
            keys.append(f"{family}/mean_across_layers")
    for i in range(config.num_hidden_layers):
        for name in ("attn_q_proj", "attn_k_proj", "attn_v_proj", "attn_o_proj", "mlp_up_proj", "mlp_down_proj"):
            keys.append(f"weight_sparsity/layer_{i}/{name}")
    return keys


@pytest.mark.parametrize("two_by_four", [False, True])
def test_metrics_reach_wandb_tensorboard_and_log_history(tmp_path, monkeypatch, two_by_four):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.wandb_offline import wait_for_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "hf_sparse_tests")
    config = tiny_config(squ_relu="relu2", activation_2by4=two_by_four, activation_dense_warmup_steps=1)
    trainer = _train(tmp_path, "init", config)
    keys = _expected_keys(config)

    # trainer_state log_history: same row as the loss, at steps 1 and 3.
    train_rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in train_rows] == [1, 3]
    for row in train_rows:
        missing = [k for k in keys if k not in row]
        assert not missing, missing
        assert all(isinstance(row[k], float) for k in keys)

    # wandb: parse the offline .wandb file (finish() flushes the writer service).
    import wandb

    assert wandb.run is not None, "the Trainer's wandb integration did not start a run"
    # wandb's process-wide settings keep the first WANDB_DIR, so ask the run where it writes.
    run_dir = os.path.dirname(wandb.run.dir)
    wandb.finish()
    rows = wait_for_rows(run_dir, lambda r: "train/loss" in r, expected=2)
    assert [r["train/global_step"] for r in rows] == [1, 3]
    for row in rows:
        missing = [k for k in keys if f"train/{k}" not in row]
        assert not missing, missing
    assert rows[-1]["train/sparsity_relu/layer_0"] == pytest.approx(train_rows[-1]["sparsity_relu/layer_0"])

    # TensorBoard: every key has scalars at the same steps as train/loss.
    event_files = glob.glob(str(tmp_path / "out" / "**" / "events.out.tfevents.*"), recursive=True)
    assert event_files
    acc = EventAccumulator(os.path.dirname(event_files[0]))
    acc.Reload()
    loss_steps = [e.step for e in acc.Scalars("train/loss")]
    assert loss_steps == [1, 3]
    for key in keys:
        assert [e.step for e in acc.Scalars(f"train/{key}")] == loss_steps, key


@pytest.mark.parametrize("how", ["init", "add"])
def test_callback_attached_any_documented_way_reaches_backends(tmp_path, how):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(squ_relu="relu2")
    _train(tmp_path, how, config, report_to=("tensorboard",))
    event_files = glob.glob(str(tmp_path / "out" / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(os.path.dirname(event_files[0]))
    acc.Reload()
    assert "train/sparsity_relu/layer_1" in acc.Tags()["scalars"]


def test_callback_behind_a_reporting_integration_fails_loudly(tmp_path):
    """If it cannot run before the integrations, it raises instead of logging to the console only."""
    from transformers.integrations import TensorBoardCallback

    config = tiny_config(squ_relu="relu2")
    trainer = Trainer(
        model=SparseLlamaForCausalLM(config),
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, logging_steps=1, report_to=[], use_cpu=True),
        train_dataset=RandomTokens(8),
    )
    callback = SparsityCallback()
    # Bypass the handler-driven reordering: put it behind TensorBoard after training began.
    trainer.callback_handler.callbacks.append(TensorBoardCallback())
    trainer.callback_handler.callbacks.append(callback)
    with pytest.raises(RuntimeError, match="before the reporting integrations"):
        trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, {"loss": 1.0})


def test_metric_callbacks_run_before_the_reporting_integrations(tmp_path):
    """LORO metrics are added in on_log too: they must reach TensorBoard/wandb."""
    from transformers.integrations import TensorBoardCallback

    from hf_sparse.training.loro import LoroCallback

    args = TrainingArguments(output_dir=str(tmp_path), report_to=["tensorboard"], use_cpu=True, max_steps=1)
    ours = [SparsityCallback(), LoroCallback()]
    trainer = Trainer(
        model=SparseLlamaForCausalLM(tiny_config()), args=args, train_dataset=RandomTokens(4), callbacks=ours
    )
    order = trainer.callback_handler.callbacks
    board = next(i for i, cb in enumerate(order) if isinstance(cb, TensorBoardCallback))
    assert all(order.index(cb) < board for cb in ours)


def test_activation_metrics_switch(tmp_path):
    config = tiny_config(squ_relu="relu2")
    model = SparseLlamaForCausalLM(config)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=2, logging_steps=1, report_to=[], use_cpu=True),
        train_dataset=RandomTokens(8),
        callbacks=[SparsityCallback(activation_metrics=False)],
    )
    trainer.train()
    row = next(r for r in trainer.state.log_history if "loss" in r)
    assert "weight_sparsity/layer_0/mlp_up_proj" in row
    assert not any(k.startswith("sparsity_relu") for k in row)


def test_two_processes_log_the_pooled_fraction(tmp_path):
    import json

    out = tmp_path / "result.json"
    worker = os.path.join(os.path.dirname(__file__), "dist_telemetry_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = processes.run(
        [*processes.TORCHRUN, worker, str(out)],
        cwd=os.path.dirname(os.path.dirname(worker)),
        env=env,
        timeout=150,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["world_size"] == 2
    rank0, rank1 = data["local"]
    assert rank0 != rank1  # the ranks saw different data
    assert data["logged"] == pytest.approx(data["pooled"], abs=1e-12)
    # ... and the pooled value is not just rank 0's.
    assert any(abs(a - b) > 1e-6 for a, b in zip(data["logged"], rank0))
    # The N:M would-drop fractions: pooled the same way (counts summed, then divided).
    logged_nm, pooled_nm = (sum(data[key], []) for key in ("logged_nm", "pooled_nm"))  # layers x patterns, flat
    nm_rank0, nm_rank1 = (sum(local, []) for local in data["local_nm"])
    assert logged_nm == pytest.approx(pooled_nm, abs=1e-12)
    assert nm_rank0 != nm_rank1 and any(abs(a - b) > 1e-6 for a, b in zip(logged_nm, nm_rank0))
