"""`train_hf.py --help`, and one `train_hf.py: error: <key>: ...` line (nothing built, nothing
written) for the values that used to fail with a traceback mid-run: batch geometry, logging
steps, learning rate, max_steps, output_dir, attention heads, wandb without credentials, a hub
resource that cannot be had. Also: a single path where a list of paths is expected.

Everything runs in process through the script's own `__main__` (runpy), offline: the hub
connectivity probe is replaced, never called for real.
"""

import dataclasses
import json
import os
import re
import sys
import time

import pytest

import hf_sparse.training.data.data as data_module
import hf_sparse.training.data.hub_access as hub_access
import hf_sparse.training.data.tokenizer as tokenizer_module
from hf_sparse.training.data.data_args import DataArguments
from hf_sparse.training.data.hub_access import check_hub_resources, hub_reachable
from hf_sparse.training.data.tokenizer import load_tokenizer
from hf_sparse.training.config.run_args import ALIASES, MODEL_ARGUMENT_CLASSES, ConfigError, ScriptArguments
from hf_sparse.training.config.cli_help import HELP_SECTIONS, TRAINER_HELP_KEYS
from hf_sparse.training.config.run_config import parse_run_config
from tests.conftest import REPO_ROOT, assert_one_line_error, run_train_hf_script
from tests.test_train_hf import _write_config
from tests import processes  # noqa: E402

TRAIN_HF = os.path.join(REPO_ROOT, "train_hf.py")
TINY_MODEL = os.path.join(REPO_ROOT, "configs", "llama_tiny.json")


# --- --help -------------------------------------------------------------------------------------


def _all_run_keys():
    keys = [f.name for _, cls, _ in HELP_SECTIONS for f in dataclasses.fields(cls) if f.init]
    return keys + list(ALIASES) + list(TRAINER_HELP_KEYS)


def test_help_names_the_program_it_was_invoked_as(monkeypatch, capsys):
    import train_hf

    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/hf-sparse-train", "--help"])
    train_hf.cli()
    out = capsys.readouterr().out
    assert out.startswith("usage: hf-sparse-train CONFIG.json [--key value ...]\n")
    assert "       hf-sparse-train --help\n" in out


@pytest.mark.parametrize("where", ["alone", "short", "after_config", "after_missing_config"])
def test_help_lists_every_key_and_exits_0(tmp_path, monkeypatch, capsys, where):
    argv = {
        "alone": ["--help"],
        "short": ["-h"],
        "after_config": [_write_config(tmp_path), "--max_steps", "3", "--help"],
        "after_missing_config": [tmp_path / "missing.json", "-h"],
    }[where]
    assert run_train_hf_script(monkeypatch, *argv) in (None, 0)
    out = capsys.readouterr().out
    assert out.startswith("usage: train_hf.py CONFIG.json [--key value ...]")
    for title in ("model:", "2:4 activations:", "weight 2:4:", "low rank:", "data:", "script:", "trainer:"):
        assert f"\n{title}\n" in out, title
    for key in _all_run_keys():
        assert re.search(rf"^  {key} \(", out, re.M), key
    # Types, defaults and the help strings of the dataclasses (model defaults: SparseLlamaConfig's).
    assert "  activation_dense_warmup_steps (int, default 1000)" in out
    assert "  train_files (str | list[str], default null)" in out
    assert '  optimizer (str, default "adamw")' in out
    assert "  max_steps (int, default -1)" in out
    help_text = next(f for f in dataclasses.fields(ScriptArguments) if f.name == "nonfinite_policy").metadata["help"]
    assert " ".join(help_text.split()) in " ".join(out.split())
    assert "transformers.TrainingArguments" in out
    assert not (tmp_path / "run").exists()


