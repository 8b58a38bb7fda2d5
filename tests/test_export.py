"""`python -m hf_sparse.export`: the exported weights are the ones the trained forward used
(2:4 along the input dim, scale folded in), and the folder reproduces the trained model's
logits where hf_sparse is not installed, as stock llama/arcee where the model allows it."""

import json
import os
import re
import shutil
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hf_sparse import SparseLlamaForCausalLM, set_training_step
from hf_sparse.export import ExportError, export_model, main, stock_architecture
from hf_sparse.model.weight_sparse import sparse_weight_2to4
from tests.conftest import assert_readable_by_another_user, help_as_invoked, tiny_config
from tests.conftest import WITHOUT_HF_SPARSE  # noqa: E402
from tests import processes  # noqa: E402

LOW_RANK = dict(loro_scope="all", loro_attn_rank=8, loro_mlp_rank=8)
# name -> (config overrides, expected architecture of the export, dtype)
CASES = {
    "silu_llama": (dict(squ_relu="silu", weight_2by4=True, tie_word_embeddings=True), "llama", torch.float32),
    "relu2_arcee": (
        dict(weight_2by4=True, weight_2by4_scope="all", weight_sparse_method="ste"),
        "arcee",
        torch.float32,
    ),
    # relu2 prefers llama: relu(gate)·up with gate = up (the 2:4 up_proj copied, 2:4 too).
    "relu2_llama": (dict(weight_2by4=True), "llama", torch.float32),
    "relu_arcee_bf16": (dict(squ_relu="relu", weight_2by4=True), "arcee", torch.bfloat16),
    "lowrank_act24": (
        dict(
            weight_2by4=True, weight_2by4_scope="all", activation_2by4=True, activation_dense_warmup_steps=0, **LOW_RANK
        ),
        "sparse_llama",
        torch.float32,
    ),
    # Dense tail covering activations: the final forward is a dense non-gated relu2 -> llama.
    "tail_llama": (
        dict(weight_2by4=True, activation_2by4=True, activation_dense_finetune=True, sparse_dense_finetune_steps=10),
        "llama",
        torch.float32,
    ),
    # Dense tail for weights only: activations stay 2:4, so sparse_llama with dense weights.
    "tail_act24": (
        dict(weight_2by4=True, activation_2by4=True, activation_dense_warmup_steps=0, sparse_dense_finetune_steps=10),
        "sparse_llama",
        torch.float32,
    ),
}
TARGETS = {"relu2_arcee": "arcee"}  # asked for explicitly; every other case takes the default
EXPECTED_CLASS = {"llama": "LlamaForCausalLM", "arcee": "ArceeForCausalLM", "sparse_llama": "SparseLlamaForCausalLM"}


def _tiny_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


def _trained_run(run_dir, overrides, dtype=torch.float32):
    """A saved model in the state a run leaves: scales fixed on the first sparse step, then
    the masters moved on (so a scale recomputed from them now would differ)."""
    model = SparseLlamaForCausalLM(tiny_config(**overrides)).to(dtype)
    set_training_step(model, 5, 100)
    model.train()
    model(torch.randint(0, 128, (2, 8)))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(run_dir)
    return model


def _reference_logits(run_dir, ids):
    # "The trained model" as its users get it: RUN_DIR loaded with hf_sparse (final forward).
    model = SparseLlamaForCausalLM.from_pretrained(run_dir, dtype="auto").eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every case trained, saved and exported once; shared by the tests below."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 11))
    result = {}
    for name, (overrides, architecture, dtype) in CASES.items():
        run_dir, out_dir = root / f"run_{name}", root / f"out_{name}"
        _trained_run(run_dir, overrides, dtype)
        if name == "relu2_arcee":
            _tiny_tokenizer(run_dir)
        export_model(str(run_dir), str(out_dir), target=TARGETS.get(name))
        torch.save({"ids": ids, "logits": _reference_logits(run_dir, ids)}, root / f"expected_{name}.pt")
        result[name] = dict(run=run_dir, out=out_dir, expected=root / f"expected_{name}.pt", architecture=architecture)
    return root, result


def _targeted(run_state):
    """{exported tensor name: its scale} for the 2:4 tensors, read off the run's scale buffers."""
    targets = {}
    for key, value in run_state.items():
        if key.endswith("_2by4_scale"):
            # up_proj.weight_2by4_scale -> up_proj.weight; weight_in_2by4_scale -> weight_in
            targets[key[: -len("_2by4_scale")]] = value
    return targets


def _as_out_by_in(name, tensor):
    # Low-rank weight_in is stored in×r; its input dim (the 2:4 group dim) is dim 0.
    return tensor.t() if name.endswith("weight_in") else tensor


