"""Downstream evaluation with lm-evaluation-harness: the in-loop callback's scores reach
every backend in the loss rows, the shipped offline tasks, hf-sparse-eval on a run and its
export (identical per-sample log-likelihoods), and the clean failure without the extra."""

import glob
import json
import logging
import math
import os
import re
import sys

import pytest
import torch

import train_hf
from hf_sparse.training.callbacks.lm_eval import LmEvalCallback
from hf_sparse.training.lm_eval_integration import evaluate_model, flatten_results
from hf_sparse.training.config.run_args import ConfigError
from tests.conftest import REPO_ROOT, help_as_invoked, tiny_config
from tests import processes  # noqa: E402

TASKS = ["hf_sparse_local"]  # the tag of both shipped tasks
EXPECTED_KEYS = {
    "lm_eval/hf_sparse_nextline/acc", "lm_eval/hf_sparse_nextline/acc_norm",
    "lm_eval/hf_sparse_heldout/bits_per_byte", "lm_eval/hf_sparse_heldout/byte_perplexity",
    "lm_eval/hf_sparse_heldout/word_perplexity",
}  # fmt: skip


def _model_json(tmp_path):
    """llama_tiny.json without max_position_embeddings: the run's block size decides it."""
    with open(os.path.join(REPO_ROOT, "configs", "llama_tiny.json")) as handle:
        model = json.load(handle)
    del model["max_position_embeddings"]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    return str(path)


