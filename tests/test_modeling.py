"""The sparse_llama model family as a delta on Llama: equivalence, widths, Auto* round trips."""

import os
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_sparse import SparseLlamaConfig, SparseLlamaForCausalLM
from tests.conftest import tiny_config
from tests.conftest import WITHOUT_HF_SPARSE  # noqa: E402
from tests import processes  # noqa: E402


def _llama_twin(config: SparseLlamaConfig) -> LlamaForCausalLM:
    llama_keys = {f for f in LlamaConfig.__dataclass_fields__}
    return LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.to_dict().items() if k in llama_keys}))


def test_silu_matches_stock_llama_logits():
    config = tiny_config(squ_relu="silu")
    model = SparseLlamaForCausalLM(config).eval()
    stock = _llama_twin(config).eval()
    # Same parameter names: the stock model takes our state dict with no key left over.
    stock.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock(ids).logits)


@pytest.mark.parametrize("act", ["relu", "relu2"])
def test_nongated_mlp_matches_handwritten(act):
    config = tiny_config(squ_relu=act)
    mlp = SparseLlamaForCausalLM(config).model.layers[0].mlp
    assert not hasattr(mlp, "gate_proj")
    x = torch.randn(3, 5, config.hidden_size, dtype=torch.float64)
    mlp.double()
    hidden = torch.relu(x @ mlp.up_proj.weight.T)
    expected = (hidden**2 if act == "relu2" else hidden) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-12)
    assert mlp(x).dtype == torch.float64


def test_nongated_width_rule():
    # 1.5 * 64 = 96 -> next multiple of 64 = 128; SwiGLU keeps intermediate_size.
    assert tiny_config(squ_relu="relu2").ffn_width == 128
    assert tiny_config(squ_relu="silu").ffn_width == 64
    assert SparseLlamaConfig(intermediate_size=2048, squ_relu="relu2").ffn_width == 3072
    assert SparseLlamaConfig(intermediate_size=1376, squ_relu="relu2").ffn_width == 2112
    assert tiny_config(squ_relu="relu", nongated_intermediate_size=40).ffn_width == 40
    model = SparseLlamaForCausalLM(tiny_config(squ_relu="relu2"))
    assert model.model.layers[1].mlp.up_proj.weight.shape == (128, 32)


def test_nongated_parameter_count_matches_swiglu_when_width_is_exact():
    # intermediate 128 -> 192 is already a multiple of 64: same FFN parameter count.
    silu = SparseLlamaForCausalLM(tiny_config(squ_relu="silu", intermediate_size=128))
    relu2 = SparseLlamaForCausalLM(tiny_config(squ_relu="relu2", intermediate_size=128))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(silu) == count(relu2)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(squ_relu="gelu"), "squ_relu"),
        (dict(squ_relu="silu", activation_2by4=True), "activation_2by4"),
        (dict(squ_relu="relu", activation_2by4=True), "activation_2by4"),
        (dict(activation_sparse_method="topk"), "activation_sparse_method"),
        (dict(activation_backward="fast"), "activation_backward"),
        (dict(activation_dense_features=1.5), "activation_dense_features"),
        (dict(loro_scope="everything"), "loro_scope"),
        (dict(loro_init="uniform"), "loro_init"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        tiny_config(**overrides)


def test_state_dict_keys_are_stock_llama_names():
    keys = set(SparseLlamaForCausalLM(tiny_config(squ_relu="relu2")).state_dict())
    assert "model.layers.0.mlp.up_proj.weight" in keys
    assert "model.layers.1.mlp.down_proj.weight" in keys
    assert not any("stats" in k or "perm" in k for k in keys)


def test_auto_classes_round_trip(tmp_path):
    config = tiny_config(squ_relu="relu2", activation_2by4=True, activation_dense_warmup_steps=3)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, SparseLlamaForCausalLM)
    model.save_pretrained(tmp_path)
    saved = os.listdir(tmp_path)
    assert "modeling_sparse_llama.py" in saved and "configuration_sparse_llama.py" in saved
    assert "sparse_ffn.py" in saved

    loaded_config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded_config, SparseLlamaConfig)
    assert loaded_config.auto_map["AutoModelForCausalLM"].endswith("SparseLlamaForCausalLM")
    assert loaded_config.activation_2by4 and loaded_config.activation_dense_warmup_steps == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("low_rank", [False, True], ids=["full_rank", "low_rank"])