def test_help_from_a_shell_exits_0():
    # transformers prints "[INFO] Running in WANDB offline mode" to stdout when its
    # integrations are imported under WANDB_MODE=offline; importing hf_sparse takes it out.
    env = dict(os.environ, WANDB_MODE="offline")
    proc = processes.run([sys.executable, TRAIN_HF, "--help"], cwd=REPO_ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: train_hf.py CONFIG.json") and "\nweight 2:4:\n" in proc.stdout, proc.stdout[
        :300
    ]
    assert "WANDB offline mode" not in proc.stdout + proc.stderr


def test_the_wandb_offline_banner_is_the_only_line_taken_out():
    """Whatever else transformers' integrations module prints on import still reaches stdout."""
    script = (
        "import builtins, sys\n"
        "real_print = builtins.print\n"
        "def chatty_print(*args, **kwargs):\n"
        "    real_print(*args, **kwargs)\n"
        "    if args == ('[INFO] Running in WANDB offline mode',):\n"
        "        real_print('another line of the import', **kwargs)\n"
        "builtins.print = chatty_print\n"
        "import hf_sparse\n"
        "builtins.print = real_print\n"
        "print('after import')\n"
    )
    env = dict(os.environ, WANDB_MODE="offline")
    proc = processes.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "another line of the import\nafter import\n", proc.stdout


def test_every_model_key_is_in_a_help_section():
    sections = {cls for _, cls, _ in HELP_SECTIONS}
    assert set(MODEL_ARGUMENT_CLASSES) <= sections


# --- one line per bad value, before anything is built or written ----------------------------------


def _model_file(tmp_path, **changes):
    with open(TINY_MODEL) as handle:
        model = json.load(handle)
    model.update(changes)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    return str(path)


BAD_VALUES = {
    "batch_size_0": (dict(per_device_train_batch_size=0), r"per_device_train_batch_size: 0 is not valid; use a posi"),
    "eval_batch_size_0": (dict(per_device_eval_batch_size=0), r"per_device_eval_batch_size: 0 .*positive integer"),
    "accumulation_0": (dict(gradient_accumulation_steps=0), r"gradient_accumulation_steps: 0 .*positive integer"),
    "logging_steps_0": (dict(logging_steps=0), r"logging_steps: 0 is not valid with logging_strategy='steps'"),
    "save_steps_0": (dict(save_steps=0), r"save_steps: 0 is not valid with save_strategy='steps'"),
    "negative_lr": (dict(learning_rate=-0.001), r"learning_rate: -0.001 is negative; use a positive value"),
    "max_steps_0": (dict(max_steps=0), r"max_steps: 0 is not valid; use a positive number .* -1 .*num_train_epochs"),
    "max_steps_-2": (dict(max_steps=-2), r"max_steps: -2 is not valid"),
    "kv_heads": (
        "kv_heads",
        r"num_key_value_heads: 3 in model_config .* does not divide num_attention_heads=4 .*"
        r"use one of 1, 2, 4\.",
    ),
    "heads": ("heads", r"num_attention_heads: 6 in model_config .* does not divide hidden_size=32 .*such as 4 or 8"),
    "trainer_cross_check": (
        dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="no"),
        r"load_best_model_at_end requires the save and eval strategy to match",
    ),
    # These three used to fail with a traceback once the data (and the model) were built.
    "seed_-1": (dict(seed=-1), r"seed: -1 is not valid; use an integer from 0 to 4294967295"),
    "data_seed_2**32": (
        dict(data_seed=2**32),
        r"data_seed: 4294967296 is not valid; use an integer from 0 to 4294967295",
    ),
    "empty_output_dir": (dict(output_dir=""), r"output_dir: '' is empty; give the folder the run writes to"),
    "empty_tokenizer_folder": (
        "tokenizer_folder",
        r"tokenizer_name: '.*no_tokenizer' is a folder without a tokenizer "
        r"in it \(none of tokenizer\.json, .*\); give a folder",
    ),
    "tokenizer_file": ("tokenizer_file", r"tokenizer_name: '.*tokenizer\.json' is a file; give the folder that holds"),
    "warmup_ratio": (
        dict(warmup_ratio=0.1),
        r"warmup_ratio: transformers 5 removed this key; give the ratio as "
        r"warmup_steps below 1",
    ),
    "loro_negative_decay": (
        dict(optimizer="loro_adamw", loro_scope="all", loro_attn_rank=4, loro_mlp_rank=4, weight_decay=-0.1),
        r"weight_decay: -0.1 is negative, which optimizer='loro_adamw' refuses",
    ),
}