def _run_json(tmp_path, **overrides):
    config = {
        "model_config": _model_json(tmp_path), "squ_relu": "relu2", "wandb_sparsityrelu": True, "max_length": 64,
        "output_dir": str(tmp_path / "run"), "max_steps": 4, "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8, "logging_steps": 3, "eval_strategy": "no", "max_eval_samples": 8,
        "save_strategy": "steps", "save_steps": 2, "report_to": [], "disable_tqdm": True,
        "lm_eval_tasks": TASKS, "lm_eval_limit": 2, "lm_eval_steps": 2,
        **overrides,
    }  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny run with in-loop lm-eval every 2 steps (logging every 3), to wandb (offline)
    and TensorBoard: (run folder, metrics, wandb rows, TensorBoard accumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.wandb_offline import wait_for_rows

    tmp_path = tmp_path_factory.mktemp("lm_eval_run")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(tmp_path))
    mp.setenv("WANDB_PROJECT", "hf_sparse_tests")
    try:
        metrics = train_hf.main([_run_json(tmp_path, report_to=["wandb", "tensorboard"])])
        import wandb

        run_dir = os.path.dirname(wandb.run.dir)
        wandb.finish()
    finally:
        mp.undo()
    rows = wait_for_rows(run_dir, lambda r: "train/loss" in r, expected=3)
    events = glob.glob(str(tmp_path / "run" / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    accumulator = EventAccumulator(os.path.dirname(sorted(events)[0]))
    accumulator.Reload()
    return tmp_path / "run", metrics, rows, accumulator


def test_scores_land_in_the_loss_rows_of_every_backend(finished_run):
    run, metrics, wandb_rows, tensorboard = finished_run
    state = json.loads((run / "trainer_state.json").read_text())
    loss_rows = [row for row in state["log_history"] if "loss" in row]
    # Step 2 is not a logging step (logging_steps=3): the callback asked for a row there.
    assert [row["step"] for row in loss_rows] == [2, 3, 4]
    for row in loss_rows:
        scores = {k: v for k, v in row.items() if k.startswith("lm_eval/")}
        assert set(scores) == (EXPECTED_KEYS if row["step"] in (2, 4) else set()), row["step"]
        assert all(math.isfinite(v) for v in scores.values())
        assert ("sparsity_relu/layer_0" in row) and 0 <= scores.get("lm_eval/hf_sparse_nextline/acc", 0) <= 1
    # wandb and TensorBoard: in the rows (steps) of train/loss, under train/.
    assert [r["train/global_step"] for r in wandb_rows] == [2, 3, 4]
    assert {k for k in wandb_rows[0] if k.startswith("train/lm_eval/")} == {f"train/{k}" for k in EXPECTED_KEYS}
    assert wandb_rows[2]["train/lm_eval/hf_sparse_heldout/bits_per_byte"] == pytest.approx(
        loss_rows[2]["lm_eval/hf_sparse_heldout/bits_per_byte"]
    )
    for key in EXPECTED_KEYS:
        assert [e.step for e in tensorboard.Scalars(f"train/{key}")] == [2, 4], key
    # The final scores: all_results.json and the model card's model-index.
    results = json.loads((run / "all_results.json").read_text())
    assert (
        {k: results[k] for k in EXPECTED_KEYS}
        == {k: loss_rows[2][k] for k in EXPECTED_KEYS}
        == {k: metrics[k] for k in EXPECTED_KEYS}
    )
    from huggingface_hub import ModelCard

    index = ModelCard.load(str(run / "README.md")).data.eval_results
    downstream = {(r.dataset_name, r.metric_type): r.metric_value for r in index if r.task_name.startswith("lm-eval")}
    assert downstream == {tuple(k.split("/")[1:]): results[k] for k in EXPECTED_KEYS}


def test_saved_run_is_consistent_for_evaluation_tools(finished_run):
    run, *_ = finished_run
    config = json.loads((run / "config.json").read_text())
    tokenizer = json.loads((run / "tokenizer_config.json").read_text())
    generation = json.loads((run / "generation_config.json").read_text())
    # The model JSON set no max_position_embeddings: the trained block (64) is the context.
    assert config["max_position_embeddings"] == tokenizer["model_max_length"] == 64
    assert config["use_cache"] is True and generation["use_cache"] is True
    checkpoint = json.loads((run / "checkpoint-2" / "config.json").read_text())
    assert checkpoint["use_cache"] is True
    for saved in (tokenizer, json.loads((run / "checkpoint-2" / "tokenizer_config.json").read_text())):
        assert not {"local_files_only", "is_local"} & set(saved)


def test_run_folder_and_its_stock_export_give_identical_per_sample_loglikelihoods(finished_run, tmp_path):
    from hf_sparse.eval import evaluate_folder, lm_eval_settings
    from hf_sparse.export import export_model

    run, metrics, *_ = finished_run
    export = tmp_path / "export"
    export_model(str(run), str(export))
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"  # relu2 -> stock llama
    assert lm_eval_settings(str(run))["trust_remote_code"] is True and "trust_remote_code" not in lm_eval_settings(
        str(export)
    )
    outputs = [evaluate_folder(str(path), TASKS, limit=2, device="cpu", log_samples=True) for path in (run, export)]
    for task in ("hf_sparse_nextline", "hf_sparse_heldout"):
        run_samples, export_samples = (out["samples"][task] for out in outputs)
        assert len(run_samples) == len(export_samples) == 2
        for a, b in zip(run_samples, export_samples):
            assert a["doc_id"] == b["doc_id"] and a["resps"] == b["resps"]
    # The same scores as the in-loop evaluation of the final step.
    offline = flatten_results(outputs[0]["results"])
    assert {k: offline[k] for k in EXPECTED_KEYS} == pytest.approx({k: metrics[k] for k in EXPECTED_KEYS})


def test_evaluation_forwards_are_not_counted_and_training_is_undisturbed():
    """Telemetry counts training forwards only; lm-eval's eval-mode forwards leave the
    counts, the train mode and every random generator as they were."""
    from hf_sparse import SparseLlamaForCausalLM
    from hf_sparse.model.modeling_sparse_llama import ensure_activation_stats
    from hf_sparse.training.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None, vocab_size=512)
    model = SparseLlamaForCausalLM(tiny_config(vocab_size=512, max_position_embeddings=64)).train()
    ensure_activation_stats(model, torch.device("cpu"))
    model(torch.randint(0, 512, (2, 16)))
    stats = {name: buf.clone() for name, buf in model.named_buffers() if buf.dtype != torch.bool}
    rng = torch.random.get_rng_state()
    scores = evaluate_model(model, tokenizer, ["hf_sparse_nextline"], limit=2, max_length=64)
    assert set(scores) == {"lm_eval/hf_sparse_nextline/acc", "lm_eval/hf_sparse_nextline/acc_norm"}
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)
    after = dict(model.named_buffers())
    assert all(torch.equal(after[name], value) for name, value in stats.items())
    assert any(value.abs().sum() > 0 for value in stats.values())  # there were counts to keep


