"""The resolved run JSON in every checkpoint (run_config.json): written before the checkpoint
counts as complete, equal to the run's resolved config, the source of the resume warnings;
a checkpoint without it, or with an unreadable one, still resumes with one line."""

import ast
import json
import logging
import os
import shutil
import sys

import pytest
from transformers.trainer_callback import TrainerState

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
import train_hf  # noqa: E402
from hf_sparse.training.config import resume_check  # noqa: E402
from hf_sparse.training.config.run_config import parse_run_config  # noqa: E402
from hf_sparse.training.config.run_record import (  # noqa: E402
    RUN_CONFIG_NAME,
    dump_run_config,
    read_run_config,
    resolved_run_config,
)
from tests.test_resume_warnings import BASE as WARNINGS_BASE  # noqa: E402
from tests.test_resume_warnings import _Recorder  # noqa: E402

# The resume-warnings run (4 cosine steps) with a checkpoint every 2 steps (checkpoint-2
# periodic, checkpoint-4 the last), 2:4 activations after 2 dense steps and no evaluation.
BASE = {
    **WARNINGS_BASE, "activation_2by4": True, "activation_dense_warmup_steps": 2, "eval_strategy": "no",
    "save_steps": 2, "report_to": [],
}  # fmt: skip
SKIPPED = "comparison skipped"


