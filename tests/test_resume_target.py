"""What resume_from_checkpoint may name, checked before anything is built: a folder with the
training state a resume restores (not a run's final folder, not a save_only_model
checkpoint), a model of this run's parameter shapes; and a "nothing to train" line that is
true wherever the checkpoint and output_dir are. The checkpoints are written by hand (what
the checks read: config.json, trainer_state.json, the names of the state files), so no
training runs here."""

import json
import logging
import os
import re

import pytest
import torch

import train_hf
from hf_sparse import SparseLlamaConfig, SparseLlamaForCausalLM
from hf_sparse.training.config.resume_target import check_resume_target, shape_differences, training_state
from hf_sparse.training.config.run_args import ConfigError
from tests.conftest import REPO_ROOT, assert_one_line_error, run_train_hf_script

TINY_MODEL = os.path.join(REPO_ROOT, "configs", "llama_tiny.json")
TINY = json.loads(open(TINY_MODEL).read())
STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")


def _checkpoint(folder, step=4, state_files=STATE_FILES, **model_changes):
    """A finished checkpoint as the Trainer leaves it, as far as the checks look."""
    folder.mkdir(parents=True)
    values = {k: v for k, v in {**TINY, **model_changes}.items() if k != "model_type"}
    SparseLlamaConfig(**values).to_json_file(str(folder / "config.json"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    for name in state_files:
        path = folder / name.rstrip("/")
        path.mkdir() if name.endswith("/") else path.write_bytes(b"")
    return str(folder)


def _run_json(tmp_path, **overrides):
    config = {
        "model_config": TINY_MODEL, "squ_relu": "relu2", "max_length": 32, "output_dir": str(tmp_path / "run"),
        "max_steps": 8, "per_device_train_batch_size": 4, "eval_strategy": "no", "save_strategy": "no",
        "report_to": [], "disable_tqdm": True, **overrides,
    }  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    return str(path)


def _refuse_to_build(monkeypatch):
    """Anything past the checks (tokenizer, data, model) fails the test."""
    import hf_sparse.training.run as run_module

    def built(*args, **kwargs):
        raise AssertionError("the run was built")

    monkeypatch.setattr(run_module, "build_trainer", built)
    monkeypatch.setattr(run_module, "check_hub_access", built)


# --- a folder without training state ---------------------------------------------------------


def test_a_runs_final_folder_is_refused_naming_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    _refuse_to_build(monkeypatch)
    other = tmp_path / "other"
    _checkpoint(other / "checkpoint-4")
    _checkpoint(other / "checkpoint-8", step=8)
    # The final folder: model, config, trainer_state.json, no optimizer/scheduler/RNG state.
    (other / "config.json").write_text((other / "checkpoint-8" / "config.json").read_text())
    (other / "trainer_state.json").write_text(json.dumps({"global_step": 8}))
    for name in ("model.safetensors", "training_args.bin", "all_results.json"):
        (other / name).write_bytes(b"")
    assert training_state(str(other)) == []
    code = run_train_hf_script(monkeypatch, _run_json(tmp_path, resume_from_checkpoint=str(other)))
    assert_one_line_error(
        code, capsys,
        rf"resume_from_checkpoint: '{re.escape(str(other))}' is a run's final folder, not a checkpoint: it holds no "
        r"optimizer, scheduler or RNG state \(optimizer\.pt, scheduler\.pt, rng_state\*\.pth; under DeepSpeed a "
        r"global_step\* folder\), so resuming from it would restart Adam's moments and the learning-rate schedule "
        rf"from step 0 and lose the random generators' state; resume from its last complete checkpoint, "
        rf"'{re.escape(str(other / 'checkpoint-8'))}'\.$",
    )  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_final_folder_without_checkpoints_and_a_save_only_model_checkpoint(tmp_path):
    lone = tmp_path / "lone"
    _checkpoint(lone, state_files=())
    with pytest.raises(
        ConfigError,
        match=r"is a run's final folder, not a checkpoint: .*; it keeps no checkpoint-N "
        r"folder, so that run cannot be resumed\.$",
    ):
        check_resume_target(str(lone), SparseLlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}))
    only_model = _checkpoint(tmp_path / "run" / "checkpoint-4", state_files=())
    with pytest.raises(
        ConfigError,
        match=r"'.*checkpoint-4' cannot be resumed: it holds no optimizer, scheduler or "
        r"RNG state .* as a checkpoint saved with save_only_model=true",
    ):
        train_hf.main([_run_json(tmp_path, output_dir=str(tmp_path / "new"), resume_from_checkpoint=only_model)])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "engine, files",
    [
        ("plain", ("optimizer.pt", "scheduler.pt", "rng_state.pth")),
        ("two ranks", ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth")),
        ("deepspeed", ("global_step4/", "latest", "rng_state_0.pth", "rng_state_1.pth")),
        ("fsdp sharded", ("optimizer_0/", "pytorch_model_fsdp_0/", "scheduler.pt", "rng_state_0.pth")),
        ("fsdp full", ("optimizer.bin", "scheduler.pt", "rng_state.pth")),
    ],
)
def test_every_engines_checkpoint_counts_as_one(tmp_path, engine, files):
    folder = _checkpoint(tmp_path / "checkpoint-4", state_files=files)
    assert training_state(folder)
    check_resume_target(folder, SparseLlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}))