def test_loads_in_a_process_without_hf_sparse(tmp_path, low_rank):
    """The checkpoint alone (remote code) is enough; hf_sparse must not be importable."""
    extra = dict(loro_scope="all", loro_attn_rank=4, loro_mlp_rank=4) if low_rank else {}
    config = tiny_config(squ_relu="relu2", activation_2by4=True, **extra)
    model = SparseLlamaForCausalLM(config).eval()
    model_dir = tmp_path / "ckpt"
    model.save_pretrained(model_dir)
    _save_tiny_tokenizer(model_dir)
    ids = torch.randint(0, config.vocab_size, (1, 10))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model(ref["ids"]).logits
        assert type(model).__name__ == "SparseLlamaForCausalLM"
        torch.testing.assert_close(out, ref["logits"], rtol=0, atol=0)
        # The README's tokenizer line: a plain fast tokenizer, no remote code, no prompt.
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained({str(model_dir)!r})
        assert tokenizer("a b").input_ids == [1, 2], tokenizer("a b").input_ids
        print("REMOTE_OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = processes.run(
        [sys.executable, "-c", WITHOUT_HF_SPARSE + script],
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK" in result.stdout
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr


def _save_tiny_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


def test_original_research_llama_json_loads():
    from hf_sparse.training.config.run_config import load_model_config

    path = os.path.join(os.path.dirname(__file__), "fixtures", "original_llama_60m.json")
    config = load_model_config(path, {"squ_relu": "relu2"})
    assert config.model_type == "sparse_llama"
    assert config.max_position_embeddings == 1024
    assert config.pad_token_id is None
    assert (config.hidden_size, config.num_hidden_layers, config.squ_relu) == (512, 8, "relu2")


@pytest.mark.parametrize("name", ["llama_60m", "llama_130m", "llama_350m", "llama_1b"])
def test_recipe_sizes(name):
    from hf_sparse.training.config.run_config import load_model_config

    sizes = {
        "llama_60m": (512, 1376, 8, 8),
        "llama_130m": (768, 2048, 12, 12),
        "llama_350m": (1024, 2736, 24, 16),
        "llama_1b": (2048, 5461, 24, 32),
    }
    config = load_model_config(os.path.join("configs", f"{name}.json"), {})
    got = (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads)
    assert got == sizes[name] and config.vocab_size == 32000


def test_130m_parameter_count_meta():
    """The 130m SwiGLU model has the recipe's size (~134M with untied embeddings)."""
    from hf_sparse.training.config.run_config import load_model_config

    config = load_model_config("configs/llama_130m.json", {})
    with torch.device("meta"):
        model = SparseLlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    expected = 2 * 32000 * 768 + 12 * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768) + 768
    assert total == expected


@pytest.mark.parametrize("squ_relu, millions", [("silu", 94.00), ("relu2", 91.64)])
def test_130m_low_rank_parameter_count(squ_relu, millions):
    """LORO's 130m with r=256 on every decoder linear: 94.00M (SwiGLU, the paper's figure)."""
    from hf_sparse.training.config.run_config import load_model_config

    config = load_model_config(
        "configs/llama_130m.json", dict(squ_relu=squ_relu, loro_scope="all", loro_attn_rank=256, loro_mlp_rank=256)
    )
    with torch.device("meta"):
        model = SparseLlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e6, 2) == millions
    # Only decoder linears are factorised: embeddings and lm_head keep their full shape.
    assert model.lm_head.weight.shape == (32000, 768)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