@pytest.mark.parametrize("overrides, message", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_bad_value_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, overrides, message):
    if overrides == "kv_heads":
        overrides = dict(model_config=_model_file(tmp_path, num_key_value_heads=3))
    elif overrides == "heads":
        overrides = dict(model_config=_model_file(tmp_path, num_attention_heads=6))
    elif overrides == "tokenizer_folder":  # exists, holds something, but no tokenizer
        (tmp_path / "no_tokenizer").mkdir()
        (tmp_path / "no_tokenizer" / "notes.txt").write_text("the tokenizer is elsewhere")
        overrides = dict(tokenizer_name=str(tmp_path / "no_tokenizer"))
    elif overrides == "tokenizer_file":
        (tmp_path / "tokenizer.json").write_text("{}")
        overrides = dict(tokenizer_name=str(tmp_path / "tokenizer.json"))
    code = run_train_hf_script(monkeypatch, _write_config(tmp_path, **overrides))
    assert_one_line_error(code, capsys, message)
    assert not (tmp_path / "run").exists()


def test_max_steps_minus_1_and_logging_steps_0_without_step_logging_are_fine(tmp_path):
    run = parse_run_config(
        [_write_config(tmp_path, max_steps=-1, num_train_epochs=1, logging_steps=0, logging_strategy="epoch")]
    )
    assert run.training_args.max_steps == -1


@pytest.mark.parametrize("below", [False, True])
def test_output_dir_that_is_a_file(tmp_path, monkeypatch, capsys, below):
    existing = tmp_path / "run"
    existing.write_text("not a directory")
    output_dir = existing / "sub" if below else existing
    code = run_train_hf_script(monkeypatch, _write_config(tmp_path, output_dir=str(output_dir)))
    where = r"is below the file .*" if below else r"is an existing file"
    assert_one_line_error(code, capsys, rf"output_dir: .* {where}; output_dir must be a directory")
    assert existing.read_text() == "not a directory"  # untouched


# --- wandb without credentials ---------------------------------------------------------------------