# --- another model shape ---------------------------------------------------------------------


def test_a_checkpoint_of_another_shape_is_refused_naming_both(tmp_path, monkeypatch, capsys):
    _refuse_to_build(monkeypatch)
    bigger = _checkpoint(tmp_path / "big" / "checkpoint-4", hidden_size=64, num_hidden_layers=4)
    code = run_train_hf_script(monkeypatch, _run_json(tmp_path, resume_from_checkpoint=bigger))
    assert_one_line_error(
        code, capsys,
        rf"resume_from_checkpoint: '{re.escape(bigger)}' holds a model with hidden_size=64, num_hidden_layers=4, "
        r"head_dim=16 but this run's model has hidden_size=32, num_hidden_layers=2, head_dim=8; its weights do not "
        r"fit this model\. Resume with the model_config \(and model keys\) it was trained with",
    )  # fmt: skip
    assert not (tmp_path / "run").exists()  # no empty output_dir left behind


def test_the_shape_check_comes_before_nothing_to_train(tmp_path, monkeypatch, capsys):
    _refuse_to_build(monkeypatch)
    other = _checkpoint(tmp_path / "big" / "checkpoint-4", squ_relu="silu")
    code = run_train_hf_script(monkeypatch, _run_json(tmp_path, resume_from_checkpoint=other, max_steps=2))
    # A gated FFN (gate/up/down at intermediate_size) against a non-gated one (up/down at 1.5x).
    assert_one_line_error(
        code,
        capsys,
        r"holds a model with squ_relu='silu' but this run's model has "
        r"squ_relu='relu2'; its weights do not fit",
    )
    assert not (tmp_path / "run").exists()


# Settings that change the parameters, and settings that do not (both must be told apart).
VARIANTS = [
    dict(vocab_size=256), dict(hidden_size=64), dict(intermediate_size=128), dict(nongated_intermediate_size=128),
    dict(num_hidden_layers=3), dict(num_attention_heads=8), dict(num_key_value_heads=2), dict(head_dim=16),
    dict(squ_relu="silu"), dict(squ_relu="relu"), dict(attention_bias=True), dict(mlp_bias=True),
    dict(tie_word_embeddings=True), dict(loro_scope="all", loro_attn_rank=8, loro_mlp_rank=8),
    dict(loro_scope="mlp", loro_mlp_rank=8), dict(loro_scope="attn", loro_attn_rank=8),
    dict(max_position_embeddings=64), dict(rms_norm_eps=1e-5), dict(activation_2by4=True),
    dict(weight_2by4=True), dict(activation_l1=0.1), dict(permute_2by4=False), dict(hidden_act="gelu"),
]  # fmt: skip
LOW_RANK = dict(loro_scope="all", loro_attn_rank=8, loro_mlp_rank=8)
HEAD_LAYOUT = {"num_attention_heads", "num_key_value_heads", "head_dim"}