def test_lm_eval_sees_sparse_llama_as_a_causal_lm(caplog):
    from lm_eval.models.huggingface import HFLM

    from hf_sparse import SparseLlamaForCausalLM
    from hf_sparse.training.data.tokenizer import load_tokenizer

    model = SparseLlamaForCausalLM(tiny_config(vocab_size=512))
    with caplog.at_level("WARNING"):
        lm = HFLM(pretrained=model, tokenizer=load_tokenizer(None, vocab_size=512))
    assert lm.backend == "causal"
    assert "neither marked as CausalLM" not in caplog.text


def test_flatten_results_names():
    results = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 3},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5},
    }
    assert flatten_results(results) == {
        "lm_eval/arc_easy/acc": 0.5,
        "lm_eval/gsm8k/exact_match/strict-match": 0.25,
        "lm_eval/gsm8k/exact_match/flexible-extract": 0.5,
    }


def test_shipped_task_data_comes_from_held_out_documents(tmp_path, monkeypatch):
    """The generator reads only the corpus's validation documents; the committed data is
    well formed and was generated from a corpus recorded in data_info.json."""
    from hf_sparse.eval_tasks import TASKS_DIR, build_data

    validation = ["\n".join(f"    value_{d}_{i} = compute({i})" for i in range(40)) for d in range(4)]
    monkeypatch.setattr(
        build_data, "embedded_corpus", lambda: (["    training_line = 'never used'\n" * 50], validation)
    )
    monkeypatch.setattr(build_data, "embedded_corpus_fingerprint", lambda: "test")
    info = build_data.main(str(tmp_path))
    assert info["nextline_items"] > 0 and info["heldout_chunks"] > 0
    text = (tmp_path / "nextline.jsonl").read_text() + (tmp_path / "heldout.jsonl").read_text()
    assert "training_line" not in text
    for path in (tmp_path, TASKS_DIR):
        items = [json.loads(line) for line in open(os.path.join(path, "nextline.jsonl"))]
        for item in items:
            assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
            true = item["choices"][item["label"]]
            assert any(true in doc and item["context"] in doc for doc in validation) or path == TASKS_DIR
    shipped = json.loads(open(os.path.join(TASKS_DIR, "data_info.json")).read())
    assert shipped["nextline_items"] == 300 and shipped["heldout_chunks"] == 60 and shipped["corpus_fingerprint"]


BAD_LM_EVAL = [
    (dict(lm_eval_limit=0), r"lm_eval_limit: 0 is not valid; use a positive integer"),
    (dict(lm_eval_steps=-1), r"lm_eval_steps: -1 is not valid"),
    (dict(lm_eval_tasks=[]), r"lm_eval_tasks: \[\] is not valid"),
    (dict(lm_eval_include_path="/no/such/tasks"), r"lm_eval_include_path: '/no/such/tasks' does not exist"),
    (
        dict(lm_eval_steps=None),
        r"lm_eval_tasks runs at each evaluation unless lm_eval_steps is set, and eval_strategy is 'no'",
    ),
    (dict(lm_eval_tasks=None), r"lm_eval_limit is set but lm_eval_tasks is not"),
    (
        dict(lm_eval_tasks=["hellaswagg"]),
        r"lm_eval_tasks: 'hellaswagg' is not an lm-eval task.*Did you mean 'hellaswag'",
    ),
    # A hub task whose dataset is not cached, in offline mode (the tests run offline).
    (
        dict(lm_eval_tasks=["hellaswag"]),
        r"task 'hellaswag' reads the hub dataset 'Rowan/hellaswag', the hub is unreachable "
        r"\(offline mode: HF_HUB_OFFLINE=1\)",
    ),
]