@pytest.fixture
def wandb_without_credentials(tmp_path, monkeypatch):
    """No key anywhere wandb looks: environment, netrc, its settings files (global and the
    working directory's, which `wandb offline` writes)."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return tmp_path


def test_wandb_without_api_key_is_one_line(wandb_without_credentials, monkeypatch, capsys):
    tmp_path = wandb_without_credentials
    code = run_train_hf_script(monkeypatch, _write_config(tmp_path, report_to=["wandb"]))
    assert_one_line_error(code, capsys, r"report_to: 'wandb' needs a W&B API key .*wandb login.*WANDB_MODE=offline")
    assert not (tmp_path / "run").exists()


def test_wandb_is_fine_offline_or_logged_in(wandb_without_credentials, monkeypatch):
    tmp_path = wandb_without_credentials
    config = _write_config(tmp_path, report_to=["wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    parse_run_config([config])
    monkeypatch.delenv("WANDB_MODE")
    # `wandb offline` in this folder: the workspace settings file.
    (tmp_path / "cwd" / "wandb").mkdir()
    (tmp_path / "cwd" / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    parse_run_config([config])
    (tmp_path / "cwd" / "wandb" / "settings").unlink()
    # `wandb login`: the netrc entry for the W&B host.
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'0' * 40}\n")
    os.chmod(tmp_path / "netrc", 0o600)
    parse_run_config([config])
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    parse_run_config([config])


# --- hub resources that cannot be had ---------------------------------------------------------------


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty hub and datasets caches (the user's are never looked at); offline, as in conftest."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the hub check should have stopped the run before loading anything")

    # train_hf.py imports these when runpy runs it: a check that let the run through fails loudly.
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", must_not_load)
    monkeypatch.setattr(data_module, "build_datasets", must_not_load)
    return tmp_path


HUB_CASES = {
    "tokenizer": (
        dict(tokenizer_name="someone/uncached-tokenizer"),
        "tokenizer_name: 'someone/uncached-tokenizer'",
        "set tokenizer_name to a local tokenizer directory",
    ),
    "dataset": (
        dict(dataset_name="someone/uncached-corpus", dataset_config_name="en"),
        "dataset_name: 'someone/uncached-corpus'",
        "train on local files with train_files",
    ),
}


@pytest.mark.parametrize("overrides, named, alternative", list(HUB_CASES.values()), ids=list(HUB_CASES))
def test_hub_resource_offline_and_not_cached(empty_caches, monkeypatch, capsys, overrides, named, alternative):
    tmp_path = empty_caches
    monkeypatch.setattr(hub_access, "hub_reachable", lambda *a, **k: pytest.fail("offline: no probe"))
    start = time.perf_counter()
    code = run_train_hf_script(monkeypatch, _write_config(tmp_path, **overrides))
    assert_one_line_error(
        code,
        capsys,
        re.escape(named) + r" is a Hugging Face Hub repo, the hub is unreachable \(offline mode: HF_HUB_OFFLINE=1\), "
        r"and the local cache .* has no copy of it; download it once .*HF_HUB_OFFLINE=1.*, or " + alternative,
    )
    assert time.perf_counter() - start < 10  # no retries
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, named, alternative", list(HUB_CASES.values()), ids=list(HUB_CASES))
def test_hub_resource_unreachable_hub_probed_once(empty_caches, monkeypatch, capsys, overrides, named, alternative):
    """Outside offline mode a failing connectivity probe (replaced here: no network in tests)
    stops the run at once, instead of about a minute of retries."""
    import datasets.config
    from huggingface_hub import constants

    tmp_path = empty_caches
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    probes = []
    monkeypatch.setattr(hub_access, "hub_reachable", lambda *a, **k: probes.append(1) or False)
    code = run_train_hf_script(monkeypatch, _write_config(tmp_path, **overrides))
    assert_one_line_error(
        code,
        capsys,
        re.escape(named) + r" is a Hugging Face Hub repo, the hub \(https://.*\) is unreachable "
        r"\(no answer within 3 s\), "
        r".*then HF_HUB_OFFLINE=1 uses the cached copy.*, or " + alternative,
    )
    assert probes == [1]
    assert not (tmp_path / "run").exists()
    # Both named and both missing: still one probe.
    probes.clear()
    with pytest.raises(ValueError, match=r"^tokenizer_name: "):
        check_hub_resources(
            DataArguments(tokenizer_name="someone/uncached-tokenizer", dataset_name="someone/uncached-corpus")
        )
    assert probes == [1]


def test_neither_path_nor_repo_id(empty_caches, monkeypatch, capsys):
    code = run_train_hf_script(monkeypatch, _write_config(empty_caches, tokenizer_name="./no/such/tokenizer"))
    assert_one_line_error(code, capsys, r"tokenizer_name: './no/such/tokenizer' is neither an existing local path nor")


def _cache_tiny_tokenizer(hub_cache, repo_id):
    """A hub-cache snapshot of a tiny tokenizer, laid out as huggingface_hub writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<eos>": 0, "<pad>": 1, "alpha": 2, "beta": 3}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_cached_hub_resources_pass_offline(empty_caches, monkeypatch):
    """A copy in the local cache is enough offline: the check lets it through (no probe) and
    the tokenizer loads from the cache."""
    tmp_path = empty_caches
    monkeypatch.setattr(hub_access, "hub_reachable", lambda *a, **k: pytest.fail("cached: no probe"))
    _cache_tiny_tokenizer(tmp_path / "hub_cache", "someone/tiny-tokenizer")
    # datasets' prepared copy: <cache>/<org>___<name, CamelCase to snake_case>/<config>/<version>/<hash>
    (tmp_path / "datasets_cache" / "someone___tiny_corpus" / "en" / "0.0.0" / "abc123").mkdir(parents=True)
    args = DataArguments(
        tokenizer_name="someone/tiny-tokenizer", dataset_name="someone/TinyCorpus", dataset_config_name="en"
    )
    check_hub_resources(args)
    tokenizer = load_tokenizer("someone/tiny-tokenizer", 16)  # the real one (the fixture guards train_hf's)
    assert tokenizer("alpha beta").input_ids == [2, 3]
    with pytest.raises(ValueError, match=r"dataset_name: 'someone/TinyCorpus' .*has no copy"):
        check_hub_resources(DataArguments(dataset_name="someone/TinyCorpus", dataset_config_name="fr"))