def _config(folder, name, **overrides) -> str:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({**BASE, "output_dir": str(folder / name), **overrides}))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, the record the parsed config resolves to, [(trainer_state.json path,
    run_config.json there then?)])."""
    folder = tmp_path_factory.mktemp("run_record")
    config = _config(folder, "base")
    expected = json.loads(dump_run_config(resolved_run_config(parse_run_config([config]))))
    marker_writes = []
    original = TrainerState.save_to_json

    def spy(self, json_path):
        checkpoint = os.path.dirname(json_path)
        marker_writes.append((json_path, os.path.isfile(os.path.join(checkpoint, RUN_CONFIG_NAME))))
        return original(self, json_path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainerState, "save_to_json", spy)
        train_hf.main([config])
    return folder, expected, marker_writes


def _checkpoint_copy(trained, tmp_path, step=4) -> str:
    folder, _, _ = trained
    copy = tmp_path / "run" / f"checkpoint-{step}"
    shutil.copytree(folder / "base" / f"checkpoint-{step}", copy)
    return str(copy)


# --- written with every checkpoint ----------------------------------------------------------


def test_every_checkpoint_carries_the_resolved_run_json(trained):
    folder, expected, _ = trained
    for step in (2, 4):  # periodic and last
        checkpoint = folder / "base" / f"checkpoint-{step}"
        text = (checkpoint / RUN_CONFIG_NAME).read_text()
        record = json.loads(text)
        assert record == expected, step
        assert text == dump_run_config(record)  # stable: sorted keys, one format
        assert not (checkpoint / (RUN_CONFIG_NAME + ".tmp")).exists()
    assert (record["format"], record["version"]) == ("hf_sparse.run_config", 1)
    run = record["run"]
    # TrainingArguments after defaults (enums as values), the script and data keys, and the
    # model keys as the model config resolved them (activation_2by4 from the run JSON,
    # permute_2by4 from SparseLlamaConfig's default).
    assert (run["learning_rate"], run["lr_scheduler_type"], run["max_steps"], run["save_steps"]) == (
        0.003, "cosine", 4, 2)  # fmt: skip
    assert (run["adam_beta2"], run["optimizer"], run["max_length"]) == (0.999, "adamw", 32)
    assert (run["squ_relu"], run["activation_2by4"], run["permute_2by4"]) == ("relu2", True, True)
    assert run["model_config"] == BASE["model_config"]
    assert record["launch"]["world_size"] == 1


def test_the_run_json_is_in_place_before_the_checkpoint_counts_as_complete(trained):
    _, _, marker_writes = trained
    in_checkpoints = [(path, present) for path, present in marker_writes if "checkpoint-" in path]
    assert [os.path.basename(os.path.dirname(p)) for p, _ in in_checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert all(present for _, present in in_checkpoints), in_checkpoints


def test_resume_check_reads_no_pickle():
    with open(resume_check.__file__, encoding="utf-8") as handle:
        source = handle.read()
    tree = ast.parse(source)
    imported, strings = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value != ast.get_docstring(tree, clean=False)
        ):
            strings.append(node.value)
    assert not imported & {"pickle", "zipfile", "io"}, imported
    assert not [text for text in strings if "training_args.bin" in text]  # no file name to open
    assert not hasattr(resume_check, "_InertUnpickler") and not hasattr(resume_check, "_StandIn")


# --- the warnings come from the JSON --------------------------------------------------------


def _warnings_for(trained, checkpoint, **overrides) -> list[str]:
    folder, _, _ = trained
    run = parse_run_config([_config(folder, "probe", resume_from_checkpoint=checkpoint, **overrides)])
    return resume_check.warn_on_resume_changes(checkpoint, run.training_args, run.script_args)


def test_a_changed_key_warns_as_before_from_the_json(trained, tmp_path):
    checkpoint = _checkpoint_copy(trained, tmp_path)
    os.remove(os.path.join(checkpoint, "training_args.bin"))  # the JSON alone says it
    (lr,) = _warnings_for(trained, checkpoint, learning_rate=0.01)
    assert lr.startswith("resume: learning_rate changed 0.003 → 0.01 since checkpoint-4 (step 4): it has no effect")
    accumulation = _warnings_for(trained, checkpoint, gradient_accumulation_steps=2)
    assert [m.split(" since")[0] for m in accumulation] == ["resume: gradient_accumulation_steps changed 1 → 2"]
    assert "8 sequences instead of 4" in accumulation[0]
    warmup = _warnings_for(trained, checkpoint, warmup_steps=1)
    assert [m.split(" since")[0] for m in warmup] == ["resume: warmup_steps changed 0 → 1"]

    # What the file says is what is compared.
    path = os.path.join(checkpoint, RUN_CONFIG_NAME)
    record = read_run_config(checkpoint)
    record["run"]["learning_rate"] = 0.002
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(dump_run_config(record))
    (lr,) = _warnings_for(trained, checkpoint)
    assert "learning_rate changed 0.002 → 0.003" in lr


# --- checkpoints without a readable JSON still resume ----------------------------------------

CORRUPT = {
    "truncated": lambda text: text[: len(text) // 2],
    "not_an_object": lambda text: "[1, 2]\n",
    "another_format": lambda text: json.dumps({"run": {}}),
    "a_future_version": lambda text: text.replace('"version": 1', '"version": 2'),
    "a_wrong_type": lambda text: text.replace('"learning_rate": 0.003', '"learning_rate": "fast"'),
    "a_run_that_is_no_object": lambda text: json.dumps({**json.loads(text), "run": [1]}),
}
REASONS = {
    "truncated": "invalid JSON at line", "not_an_object": "not an hf_sparse run record",
    "another_format": "not an hf_sparse run record", "a_future_version": "version 2; this hf_sparse reads version 1",
    "a_wrong_type": "run.learning_rate is 'fast'", "a_run_that_is_no_object": "its 'run' is not an object",
}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(CORRUPT))
def test_an_unreadable_json_gives_one_line_and_the_rest_is_still_compared(trained, tmp_path, damage, caplog):
    checkpoint = _checkpoint_copy(trained, tmp_path)
    path = os.path.join(checkpoint, RUN_CONFIG_NAME)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(CORRUPT[damage](text))
    with caplog.at_level(logging.WARNING, logger=resume_check.__name__):
        messages = _warnings_for(trained, checkpoint, learning_rate=0.01, max_steps=6)
    lines = [r.getMessage() for r in caplog.records if SKIPPED in r.getMessage()]
    assert len(lines) == 1, caplog.records
    assert lines[0].startswith(f"resume: {path} is unreadable ({REASONS[damage]}")
    # The learning rate is not known, so not compared; max_steps is, from trainer_state.json.
    assert [m.split(" changed")[0] for m in messages] == ["resume: max_steps"]


def _resume(trained, tmp_path, checkpoint) -> tuple[list[str], dict]:
    recorder = _Recorder()
    source = logging.getLogger(resume_check.__name__)
    source.addHandler(recorder)
    try:
        train_hf.main([_config(tmp_path, "run", resume_from_checkpoint=checkpoint)])
    finally:
        source.removeHandler(recorder)
    with open(tmp_path / "run" / "trainer_state.json") as handle:
        return recorder.messages, json.load(handle)


def test_a_checkpoint_without_the_json_resumes_with_one_line(trained, tmp_path):
    checkpoint = _checkpoint_copy(trained, tmp_path, step=2)  # as written before run_config.json existed
    os.remove(os.path.join(checkpoint, RUN_CONFIG_NAME))
    messages, state = _resume(trained, tmp_path, checkpoint)
    assert messages == [
        (
            f"resume: {checkpoint} has no {RUN_CONFIG_NAME} (written before hf_sparse kept the run's settings in each "
            "checkpoint): its learning rate, schedule, warm-up and gradient accumulation are not compared with this "
            "run's (comparison skipped; max_steps, the batch size and the world size still are, from "
            "trainer_state.json and the RNG files)"
        )
    ]
    assert state["global_step"] == 4
    # The resumed run's own checkpoint carries it again.
    assert read_run_config(str(tmp_path / "run" / "checkpoint-4"))["run"]["learning_rate"] == 0.003


def test_a_checkpoint_with_a_corrupt_json_resumes_with_one_line(trained, tmp_path):
    checkpoint = _checkpoint_copy(trained, tmp_path, step=2)
    path = os.path.join(checkpoint, RUN_CONFIG_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"format": "hf_sparse.run_config", "vers')  # a file cut short
    messages, state = _resume(trained, tmp_path, checkpoint)
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"resume: {path} is unreadable (invalid JSON at line 1, column ")
    assert SKIPPED in messages[0]
    assert state["global_step"] == 4
