"""`train_hf.py` end to end on CPU: embedded default, local files, checkpoints, bad input."""

import json
import logging
import os
import re
import sys
import textwrap

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
import train_hf  # noqa: E402
from hf_sparse.training.config.run_args import ConfigError  # noqa: E402
from tests.conftest import WITHOUT_HF_SPARSE, assert_readable_by_another_user  # noqa: E402
from tests import processes  # noqa: E402

TINY_MODEL = os.path.join(REPO_ROOT, "configs", "llama_tiny.json")


def _write_config(tmp_path, **overrides):
    config = {
        "model_config": TINY_MODEL,
        "squ_relu": "relu2",
        "wandb_sparsityrelu": True,
        "max_length": 32,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 0.003,
        "logging_steps": 2,
        "eval_strategy": "steps",
        "eval_steps": 4,
        "max_eval_samples": 16,
        "save_strategy": "steps",
        "save_steps": 4,
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
    }
    config.update(overrides)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config, indent=2))
    return str(path)


def _assert_finished_run(run_dir):
    names = set(os.listdir(run_dir))
    assert {"config.json", "model.safetensors", "trainer_state.json", "all_results.json"} <= names
    assert {"modeling_sparse_llama.py", "configuration_sparse_llama.py"} <= names
    assert not any(name.endswith(".tmp") for name in names)
    with open(os.path.join(run_dir, "all_results.json")) as handle:
        results = json.load(handle)
    for key in ("eval_loss", "eval_perplexity", "eval_accuracy"):
        assert key in results, key
    assert results["eval_perplexity"] == pytest.approx(torch.tensor(results["eval_loss"]).exp().item(), rel=1e-6)
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    with open(os.path.join(run_dir, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    train_rows = [row for row in history if "loss" in row]
    assert [row["step"] for row in train_rows] == [2, 4]
    assert "sparsity_relu/layer_1" in train_rows[0]
    eval_rows = [row for row in history if "eval_loss" in row]
    assert eval_rows and "eval_perplexity" in eval_rows[0] and "eval_accuracy" in eval_rows[0]
    return results


def test_embedded_default_end_to_end(tmp_path):
    results = train_hf.main([_write_config(tmp_path)])
    _assert_finished_run(tmp_path / "run")
    # safetensors writes model.safetensors 0600: the final model and every checkpoint must
    # be readable by another uid (a serving container) like the files beside them.
    run = tmp_path / "run"
    assert_readable_by_another_user(
        run / "model.safetensors",
        run / "config.json",
        run / "checkpoint-4" / "model.safetensors",
        run / "checkpoint-4" / "optimizer.pt",
    )
    assert results["eval_loss"] < 7.0  # well below ln(512) = 6.24 + noise would be suspicious above
    assert (tmp_path / "run" / "sparsity_relu_heatmap.png").exists()


def test_local_json_files_end_to_end(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = torch.Generator().manual_seed(0)

    def doc():
        return " ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=rng).tolist())

    train = tmp_path / "train.jsonl"
    valid = tmp_path / "valid.json"
    train.write_text("\n".join(json.dumps({"text": doc()}) for _ in range(80)))
    valid.write_text("\n".join(json.dumps({"text": doc()}) for _ in range(10)))
    config = _write_config(tmp_path, train_files=[str(train)], validation_files=[str(valid)])
    train_hf.main([config])
    _assert_finished_run(tmp_path / "run")


def test_cli_overrides_and_checkpoint_loads_without_hf_sparse(tmp_path):
    """A train_hf.py checkpoint loads with the Auto classes where hf_sparse is not importable."""
    config = _write_config(tmp_path, max_steps=2, eval_strategy="no", save_steps=2)
    proc = processes.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "train_hf.py"),
            config,
            "--activation_2by4",
            "true",
            "--activation_dense_warmup_steps",
            "1",
            "--logging_steps",
            "1",
        ],
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "model, tokenizer and config saved to" in proc.stderr
    run_dir = tmp_path / "run"
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert [r["step"] for r in state["log_history"] if "loss" in r] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["activation_2by4"] is True

    from transformers import AutoModelForCausalLM

    import hf_sparse  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(run_dir)!r}, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained({str(run_dir)!r})
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], rtol=0, atol=0)
        assert len(tok) <= model.config.vocab_size
        print("REMOTE_OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = processes.run([sys.executable, "-c", WITHOUT_HF_SPARSE + script], cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK" in result.stdout


# --- bad input: one clear error before any training step, nothing written -------------------


def _bad(tmp_path, **overrides):
    return _write_config(tmp_path, **overrides)


BAD_INPUTS = [
    (dict(max_stpes=10), r"unknown config key 'max_stpes'.*Did you mean 'max_steps'"),
    (dict(squ_relu="gelu"), r"squ_relu='gelu'.*'silu', 'relu', 'relu2'"),
    (dict(squ_relu="silu", activation_2by4=True), r"activation_2by4=True requires squ_relu='relu2'"),
    (dict(model_config="configs/does_not_exist.json"), r"model_config: file .*does_not_exist.json.* does not exist"),
    (dict(train_files=["/nonexistent/train.jsonl"]), r"train_files"),
    (dict(max_length=4096), r"max_length=4096 .*max_position_embeddings=128"),
    (dict(max_steps="ten"), r"max_steps: expected int, got 'ten'"),
    (dict(optimizer="sgd"), r"optimizer='sgd'.*'adamw', 'loro_adamw'"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS)
def test_bad_input_fails_fast_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_hf.main([_bad(tmp_path, **overrides)])
    assert not (tmp_path / "run").exists()


def test_empty_data_file_fails_fast(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="train_files"):
        train_hf.main([_bad(tmp_path, train_files=[str(empty)])])
    assert not (tmp_path / "run").exists()


def test_data_content_problems_are_one_line(tmp_path):
    # Found while the data is built (the model is not yet): a missing text column, too little text.
    no_column = tmp_path / "no_column.jsonl"
    no_column.write_text('{"content": "some words here"}\n' * 50)
    with pytest.raises(ConfigError, match=r"text_column: column 'text' not found; columns: \['content'\]"):
        train_hf.main([_bad(tmp_path, train_files=[str(no_column)], validation_files=[str(no_column)])])
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "too short"}\n')
    with pytest.raises(ConfigError, match=r"no full block of max_length=32 tokens"):
        train_hf.main([_bad(tmp_path, train_files=[str(short)], validation_files=[str(short)])])
    assert not (tmp_path / "run").exists()


def test_zero_layers_and_a_directory_config_are_refused(tmp_path):
    model = tmp_path / "zero_layers.json"
    model.write_text(json.dumps(dict(json.loads(open(TINY_MODEL).read()), num_hidden_layers=0)))
    with pytest.raises(ConfigError, match=r"num_hidden_layers: 0 in model_config .* use a positive integer"):
        train_hf.main([_bad(tmp_path, model_config=str(model))])
    with pytest.raises(ConfigError, match=r"config file '.*configs/?' is a directory; give a run JSON"):
        train_hf.main([os.path.join(REPO_ROOT, "configs") + os.sep])
    assert not (tmp_path / "run").exists()


def _tiny_model_json(tmp_path, **changes):
    model = {**json.loads(open(TINY_MODEL).read()), **changes}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    return str(path)


def test_a_typo_in_the_model_json_is_refused_with_the_closest_key(tmp_path):
    # PretrainedConfig keeps unknown keys as attributes: this built a model with the default
    # hidden_size (4096), silently.
    model = _tiny_model_json(tmp_path, hiden_size=32)
    with pytest.raises(
        ConfigError,
        match=r"^unknown key 'hiden_size' in model_config '.*model\.json'\. Did you mean "
        r"'hidden_size'\?$",
    ):
        train_hf.main([_bad(tmp_path, model_config=model)])
    with pytest.raises(
        ConfigError,
        match=r"'max_steps' in model_config '.*model\.json' is a key of the run JSON, not "
        r"of the model JSON; move it to the run JSON",
    ):
        train_hf.main([_bad(tmp_path, model_config=_tiny_model_json(tmp_path, max_steps=10))])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name", sorted(n for n in os.listdir(os.path.join(REPO_ROOT, "configs")) if n.startswith("llama_")) + ["original"]
)
def test_every_shipped_model_json_and_the_original_research_one_load(name):
    from hf_sparse.training.config.run_config import load_model_config

    path = (os.path.join(REPO_ROOT, "tests", "fixtures", "original_llama_60m.json") if name == "original"
            else os.path.join(REPO_ROOT, "configs", name))  # fmt: skip
    config = load_model_config(path, {}, block_size=64)
    assert config.hidden_size == json.loads(open(path).read())["hidden_size"]