def test_local_paths_and_builders_are_not_hub_resources(empty_caches, monkeypatch):
    monkeypatch.setattr(hub_access, "hub_reachable", lambda *a, **k: pytest.fail("local: no probe"))
    (empty_caches / "tok").mkdir()
    check_hub_resources(DataArguments(tokenizer_name=str(empty_caches / "tok"), dataset_name=str(empty_caches)))
    check_hub_resources(DataArguments(dataset_name="json"))


def test_probe_is_bounded_and_never_raises(monkeypatch):
    """hub_reachable answers False on any failure, and within its timeout even when the
    request hangs (as name resolution can)."""
    import huggingface_hub

    class Hanging:
        def head(self, *args, **kwargs):
            time.sleep(30)

    class Failing:
        def head(self, *args, **kwargs):
            raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "get_session", Hanging)
    start = time.perf_counter()
    assert hub_reachable(timeout=0.2) is False
    assert time.perf_counter() - start < 3
    monkeypatch.setattr(huggingface_hub, "get_session", Failing)
    assert hub_reachable(timeout=0.2) is False


# --- a single path where a list of paths is expected -----------------------------------------------


def test_single_path_in_json_and_on_the_command_line(tmp_path):
    train = tmp_path / "train.jsonl"
    valid = tmp_path / "valid.jsonl"
    for path in (train, valid):
        path.write_text(json.dumps({"text": "alpha beta gamma"}) + "\n")
    run = parse_run_config([_write_config(tmp_path, train_files=str(train), validation_files=str(valid))])
    assert (run.data_args.train_files, run.data_args.validation_files) == ([str(train)], [str(valid)])
    run = parse_run_config([_write_config(tmp_path), "--train_files", str(train), "--validation_files", str(valid)])
    assert (run.data_args.train_files, run.data_args.validation_files) == ([str(train)], [str(valid)])
    run = parse_run_config([_write_config(tmp_path), "--train_files", json.dumps([str(train), str(valid)])])
    assert run.data_args.train_files == [str(train), str(valid)]
    with pytest.raises(ConfigError, match=r"train_files: expected list\[str\] \| None, got 3 \(int\)"):
        parse_run_config([_write_config(tmp_path, train_files=3)])


def test_ddp_does_not_search_for_unused_parameters_unless_asked(tmp_path):
    # No sparse_llama mode leaves a parameter unused; DDP's default search (and the paragraph
    # it prints on every rank) is off unless the run JSON asks for it.
    assert parse_run_config([_write_config(tmp_path)]).training_args.ddp_find_unused_parameters is False
    asked = parse_run_config([_write_config(tmp_path, ddp_find_unused_parameters=True)])
    assert asked.training_args.ddp_find_unused_parameters is True