@pytest.mark.parametrize("name", ["silu_llama", "relu2_arcee", "relu2_llama", "relu_arcee_bf16", "lowrank_act24"])
def test_exported_weights_are_the_scaled_2to4_weights(exports, name):
    _, cases = exports
    case = cases[name]
    run_state = load_file(case["run"] / "model.safetensors")
    out_state = load_file(case["out"] / "model.safetensors")
    config = json.loads((case["out"] / "config.json").read_text())
    method = tiny_config(**CASES[name][0]).weight_sparse_method
    targets = _targeted(run_state)
    assert targets and not any("2by4_scale" in k for k in out_state)
    assert config["model_type"] == case["architecture"] and config["hf_sparse_export"]["weight_2by4"] is True
    for key, tensor in out_state.items():
        assert tensor.dtype == CASES[name][2]
        if key not in run_state:  # the llama form of a relu2 FFN: gate_proj is a copy of up_proj
            assert name == "relu2_llama" and key.endswith("gate_proj.weight") and config["hidden_act"] == "relu"
            key = key.replace("gate_proj", "up_proj")
        if key not in targets:  # untouched: embeddings, norms, untargeted linears
            torch.testing.assert_close(tensor, run_state[key], rtol=0, atol=0)
            continue
        exported = _as_out_by_in(key, tensor)
        groups = exported.reshape(exported.shape[0], -1, 4)
        assert ((groups != 0).sum(-1) <= 2).all(), f"{key} is not 2:4 along its input dim"
        # Stored scale (fixed at the first sparse step, not recomputed from the moved
        # masters) times the 2:4 selection of the master: what the trained forward used.
        sparse, _ = sparse_weight_2to4(_as_out_by_in(key, run_state[key]), method)
        scale = targets[key]
        assert method == "ste" or abs(float(scale) - 1.0) > 1e-4
        torch.testing.assert_close(exported, sparse * scale.to(sparse.dtype), rtol=0, atol=0)


def test_dense_tail_exports_the_dense_masters(exports):
    _, cases = exports
    for name in ("tail_llama", "tail_act24"):
        case = cases[name]
        run_state = load_file(case["run"] / "model.safetensors")
        out_state = load_file(case["out"] / "model.safetensors")
        config = json.loads((case["out"] / "config.json").read_text())
        gates = {k for k in out_state if "gate_proj" in k}  # the llama form's copies of up_proj
        assert bool(gates) == (name == "tail_llama")
        assert set(out_state) - gates == {k for k in run_state if not k.endswith("_2by4_scale")}
        for key, tensor in out_state.items():
            torch.testing.assert_close(tensor, run_state[key.replace("gate_proj", "up_proj")], rtol=0, atol=0)
        # Dense weights: labelled dense everywhere (config, card tags), not 2:4.
        card = (case["out"] / "README.md").read_text()
        assert "2:4-weight-sparsity" not in card and "architecture_reason" in config["hf_sparse_export"]
        assert config["hf_sparse_export"]["dense_tail"] is True and config["hf_sparse_export"]["weight_2by4"] is False
        assert "dense fine-tuning" in (case["out"] / "README.md").read_text()
    sparse_config = json.loads((cases["tail_act24"]["out"] / "config.json").read_text())
    # Baked schedule: stored weights used as they are, 2:4 activations kept, no tail left.
    assert sparse_config["weight_2by4"] is False and sparse_config["activation_2by4"] is True
    assert sparse_config["sparse_dense_finetune_steps"] == 0