def test_saved_config_files_load_as_model_json(tmp_path):
    """A config.json that save_pretrained wrote (this transformers, or transformers 4 with its
    inert legacy keys and generation settings) is a valid model JSON."""
    from hf_sparse import SparseLlamaConfig
    from hf_sparse.training.config.run_config import load_model_config

    SparseLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=512, squ_relu="relu2").save_pretrained(tmp_path / "saved")  # fmt: skip
    assert load_model_config(str(tmp_path / "saved" / "config.json"), {}).hidden_size == 32
    legacy = {**json.loads(open(TINY_MODEL).read()), "model_type": "llama", "torch_dtype": "float32",
              "rope_theta": 10000.0, "rope_scaling": None, "is_decoder": False, "tokenizer_class": None,
              "pruned_heads": {}, "num_beams": 1, "max_length": 20, "architectures": ["LlamaForCausalLM"]}  # fmt: skip
    path = tmp_path / "legacy.json"
    path.write_text(json.dumps(legacy))
    assert load_model_config(str(path), {}).num_hidden_layers == 2


def test_a_model_json_given_as_the_run_json_says_where_it_goes(tmp_path):
    with pytest.raises(ConfigError) as err:
        train_hf.main([TINY_MODEL, "--output_dir", str(tmp_path / "run")])
    message = str(err.value)
    assert message.startswith(f"{TINY_MODEL!r} is a model JSON (it has model_type, hidden_size"), message
    assert 'not a run JSON; name it as model_config in a run JSON (e.g. "model_config": ' in message
    assert message.endswith(f"--model_config: train_hf.py configs/quickstart.json --model_config {TINY_MODEL}")
    assert "loro_type" not in message and not (tmp_path / "run").exists()


