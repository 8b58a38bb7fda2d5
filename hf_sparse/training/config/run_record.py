"""The resolved run JSON that every checkpoint carries (`run_config.json`), so a resume can
compare the checkpoint's settings with its own by reading JSON.

    {"format": "hf_sparse.run_config", "version": 1,
     "run": {every run key -> the value the run used, after defaults and resolution},
     "launch": {"world_size": 2, "n_gpu": 1}}

`run` is flat, like the run JSON: `TrainingArguments.to_dict()` (enums as their values,
tokens masked) with the data, script and lm-eval keys, and the model keys as the resolved
model config holds them (`model_config`: the model JSON's path as given). `launch`: what the
launcher decided (not a run key). Keys are sorted, so two files diff line by line.

`RunRecordCallback` writes it into `checkpoint-N` when the step's save is decided, before the
Trainer writes anything there, so `trainer_state.json` (the completion marker, see
callbacks/checkpoints.py) always lands after it; `on_save` is the backstop for saves decided
inside the Trainer (save_strategy "best"), which then get it right after the marker.
"""

from __future__ import annotations

import dataclasses
import json
import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .run_args import MODEL_ARGUMENT_CLASSES

RUN_CONFIG_NAME = "run_config.json"
RUN_CONFIG_FORMAT = "hf_sparse.run_config"
RUN_CONFIG_VERSION = 1


def resolved_run_config(run) -> dict:
    """The record of a parsed run (a `RunConfig`)."""
    args = run.training_args
    keys = dict(args.to_dict())
    for part in (run.data_args, run.script_args, run.eval_args):
        keys.update(dataclasses.asdict(part))
    for cls in MODEL_ARGUMENT_CLASSES:
        for field in dataclasses.fields(cls):
            if field.name != "model_config":
                keys[field.name] = getattr(run.model_config, field.name, None)
    keys["model_config"] = run.raw.get("model_config")
    return {
        "format": RUN_CONFIG_FORMAT,
        "version": RUN_CONFIG_VERSION,
        "run": keys,
        "launch": {"world_size": args.world_size, "n_gpu": args.n_gpu},
    }


def dump_run_config(record: dict) -> str:
    # default=str: a value JSON has no type for is kept as its text rather than failing a save.
    return json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"


def write_run_config(folder: str, text: str) -> str:
    """Write `text` as folder/run_config.json atomically (a reader never sees half a file)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RUN_CONFIG_NAME)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return path


class UnreadableRunConfig(ValueError):
    """A run_config.json that is there but cannot be used; the message says why."""


def read_run_config(folder: str) -> dict | None:
    """The record in folder/run_config.json; None when there is none (a checkpoint written
    before hf_sparse kept one). Raises UnreadableRunConfig for anything else amiss."""
    path = os.path.join(folder, RUN_CONFIG_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, UnicodeDecodeError) as err:
        raise UnreadableRunConfig(f"cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise UnreadableRunConfig(f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(record, dict) or record.get("format") != RUN_CONFIG_FORMAT:
        raise UnreadableRunConfig(f'not an hf_sparse run record (no "format": "{RUN_CONFIG_FORMAT}")')
    if record.get("version") != RUN_CONFIG_VERSION:
        raise UnreadableRunConfig(
            f"version {record.get('version')!r}; this hf_sparse reads version {RUN_CONFIG_VERSION}"
        )
    for section in ("run", "launch"):
        if not isinstance(record.get(section, {}), dict):
            raise UnreadableRunConfig(f"its {section!r} is not an object")
    return record


class RunRecordCallback(TrainerCallback):
    """Puts the run's resolved JSON (`record`, from `resolved_run_config`) into every
    checkpoint folder, ahead of the checkpoint itself. Place it after every callback that
    decides a save at a step end (the preemption callback, the non-finite guard)."""

    def __init__(self, record: dict):
        self.text = dump_run_config(record)

    def _folder(self, args, state) -> str:
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _before_save(self, args, state, control):
        # The Trainer saves right after on_step_end / on_epoch_end when should_save is set.
        if control.should_save and args.should_save:
            write_run_config(self._folder(args, state), self.text)

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        folder = self._folder(args, state)
        if args.should_save and os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, RUN_CONFIG_NAME)):
            write_run_config(folder, self.text)


__all__ = [
    "RUN_CONFIG_NAME", "RunRecordCallback", "UnreadableRunConfig", "dump_run_config", "read_run_config",
    "resolved_run_config", "write_run_config",
]  # fmt: skip