def test_exports_reproduce_logits_without_hf_sparse(exports):
    """One clean process (hf_sparse not importable) loads every export: the trained
    model's logits; stock exports also through their own classes, without remote code."""
    root, cases = exports
    plan = [
        dict(name=n, out=str(c["out"]), expected=str(c["expected"]), cls=EXPECTED_CLASS[c["architecture"]],
             stock=c["architecture"] != "sparse_llama")
        for n, c in cases.items()
    ]  # fmt: skip
    for case in plan:
        files = os.listdir(case["out"])
        assert any(f.endswith(".py") for f in files) != case["stock"], (case["name"], files)
    script = textwrap.dedent(
        """
        import json, sys, torch, transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        for case in json.loads(sys.argv[1]):
            ref = torch.load(case["expected"])
            loaders = [lambda: AutoModelForCausalLM.from_pretrained(case["out"], trust_remote_code=True)]
            if case["stock"]:
                loaders.append(lambda: getattr(transformers, case["cls"]).from_pretrained(case["out"]))
                loaders.append(lambda: AutoModelForCausalLM.from_pretrained(case["out"]))
            for load in loaders:
                model = load().eval()
                assert type(model).__name__ == case["cls"], (case["name"], type(model).__name__)
                with torch.no_grad():
                    out = model(ref["ids"]).logits
                assert out.dtype == ref["logits"].dtype, case["name"]
                torch.testing.assert_close(out, ref["logits"], rtol=0, atol=1e-5, msg=case["name"])
            if case["name"] == "relu2_arcee":
                assert AutoTokenizer.from_pretrained(case["out"])("a b")["input_ids"] == [1, 2]
        print("EXPORT_OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(root / "modules")
    result = processes.run(
        [sys.executable, "-c", WITHOUT_HF_SPARSE + script, json.dumps(plan)],
        cwd=root, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EXPORT_OK" in result.stdout


def test_stock_architecture_rule():
    assert stock_architecture(tiny_config(squ_relu="silu")) == ("llama", "")
    assert stock_architecture(tiny_config(squ_relu="relu")) == ("arcee", "")
    assert stock_architecture(tiny_config(squ_relu="relu2")) == ("llama", "")  # preferred: native in vLLM
    assert stock_architecture(tiny_config(squ_relu="relu2"), "arcee") == ("arcee", "")
    assert stock_architecture(tiny_config(squ_relu="relu"), "llama")[0] is None
    assert stock_architecture(tiny_config(activation_2by4=True))[0] is None
    assert stock_architecture(tiny_config(squ_relu="silu", **LOW_RANK))[0] is None
    # A dense tail over activations makes the final forward a plain relu2 FFN.
    tail = tiny_config(activation_2by4=True, activation_dense_finetune=True, sparse_dense_finetune_steps=3)
    assert stock_architecture(tail) == ("llama", "")


def test_dense_flag(exports, tmp_path):
    _, cases = exports
    with pytest.raises(ExportError) as err:
        export_model(str(cases["lowrank_act24"]["run"]), str(tmp_path / "x"), dense=True)
    message = str(err.value)
    assert "\n" not in message and "loro_scope" in message and "activation_2by4" in message and "arcee" in message
    assert not (tmp_path / "x").exists()
    out = export_model(str(cases["relu2_arcee"]["run"]), str(tmp_path / "y"), dense=True)
    assert json.loads((tmp_path / "y" / "config.json").read_text())["model_type"] == "llama" and out == str(
        tmp_path / "y"
    )


def test_errors_are_one_clear_line(exports, tmp_path):
    _, cases = exports
    run = str(cases["silu_llama"]["run"])
    llama_dir = tmp_path / "llama"
    llama_dir.mkdir()
    (llama_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((cases["silu_llama"]["run"] / "config.json").read_text())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    checks = [
        ((str(tmp_path / "missing"), str(tmp_path / "o1")), "does not exist"),
        ((str(tmp_path), str(tmp_path / "o2")), "no config.json"),
        ((str(llama_dir), str(tmp_path / "o3")), "'llama' model, not 'sparse_llama'"),
        ((str(no_weights), str(tmp_path / "o4")), "no weights"),
        ((run, str(busy)), "not empty"),
    ]
    for args, expected in checks:
        with pytest.raises(ExportError) as err:
            export_model(*args)
        assert expected in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(busy) == ["keep.txt"]


def test_checkpoint_hint_and_cli(exports, tmp_path, caplog):
    _, cases = exports
    run_root = tmp_path / "run"
    ckpt = run_root / "checkpoint-7"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "trainer_state.json").write_text("{}")
    assert main([str(run_root), str(tmp_path / "o")]) == 2
    assert "checkpoint-7" in caplog.text and not (tmp_path / "o").exists()

    empty = tmp_path / "empty_out"
    empty.mkdir()  # an existing empty OUT_DIR is fine
    caplog.clear()
    with caplog.at_level("INFO", logger="hf_sparse.export"):
        assert main([str(cases["relu2_arcee"]["run"]), str(empty)]) == 0
    # One line says where the export went (it used to be said twice, the second time bare).
    said = [r.getMessage() for r in caplog.records if str(empty.resolve()) in r.getMessage()]
    assert len(said) == 1 and re.match(rf"exported .*run_relu2_arcee as llama with .* to {re.escape(str(empty.resolve()))}$",
                                       said[0]), said  # fmt: skip
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(empty))
    assert not [p for p in os.listdir(tmp_path) if ".export-" in p]  # staging folder renamed away


def test_help_names_the_program_it_was_invoked_as(monkeypatch, capsys):
    for prog, out in help_as_invoked(monkeypatch, capsys, main, "hf-sparse-export", "hf_sparse.export").items():
        assert out.startswith(f"usage: {prog} ") and "run_dir" in out and "--dense" in out, out


def test_export_is_readable_by_another_user_and_its_tokenizer_config_has_no_loader_arguments(exports, tmp_path):
    """mkdtemp's private 0700 staging folder must not become the export's mode, nor
    safetensors' 0600 the weights' (the other files get the umask's 0644); a run saved by
    transformers 5.24 offline carries local_files_only/is_local, which the export drops."""
    import stat

    _, cases = exports
    run = tmp_path / "run"
    shutil.copytree(cases["relu2_arcee"]["run"], run)
    tokenizer_config = json.loads((run / "tokenizer_config.json").read_text())
    (run / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "local_files_only": True, "is_local": True})
    )
    out = tmp_path / "export"
    export_model(str(run), str(out))
    assert stat.S_IMODE(os.stat(out).st_mode) & 0o055 == 0o055  # group/other may list and enter
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert "local_files_only" not in saved and "is_local" not in saved and saved["unk_token"] == "[UNK]"
    assert_readable_by_another_user(*(out / name for name in ("model.safetensors", "config.json", "tokenizer.json")))
