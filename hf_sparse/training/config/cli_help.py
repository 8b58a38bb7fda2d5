"""`train_hf.py --help`: every run-JSON key by group, generated from the argument
dataclasses (types, defaults, help metadata), and the most used TrainingArguments.
"""

import dataclasses
import enum
import json
import os
import sys
import textwrap
import types
import typing

from transformers import TrainingArguments

from ...model.configuration_sparse_llama import SparseLlamaConfig
from ..data.data_args import PATH_LIST_FIELDS, DataArguments
from .run_args import (
    ALIASES,
    MODEL_ARGUMENT_CLASSES,
    ActivationSparsityArguments,
    DownstreamEvalArguments,
    LowRankArguments,
    ModelArguments,
    ScriptArguments,
    WeightSparsityArguments,
)

USAGE = "train_hf.py CONFIG.json [--key value ...]"


HELP_FLAGS = ("-h", "--help")


# `train_hf.py --help`: one section per argument class, in this order (title, class, and a
# description where the class docstring is not meant for users).
HELP_SECTIONS = (
    ("model", ModelArguments, None),
    ("2:4 activations", ActivationSparsityArguments, None),
    ("weight 2:4", WeightSparsityArguments, None),
    ("low rank", LowRankArguments, None),
    (
        "data",
        DataArguments,
        "Training data and tokenizer. With neither dataset_name nor train_files: the embedded "
        "default corpus and a tokenizer trained on it locally (no network).",
    ),
    ("script", ScriptArguments, None),
    ("downstream evaluation (lm-eval)", DownstreamEvalArguments, None),
)


# The TrainingArguments keys --help shows, with the Trainer's own help (first sentence), the
# ones a run JSON usually sets; then what train_hf.py adds to that help, or says instead of
# it where the script changes the key's meaning.
TRAINER_HELP_KEYS = (
    "output_dir",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "per_device_eval_batch_size",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "bf16",
    "logging_steps",
    "eval_strategy",
    "eval_steps",
    "save_strategy",
    "save_steps",
    "report_to",
    "run_name",
    "seed",
    "resume_from_checkpoint",
    "push_to_hub",
    "use_cpu",
    "torch_compile",
)


TRAINER_HELP_NOTES = {
    "output_dir": "One that holds another run is refused unless overwrite_output_dir.",
    "logging_steps": "The sparsity telemetry is logged in the same rows as the loss.",
    "report_to": 'E.g. ["wandb"], ["tensorboard"]; wandb needs `wandb login`, WANDB_API_KEY or WANDB_MODE=offline.',
    "seed": "Also draws the 2:4 token permutation.",
    "use_cpu": "Set automatically when no GPU exists.",
}


TRAINER_HELP_REPLACED = {
    "max_steps": "Optimizer steps to train; -1: train for num_train_epochs instead (0 is refused).",
    "resume_from_checkpoint": 'A checkpoint folder, or true / "last": the last finished checkpoint of output_dir.',
    "push_to_hub": "Upload the finished output_dir once, at the end, with its model card (hub_strategy 'end' "
    "unless set).",
}


def tool_prog(console_script: str, module: str) -> str:
    """The name a tool's usage line shows: the console script when it was invoked as one
    (`hf-sparse-report`), else `python -m <module>` (also when main() is called from Python)."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return console_script if invoked == console_script else f"python -m {module}"


def wants_help(argv: list[str]) -> bool:
    """`-h`/`--help` alone or anywhere after the config (`train_hf.py run.json --help`)."""
    return any(token in HELP_FLAGS for token in argv)


def _type_label(annotation, key: str, show_null: bool) -> str:
    if key in PATH_LIST_FIELDS:
        return "str | list[str]"
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    labels = []
    for member in members:
        if member is type(None):
            continue
        if isinstance(member, type) and issubclass(member, enum.Enum):
            label = "str"  # the Trainer's strategy enums are written as their string values
        elif typing.get_origin(member) is not None:
            label = str(member).replace("typing.", "")
        else:
            label = getattr(member, "__name__", str(member))
        if label not in labels:
            labels.append(label)
    if show_null and type(None) in members:
        labels.append("null")
    return " | ".join(labels) or "any"


def _default_label(value) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return str(value)


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _help_entry(key: str, type_label: str, default: str, text: str, width: int) -> list[str]:
    lines = [f"  {key} ({type_label}, {default})"]
    if text:
        lines += textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      ")
    return lines


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    head, dot, _ = text.partition(". ")
    return head + "." if dot else text


def format_help(width: int = 100, prog: str = "train_hf.py") -> str:
    """`train_hf.py --help`: usage, then every key of the run JSON by group, generated from
    the argument dataclasses (types, defaults, help metadata). ``prog``: the name the script
    was invoked as (``hf-sparse-train`` for the console script)."""
    usage = USAGE.replace("train_hf.py", prog, 1)
    launch = f"accelerate launch {USAGE}"  # accelerate launches the script file, whatever the entry point
    out = [f"usage: {usage}", f"       {launch}", f"       {prog} --help", ""]
    intro = (
        "Pretrains a sparse_llama model (Squared-ReLU FFN, optional 2:4 activation/weight sparsity, low-rank "
        "LORO mode) with the HuggingFace Trainer. CONFIG.json is one flat JSON object holding the keys below "
        "plus any transformers.TrainingArguments field; unknown keys and wrongly typed values are refused "
        "before anything runs. `--key value` overrides a key of CONFIG.json (the value is parsed as JSON when "
        "it parses, else taken as a string: --max_steps 100, --report_to '[\"wandb\"]', --train_files "
        "data.jsonl); a bare --flag means true."
    )
    out += textwrap.wrap(intro, width) + [""]
    model_note = (
        "Model keys override the model_config file; absent (or null), a key keeps the file's value, and the "
        "defaults shown are SparseLlamaConfig's."
    )
    out += textwrap.wrap(model_note, width)
    for title, cls, description in HELP_SECTIONS:
        is_model = cls in MODEL_ARGUMENT_CLASSES
        description = description or " ".join((cls.__doc__ or "").split())
        out += ["", f"{title}:"] + textwrap.wrap(description, width, initial_indent="  ", subsequent_indent="  ")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if is_model:
                default = (
                    "required"
                    if f.name == "model_config"
                    else (f"default {_default_label(getattr(SparseLlamaConfig, f.name, None))}")
                )
            else:
                default = f"default {_default_label(_field_default(f))}"
            label = _type_label(hints.get(f.name, typing.Any), f.name, show_null=not is_model)
            out += _help_entry(f.name, label, default, f.metadata.get("help", ""), width)
        if cls is WeightSparsityArguments:
            for alias, text in ALIASES.items():
                out += _help_entry(alias, "bool", "alias", f"The {text}", width)
    out += ["", "trainer:"]
    trainer_note = (
        "Every transformers.TrainingArguments field is a key (all of them: "
        "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments). "
        "The most used:"
    )
    out += textwrap.wrap(trainer_note, width, initial_indent="  ", subsequent_indent="  ")
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    hints = typing.get_type_hints(TrainingArguments)
    for key in TRAINER_HELP_KEYS:
        f = fields[key]
        text = TRAINER_HELP_REPLACED.get(key) or _first_sentence(f.metadata.get("help", ""))
        text = " ".join(part for part in (text, TRAINER_HELP_NOTES.get(key)) if part)
        label = _type_label(hints.get(key, typing.Any), key, show_null=True)
        out += _help_entry(key, label, f"default {_default_label(_field_default(f))}", text, width)
    return "\n".join(out) + "\n"