def test_settings_that_do_not_do_what_they_seem_warn_once_before_training(tmp_path, caplog):
    from hf_sparse.training.config.run_config import parse_run_config

    def warnings_for(**overrides):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_sparse"):
            parse_run_config([_bad(tmp_path, **overrides)])
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    assert warnings_for() == []  # the test config itself: nothing to say
    (said,) = warnings_for(warmup_steps=500, max_steps=3)
    assert said == (
        "warmup_steps=500 is not below max_steps=3: the learning rate rises through the whole run and never leaves "
        "the warm-up (the last step trains at 2/500 of learning_rate=0.003); use a warmup_steps well below max_steps, "
        "or a ratio below 1 such as 0.05."
    )
    (said,) = warnings_for(warmup_steps=0.9, max_steps=3)  # a ratio: ceil(0.9 * 3) = 3 steps
    assert said.startswith("warmup_steps=0.9 (3 steps) is not below max_steps=3")
    assert warnings_for(warmup_steps=500, max_steps=3, lr_scheduler_type="constant") == []  # no warm-up there
    assert warnings_for(warmup_steps=2, max_steps=3) == []
    (said,) = warnings_for(weight_decay=-0.1)
    assert said.startswith("weight_decay=-0.1 is negative: the decay then pushes the weights away from zero")
    if not torch.cuda.is_available():
        (said,) = warnings_for(fp16=True)
        assert said.startswith(
            "fp16=True has no effect on CPU: accelerate autocasts to float16 only on GPUs, so this "
            "run trains in float32"
        )
        assert warnings_for(bf16=True) == []  # bfloat16 autocast does run on CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="what fp16 does on a CPU-only machine")
def test_fp16_on_cpu_really_trains_in_float32(tmp_path):
    """What the fp16 warning says, measured: under the Trainer with fp16=True on CPU every
    MLP output is float32 and no loss scaler exists (bf16 does autocast there)."""
    from transformers import Trainer

    from hf_sparse import SparseLlamaForCausalLM
    from tests.conftest import tiny_config, tiny_training_args

    dtypes = {}
    for flag in ("fp16", "bf16"):
        model = SparseLlamaForCausalLM(tiny_config())
        seen = dtypes.setdefault(flag, set())
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out, seen=seen: seen.add(out.dtype))
        data = [{"input_ids": torch.randint(0, 128, (16,)), "labels": torch.randint(0, 128, (16,))} for _ in range(4)]
        trainer = Trainer(model=model, args=tiny_training_args(tmp_path / flag, max_steps=1, **{flag: True}),
                          train_dataset=data)  # fmt: skip
        trainer.train()
        if flag == "fp16":
            assert trainer.accelerator.scaler is None
    assert dtypes == {"fp16": {torch.float32}, "bf16": {torch.bfloat16}}