def _parameter_shapes(config):
    with torch.device("meta"):
        model = SparseLlamaForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize("base", [{}, LOW_RANK], ids=["full rank", "low rank"])
@pytest.mark.parametrize("change", VARIANTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_the_shape_check_differs_exactly_where_the_parameters_do(base, change):
    values = {k: v for k, v in TINY.items() if k != "model_type"}
    ours = SparseLlamaConfig(**{**values, **base})
    if base and "loro_scope" in change:
        change = {**change, "loro_mlp_rank": 4, "loro_attn_rank": 4}  # same scope or not: the ranks change
    theirs = SparseLlamaConfig(**{**values, **base, **change})
    differs = _parameter_shapes(theirs) != _parameter_shapes(ours)
    keys = shape_differences(theirs, ours)
    if differs:
        assert keys
    else:  # the same tensors; refused only when they would be split into other attention heads
        assert set(keys) <= HEAD_LAYOUT, keys
    assert all(hasattr(theirs, key) for key in keys)  # named as the user sets them


def test_another_head_split_of_the_same_tensors_is_refused_too():
    values = {k: v for k, v in TINY.items() if k != "model_type"}
    ours, theirs = SparseLlamaConfig(**values), SparseLlamaConfig(**{**values, "num_attention_heads": 8})
    assert _parameter_shapes(theirs) == _parameter_shapes(ours)
    assert shape_differences(theirs, ours) == ["num_attention_heads", "num_key_value_heads", "head_dim"]


# --- nothing to train, said truly ------------------------------------------------------------


def _nothing_to_train(tmp_path, monkeypatch, caplog, checkpoint, output_dir):
    _refuse_to_build(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="train_hf"):
        assert train_hf.main([_run_json(tmp_path, resume_from_checkpoint=checkpoint, output_dir=str(output_dir),
                                        max_steps=2)]) == {}  # fmt: skip
    (said,) = [r.getMessage() for r in caplog.records if "nothing to train" in r.getMessage()]
    return said


def test_nothing_to_train_from_a_checkpoint_elsewhere_into_a_new_output_dir(tmp_path, monkeypatch, caplog):
    checkpoint = _checkpoint(tmp_path / "old" / "checkpoint-4")
    new = tmp_path / "new"
    said = _nothing_to_train(tmp_path, monkeypatch, caplog, checkpoint, new)
    assert said == (
        f"nothing to train: {checkpoint} is at step 4 of max_steps=2; nothing is trained or written (output_dir "
        f"{new} was not created); raise max_steps above 4 to train further from it."
    )
    assert not new.exists()


def test_nothing_to_train_into_an_existing_output_dir_of_another_run(tmp_path, monkeypatch, caplog):
    checkpoint = _checkpoint(tmp_path / "old" / "checkpoint-4")
    existing = tmp_path / "existing"
    existing.mkdir()
    said = _nothing_to_train(tmp_path, monkeypatch, caplog, checkpoint, existing)
    assert said.endswith(f"nothing is trained or written (output_dir {existing} is left as it is); raise max_steps "
                         "above 4 to train further from it.")  # fmt: skip
    assert os.listdir(existing) == []


def test_nothing_to_train_in_its_own_finished_run(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    checkpoint = _checkpoint(run / "checkpoint-4")
    (run / "config.json").write_text((run / "checkpoint-4" / "config.json").read_text())
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    said = _nothing_to_train(tmp_path, monkeypatch, caplog, checkpoint, run)
    assert said.endswith(f"so this run already finished; its model and trainer_state.json in {run} are left as they "
                         "are (raise max_steps to train further).")  # fmt: skip