@pytest.mark.parametrize("overrides, message", BAD_LM_EVAL)
def test_bad_lm_eval_keys_fail_up_front_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        train_hf.main([_run_json(tmp_path, **overrides)])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_without_the_extra_one_line_and_the_quickstart_does_not_need_it(tmp_path):
    """lm-eval hidden (as if not installed): the lm_eval keys and hf-sparse-eval fail with
    one line naming the extra; the quickstart config parses and its callbacks build."""
    script = (
        "import sys\n"
        "sys.modules['lm_eval'] = None  # import lm_eval now raises ImportError\n"
        "import train_hf\n"
        "from hf_sparse.training.config.run_args import ConfigError\n"
        "from hf_sparse.training.config.run_config import parse_run_config\n"
        "run = parse_run_config(['configs/quickstart.json', '--output_dir', sys.argv[2]])\n"
        "assert run.eval_args.lm_eval_tasks is None\n"
        "try:\n"
        "    parse_run_config([sys.argv[1]])\n"
        "except ConfigError as err:\n"
        "    print('CONFIG:', err)\n"
        "from hf_sparse.eval import main\n"
        "assert main(['configs', '--tasks', 'hf_sparse_local']) == 2\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = processes.run(
        [sys.executable, "-c", script, _run_json(tmp_path), str(tmp_path / "quick")],
        cwd=REPO_ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = (
        "lm_eval_tasks needs lm-evaluation-harness, which is not installed; install the extra: "
        "pip install 'hf_sparse[eval]' (or pip install lm-eval==0.4.13)."
    )
    assert f"CONFIG: {expected}" in proc.stdout.splitlines()
    assert "hf-sparse-eval: error: hf-sparse-eval needs lm-evaluation-harness" in proc.stderr


# Two processes (rank 0 evaluates, the other waits in the broadcast of its scores; a failure
# on rank 0 reaches every rank): tests/test_distributed.py, exit path "lm_eval_error".


def test_tasks_from_the_command_line(tmp_path):
    from hf_sparse.training.config.run_config import parse_run_config

    run = parse_run_config([_run_json(tmp_path), "--lm_eval_tasks", "hf_sparse_nextline, hf_sparse_heldout"])
    assert run.eval_args.lm_eval_tasks == ["hf_sparse_nextline", "hf_sparse_heldout"]


def test_a_coming_evaluation_gets_a_loss_row():
    """Without lm_eval_steps the scores follow the Trainer's evaluations; at such a step the
    callback (which runs before DefaultFlowCallback) asks for a log row with the loss."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="unused", eval_strategy="steps", eval_steps=2, logging_steps=3, report_to=[])
    callback = LmEvalCallback(TASKS)
    wanted = {}
    for step in (1, 2, 3, 4):
        state = TrainerState(global_step=step, max_steps=5, eval_steps=2, logging_steps=3)
        control = TrainerControl()
        callback.on_step_end(args, state, control)
        wanted[step] = control.should_log and not control.should_evaluate  # asks for a row, decides nothing else
    assert wanted == {1: False, 2: True, 3: False, 4: True}


def test_callback_refuses_sharded_training(monkeypatch):
    from hf_sparse.training.lm_eval_integration import sharded_training_reason

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharded_training_reason(object()) == "FSDP"
    callback = LmEvalCallback(TASKS)
    with pytest.raises(RuntimeError, match="FSDP shards"):
        callback.on_train_begin(type("Args", (), {"fsdp": ""})(), None, None)


# --- what the user sees ---------------------------------------------------------------------


def _saved_tiny_model(folder):
    """A saved sparse_llama folder with the embedded tokenizer and a 64-token context."""
    from hf_sparse import SparseLlamaForCausalLM
    from hf_sparse.training.data.tokenizer import load_tokenizer

    SparseLlamaForCausalLM(tiny_config(vocab_size=512, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer = load_tokenizer(None, vocab_size=512)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_in_loop_evaluations_leave_out_lm_evals_per_item_and_per_task_chatter(caplog, monkeypatch):
    """Every nextline item is longer than 64 tokens and each shipped task has a custom
    loader: lm-eval warned per item ("Truncating N tokens from the left") and per task
    ("<task>: Custom kwargs can be passed ...", two lines) at every evaluation. The cut is
    said once, as a count; other warnings still pass."""
    import hf_sparse.training.lm_eval_integration as callback_module
    from hf_sparse import SparseLlamaForCausalLM
    from hf_sparse.training.lm_eval_integration import quiet_lm_eval
    from hf_sparse.training.data.tokenizer import load_tokenizer

    monkeypatch.setattr(callback_module, "_truncation_said", False)
    tokenizer = load_tokenizer(None, vocab_size=512)
    model = SparseLlamaForCausalLM(tiny_config(vocab_size=512, max_position_embeddings=64))
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            scores = evaluate_model(model, tokenizer, TASKS, limit=2, max_length=64)
            assert set(scores) == EXPECTED_KEYS
        with quiet_lm_eval():
            logging.getLogger("lm_eval.models.huggingface").warning("a real problem")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Truncating" in m or "Custom kwargs" in m or "--metadata" in m], messages
    said = [m for m in messages if m.startswith("lm-eval cut ")]
    assert len(said) == 1 and re.match(r"lm-eval cut \d+ items longer than max_length to their last max_length "
                                       r"tokens", said[0]), said  # fmt: skip
    assert "a real problem" in messages


def test_hf_sparse_eval_names_itself_and_git_stays_quiet(tmp_path, monkeypatch, capfd, caplog):
    """lm-eval's simple_evaluate runs `git describe` for its report, whose "fatal: not a git
    repository" reached the terminal outside a repository."""
    from hf_sparse.eval import main

    folder = _saved_tiny_model(tmp_path / "model")
    elsewhere = tmp_path / "not_a_repository"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capfd.readouterr()  # what saving the model printed
    for prog, out in help_as_invoked(monkeypatch, capfd, main, "hf-sparse-eval", "hf_sparse.eval").items():
        assert out.startswith(f"usage: {prog} [-h] --tasks TASKS"), out
    with caplog.at_level(logging.INFO):
        assert main([folder, "--tasks", "hf_sparse_nextline", "--limit", "2", "--device", "cpu"]) == 0
    captured = capfd.readouterr()
    assert "fatal: not a git repository" not in captured.err + captured.out
    assert "same as: lm_eval --model hf" in caplog.text and "hf_sparse_nextline" in caplog.text and "acc" in caplog.text
    assert "Custom kwargs" not in caplog.text + captured.err


def test_fp16_on_cpu_evaluates_like_it_trains(monkeypatch):
    """accelerate ignores fp16 on CPU (the run trains in float32): lm-eval must not autocast
    to float16 there either; bf16 autocasts in both."""
    import hf_sparse.training.callbacks.lm_eval as callback_module
    from tests.conftest import tiny_training_args

    seen = []
    monkeypatch.setattr(callback_module, "evaluate_model",
                        lambda *a, mixed_precision_dtype=None, **k: seen.append(mixed_precision_dtype) or {})  # fmt: skip
    for flag in ("fp16", "bf16"):
        args = tiny_training_args("unused", **{flag: True})
        LmEvalCallback(["hf_sparse_nextline"], tokenizer=object()).evaluate(None, args)
    assert seen == [None, torch.bfloat16]