def test_a_mostly_dense_schedule_warns_with_the_numbers(tmp_path, caplog):
    from hf_sparse.training.config.run_config import parse_run_config

    quick24 = os.path.join(REPO_ROOT, "configs", "quickstart_weight24.json")
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        parse_run_config(
            [quick24, "--max_steps", "60", "--sparse_dense_finetune_steps", "50", "--output_dir", str(tmp_path / "w24")]
        )
    said = [r.getMessage() for r in caplog.records if "optimizer steps are sparse" in r.getMessage()]
    assert said == [
        "weight 2:4: only 10 of max_steps=60 optimizer steps are sparse (weight_2by4_start_step=0 dense first, "
        "sparse_dense_finetune_steps=50 dense at the end); shorten those too, or this run is mostly dense."
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        parse_run_config([quick24, "--output_dir", str(tmp_path / "w24")])  # as shipped: mostly sparse
    assert not [r for r in caplog.records if "optimizer steps are sparse" in r.getMessage()]


def test_no_validation_split_needs_evaluation_off(tmp_path):
    from hf_sparse.training.config.run_config import parse_run_config

    with pytest.raises(
        ConfigError, match=r"eval_strategy='steps' needs validation data, but validation_split_percentage is 0"
    ):
        train_hf.main([_bad(tmp_path, validation_split_percentage=0)])
    assert not (tmp_path / "run").exists()
    run = parse_run_config([_bad(tmp_path, validation_split_percentage=0, eval_strategy="no")])
    assert run.data_args.validation_split_percentage == 0


def test_output_dir_that_cannot_be_written_is_one_line(tmp_path):
    # /proc refuses new folders even to root (a chmod would not stop root).
    with pytest.raises(ConfigError, match=r"output_dir: '/proc/hf_sparse_run/out' cannot be written \(.* in '/proc'\)"):
        train_hf.main([_bad(tmp_path, output_dir="/proc/hf_sparse_run/out")])
    assert not any(name.startswith(".hf_sparse_write_probe_") for name in os.listdir(tmp_path))


def test_boundaries_that_are_valid(tmp_path):
    from hf_sparse.training.config.config_checks import check_sparse_schedule
    from hf_sparse.training.config.run_config import parse_run_config
    from tests.conftest import tiny_config

    # A block as long as the model's positions is fine (1024/1024 in the real recipes).
    positions = json.loads(open(TINY_MODEL).read())["max_position_embeddings"]
    assert parse_run_config([_bad(tmp_path, max_length=positions)]).data_args.max_length == positions
    # A dense tail as long as the run is fine for 2:4 activations (weight 2:4 needs a sparse step).
    check_sparse_schedule(tiny_config(activation_2by4=True, activation_dense_finetune=True,
                                      sparse_dense_finetune_steps=4), 4)  # fmt: skip
    with pytest.raises(ConfigError, match="sparse_dense_finetune_steps=5 is larger than max_steps=4"):
        check_sparse_schedule(tiny_config(activation_2by4=True, sparse_dense_finetune_steps=5), 4)


def test_bad_input_from_the_command_line_is_one_line(tmp_path):
    config = _bad(tmp_path, squ_relu="gelu")
    proc = processes.run([sys.executable, os.path.join(REPO_ROOT, "train_hf.py"), config], cwd=REPO_ROOT, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"train_hf\.py: error: squ_relu='gelu' is not valid", last), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "max_steps": 3,\n  "squ_relu" "relu2"\n}\n')
    with pytest.raises(ConfigError, match=r"line 3, column 14"):
        train_hf.main([str(path)])


def test_readme_has_the_two_lines_and_quickstart_parses():
    from hf_sparse.training.config.run_config import parse_run_config

    with open(os.path.join(REPO_ROOT, "README.md")) as handle:
        readme = handle.read()
    assert "pip install -r requirements.txt && python train_hf.py configs/quickstart.json" in readme
    assert "python -m pytest -q" in readme
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        run = parse_run_config(["configs/quickstart.json", "--output_dir", "/tmp/hf_sparse_quickstart_parse"])
    finally:
        os.chdir(cwd)
    assert run.model_config.squ_relu == "relu2" and run.model_config.activation_2by4
    for name in ("c4_llama_130m_relu2.json",):
        os.chdir(REPO_ROOT)
        try:
            parse_run_config([os.path.join("configs", name), "--output_dir", "/tmp/hf_sparse_c4_parse"])
        finally:
            os.chdir(cwd)


# --- the rest of the bad-input table (README) -----------------------------------------------


def test_wandb_requested_but_not_installed(tmp_path, monkeypatch):
    from transformers import integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    with pytest.raises(ConfigError, match=r"report_to: 'wandb' requested but not installed \(pip install wandb\)"):
        train_hf.main([_bad(tmp_path, report_to=["wandb"])])
    assert not (tmp_path / "run").exists()


def test_unknown_reporting_integration(tmp_path):
    with pytest.raises(ConfigError, match=r"report_to: 'wandbb' is not a reporting integration.*'wandb'"):
        train_hf.main([_bad(tmp_path, report_to=["wandbb"])])


def test_output_dir_holding_another_run_is_refused(tmp_path):
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run" / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"output_dir .* already holds a run; set overwrite_output_dir=true"):
        train_hf.main([_bad(tmp_path)])
    # Untouched: the other run's files are still there and nothing was added.
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-2", "trainer_state.json"]


def test_tokenizer_larger_than_the_model_vocab(tmp_path):
    # The embedded tokenizer trained for 1024 tokens cannot index a 512-row embedding.
    with pytest.raises(ConfigError, match=r"tokenizer's vocabulary has 1024 tokens but the model's vocab_size is 512"):
        train_hf.main([_bad(tmp_path, tokenizer_vocab_size=1024)])
    assert not (tmp_path / "run").exists()


def test_contradictory_low_rank_settings(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer='loro_adamw' needs low-rank linears: set loro_scope"):
        train_hf.main([_bad(tmp_path, optimizer="loro_adamw")])
    with pytest.raises(ConfigError, match=r"loro_mlp_rank=.* is larger"):
        train_hf.main([_bad(tmp_path, loro_scope="mlp", loro_mlp_rank=64)])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name", ["quickstart.json", "quickstart_lowrank.json", "c4_llama_130m_relu2.json", "c4_llama_130m_loro.json"]
)
def test_shipped_run_configs_parse(name, tmp_path):
    from hf_sparse.training.config.run_config import parse_run_config

    run = parse_run_config([os.path.join(REPO_ROOT, "configs", name), "--output_dir", str(tmp_path / "out")])
    if "loro" in name or "lowrank" in name:
        assert run.script_args.optimizer == "loro_adamw" and run.model_config.loro_scope == "all"
    if name == "c4_llama_130m_loro.json":
        # The LORO paper's 130m recipe: SwiGLU, r=256, lr 0.01, exact step and refresh every 500.
        assert (run.model_config.loro_attn_rank, run.model_config.loro_mlp_rank) == (256, 256)
        assert run.training_args.learning_rate == 0.01 and run.script_args.loro_freq == 500
        assert run.script_args.loro_refresh == "all" and run.script_args.scheduler == "cosine_restart"


def test_push_to_hub_uploads_the_finished_folder_with_our_card(tmp_path, monkeypatch):
    """The hub is unreachable here: the hub calls are replaced by recorders, and the test
    checks what would be uploaded, where, and that the folder was complete at that moment."""
    import huggingface_hub
    from transformers import Trainer

    def fake_init_repo(self, token=None, private=None):
        self.hub_model_id = self.args.hub_model_id
        self.push_in_progress = None

    uploads = []

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        card = os.path.join(folder_path, "README.md")
        uploads.append(
            {
                "repo_id": repo_id,
                "folder": folder_path,
                "names": set(os.listdir(folder_path)),
                "card": open(card).read() if os.path.exists(card) else "",
                **kwargs,
            }
        )

    # Only these two are replaced: any other upload the Trainer tried would hit the offline hub.
    monkeypatch.setattr(Trainer, "init_hf_repo", fake_init_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    train_hf.main([_write_config(tmp_path, push_to_hub=True, hub_model_id="someone/tiny-sparse-llama")])

    assert len(uploads) == 1
    upload = uploads[0]
    assert upload["repo_id"] == "someone/tiny-sparse-llama"
    assert os.path.abspath(upload["folder"]) == str(tmp_path / "run")
    assert {
        "config.json",
        "model.safetensors",
        "modeling_sparse_llama.py",
        "configuration_sparse_llama.py",
        "tokenizer.json",
        "README.md",
        "all_results.json",
    } <= upload["names"]
    assert "checkpoint-*" in upload["ignore_patterns"]  # intermediate checkpoints stay local
    assert "FFN: non-gated relu2" in upload["card"]
    assert "| eval_perplexity |" in upload["card"] and "| eval_accuracy |" in upload["card"]  # final metrics


def test_push_to_hub_pushes_once_at_the_end_unless_told_otherwise(tmp_path):
    from transformers.trainer_utils import HubStrategy

    from hf_sparse.training.config.run_config import parse_run_config

    run = parse_run_config([_write_config(tmp_path, push_to_hub=True, hub_model_id="a/b")])
    assert run.training_args.hub_strategy == HubStrategy.END
    run = parse_run_config([_write_config(tmp_path, push_to_hub=True, hub_model_id="a/b", hub_strategy="checkpoint")])
    assert run.training_args.hub_strategy == HubStrategy.CHECKPOINT
