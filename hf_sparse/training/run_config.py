"""One flat run JSON -> (TrainingArguments, SparseLlamaConfig, DataArguments, ScriptArguments).

Everything here runs before any model is built or file written, so bad input fails fast
with one line naming the key and its valid values.
"""

import dataclasses
import difflib
import enum
import json
import logging
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import HubStrategy

from ..model.configuration_sparse_llama import SparseLlamaConfig
from .data_args import PATH_LIST_FIELDS, DataArguments, validate_data_args
from .hub_access import check_hub_resources


logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad run configuration; its message is one line meant for the user."""


class LaunchError(ConfigError):
    """A launcher setting that cannot work here (an accelerate config that needs a GPU on a
    machine without one, ...). Every rank finds the same, so only rank 0 reports it."""


# The model keys come in one dataclass per `train_hf.py --help` section: the help is
# generated from the classes (docstring, fields, help metadata), so a key appears there by
# being declared. Every model key defaults to None: absent, it keeps the model JSON's value.
def _model_key(help_text: str):
    return field(default=None, metadata={"help": help_text})


@dataclass
class ModelArguments:
    """A model JSON, and the FFN type that overrides it."""

    model_config: str = _model_key(
        "Model JSON (configs/llama_*.json, or the original research code's LLaMA JSON unchanged)."
    )
    squ_relu: str | None = _model_key(
        "FFN activation: silu (gated SwiGLU) | relu | relu2 (Squared-ReLU; relu and relu2 are non-gated, "
        "down(act(up(x))))."
    )
    nongated_intermediate_size: int | None = _model_key(
        "Non-gated FFN width (null: 1.5 x intermediate_size rounded up to a multiple of 64)."
    )


@dataclass
class ActivationSparsityArguments:
    """2:4 sparsity of the ReLU² activations (Haziza et al., arXiv 2503.16672)."""

    activation_2by4: bool | None = _model_key("2:4-sparsify the ReLU² output before down_proj (needs squ_relu relu2).")
    activation_sparse_method: str | None = _model_key(
        "naive (keep the 2 largest of each 4; the paper's) | mvue (unbiased stochastic) | soft_threshold (S-STE)."
    )
    activation_dense_warmup_steps: int | None = _model_key(
        "Optimizer steps trained densely before the 2:4 activations switch on."
    )
    permute_2by4: bool | None = _model_key("Fixed token permutation for the backward 2:4 (drawn from the seed).")
    activation_backward: str | None = _model_key(
        "split_gemm (the paper's) | naive (feature-wise 2:4 on all features) | exact (gradient of the masked forward)."
    )
    activation_dense_features: float | None = _model_key(
        "split_gemm: fraction of the densest features kept in a dense GEMM (1.0: same as exact)."
    )


@dataclass
class WeightSparsityArguments:
    """2:4 sparse weights trained from dense masters (S-STE)."""

    weight_2by4: bool | None = _model_key("2:4 sparse weights from dense masters.")
    weight_2by4_scope: str | None = _model_key("mlp | attn | all: the linears with 2:4 weights.")
    weight_sparse_method: str | None = _model_key("s_ste (shrunk by the third largest, scaled) | ste")
    weight_grad_mvue: bool | None = _model_key("MVUE 2:4 output gradient in dW.")
    weight_masked_decay: float | None = _model_key("Masked decay lambda (0: off).")
    weight_2by4_start_step: int | None = _model_key("Optimizer steps trained densely before the 2:4 weights.")
    sparse_dense_finetune_steps: int | None = _model_key(
        "The last N optimizer steps train dense again (the dense tail; needs max_steps)."
    )
    activation_dense_finetune: bool | None = _model_key("Dense activations too during the dense tail.")


@dataclass
class LowRankArguments:
    """Low-rank (LORO) linears, W = weight_out · weight_inᵀ; train with optimizer loro_adamw."""

    loro_scope: str | None = _model_key("null (full rank) | all | attn | mlp: the decoder linears factorised.")
    loro_attn_rank: int | None = _model_key("Rank of the low-rank attention linears.")
    loro_mlp_rank: int | None = _model_key("Rank of the low-rank FFN linears.")
    loro_init: str | None = _model_key("xavier | auto | kaiming | orth | randn_<std>")


MODEL_ARGUMENT_CLASSES = (ModelArguments, ActivationSparsityArguments, WeightSparsityArguments, LowRankArguments)


@dataclass
class ScriptArguments:
    """Keys of train_hf.py itself (names follow the original research script)."""

    wandb_sparsityrelu: bool = field(default=False, metadata={"help": "Log per-layer activation sparsity."})
    weight_sparsity_metrics: bool = field(default=True, metadata={"help": "Log per-matrix weight sparsity."})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | loro_adamw"})
    loro_freq: int = field(default=500, metadata={"help": "Exact Riemannian step every N optimizer steps."})
    loro_refresh: str | None = field(default=None, metadata={"help": "all | lrk | reg: Adam moments to reset."})
    loro_refresh_freq: int = field(default=500, metadata={"help": "Moment refresh period (optimizer steps)."})
    loro_lr_scaler: float = field(default=-1.0, metadata={"help": "Lazy-step scale; -1 means rank / hidden."})
    loro_type: str = field(default="loro", metadata={"help": "loro | eucl (lazy steps only)"})
    scheduler: str = field(
        default="trainer",
        metadata={"help": "trainer (use lr_scheduler_type) | cosine_restart (the LORO recipe's schedule)"},
    )
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine_restart: final lr / peak lr."})
    cosine_restart_freq: int | None = field(
        default=None, metadata={"help": "cosine_restart: re-warm-up period (default: loro_refresh_freq)."}
    )
    cosine_restart_warmup: int = field(default=0, metadata={"help": "cosine_restart: re-warm-up length (steps)."})
    nonfinite_policy: str = field(
        default="stop", metadata={"help": "stop | skip: what a non-finite loss/activation does (see hf_sparse.training.numerics)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that holds another run."}
    )
    flip_rate: bool = field(
        default=False, metadata={"help": "Log the 2:4 weight-mask flip rate (changed mask entries between logs)."}
    )


OPTIMIZER_CHOICES = ("adamw", "loro_adamw")
SCHEDULER_CHOICES = ("trainer", "cosine_restart")
MODEL_JSON_DROPPED_KEYS = ("architectures", "transformers_version", "_name_or_path", "auto_map", "dtype", "torch_dtype")


@dataclass
class RunConfig:
    training_args: TrainingArguments
    model_config: SparseLlamaConfig
    data_args: DataArguments
    script_args: ScriptArguments
    raw: dict


ARGUMENT_CLASSES = (*MODEL_ARGUMENT_CLASSES, DataArguments, ScriptArguments, TrainingArguments)


USAGE = "train_hf.py CONFIG.json [--key value ...]"
HELP_FLAGS = ("-h", "--help")

# `train_hf.py --help`: one section per argument class, in this order (title, class, and a
# description where the class docstring is not meant for users).
HELP_SECTIONS = (
    ("model", ModelArguments, None),
    ("2:4 activations", ActivationSparsityArguments, None),
    ("weight 2:4", WeightSparsityArguments, None),
    ("low rank", LowRankArguments, None),
    ("data", DataArguments, "Training data and tokenizer. With neither dataset_name nor train_files: the embedded "
     "default corpus and a tokenizer trained on it locally (no network)."),
    ("script", ScriptArguments, None),
)
# The TrainingArguments keys --help shows, with the Trainer's own help (first sentence), the
# ones a run JSON usually sets; then what train_hf.py adds to that help, or says instead of
# it where the script changes the key's meaning.
TRAINER_HELP_KEYS = (
    "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "per_device_eval_batch_size", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "max_grad_norm", "bf16", "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps",
    "report_to", "run_name", "seed", "resume_from_checkpoint", "push_to_hub", "use_cpu", "torch_compile",
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


def format_help(width: int = 100) -> str:
    """`train_hf.py --help`: usage, then every key of the run JSON by group, generated from
    the argument dataclasses (types, defaults, help metadata)."""
    out = [f"usage: {USAGE}", f"       accelerate launch {USAGE}", "       train_hf.py --help", ""]
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
                default = "required" if f.name == "model_config" else (
                    f"default {_default_label(getattr(SparseLlamaConfig, f.name, None))}"
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


def _known_keys():
    return {f.name: cls for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def _parse_cli_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_run_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist.")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the run config must be a JSON object of keys to values.")
    return data


def apply_cli_overrides(data: dict, overrides: list[str]) -> dict:
    """`--key value` pairs (value parsed as JSON when it parses, else kept as a string);
    a bare `--flag` means true."""
    data = dict(data)
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}; overrides are written --key value.")
        key, _, inline = token[2:].partition("=")
        if inline:
            data[key] = _parse_cli_value(inline)
            i += 1
        elif i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            data[key] = _parse_cli_value(overrides[i + 1])
            i += 2
        else:
            data[key] = True
            i += 1
    return data


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _value_fits(value, annotation) -> bool:
    """Does a JSON value fit a dataclass field annotation? (HfArgumentParser does not check.)"""
    if annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_value_fits(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict) or isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, str):  # str enums
        return isinstance(value, str)
    # Enums, literals and other rich types are validated by the dataclasses themselves.
    return True


# The original research script's weight-sparsity flags, accepted in the run JSON so its
# users can port their runs unchanged; each maps onto a SparseLlamaConfig key.
ALIASES = {
    "enable_2to4_sparse": "original name of weight_2by4.",
    "mlp_2by4": "original flag, default true: 2:4 weights in the MLP (-> weight_2by4_scope).",
    "attn_2by4": "original flag, default false: 2:4 weights in attention (-> weight_2by4_scope).",
}
ALIAS_KEYS = tuple(ALIASES)
_SCOPE_FROM_FLAGS = {(True, True): "all", (True, False): "mlp", (False, True): "attn"}
_NO_WEIGHT_TARGETS = (
    "mlp_2by4=False and attn_2by4=False leave weight_2by4 with no matrix to sparsify; "
    "set mlp_2by4 and/or attn_2by4 to true (or weight_2by4_scope), or turn weight_2by4 off."
)


def resolve_aliases(data: dict) -> tuple[dict, bool]:
    """Rewrite the original flags into their canonical keys.

    `enable_2to4_sparse` -> `weight_2by4`; `mlp_2by4` (default true) and `attn_2by4`
    (default false) -> `weight_2by4_scope`. An alias and its canonical key that disagree
    are refused, naming both. Returns the rewritten dict and whether the flags switched
    off every target (an error only once we know weight 2:4 is on, which the model_config
    file may decide).
    """
    data = dict(data)
    for alias in ALIAS_KEYS:
        if alias in data and not isinstance(data[alias], bool):
            raise ConfigError(f"{alias}: expected bool, got {data[alias]!r} ({type(data[alias]).__name__}).")
    if "enable_2to4_sparse" in data:
        value = data.pop("enable_2to4_sparse")
        if "weight_2by4" in data and data["weight_2by4"] != value:
            raise ConfigError(
                f"enable_2to4_sparse={value!r} conflicts with weight_2by4={data['weight_2by4']!r} "
                "(enable_2to4_sparse is the original name of weight_2by4); give one of them."
            )
        data["weight_2by4"] = value
    no_targets = False
    if "mlp_2by4" in data or "attn_2by4" in data:
        mlp, attn = data.pop("mlp_2by4", True), data.pop("attn_2by4", False)
        scope = _SCOPE_FROM_FLAGS.get((mlp, attn))
        given = data.get("weight_2by4_scope")
        if "weight_2by4_scope" in data and given != scope:
            meaning = f"scope {scope!r}" if scope else "no target"
            raise ConfigError(
                f"mlp_2by4={mlp!r}, attn_2by4={attn!r} ({meaning}) conflicts with weight_2by4_scope={given!r} "
                "(mlp_2by4/attn_2by4 are the original names of weight_2by4_scope); give one of them."
            )
        if scope is None:
            if data.get("weight_2by4") is True:
                raise ConfigError(_NO_WEIGHT_TARGETS)
            no_targets = True  # fine unless the model_config file turns weight 2:4 on
        else:
            data["weight_2by4_scope"] = scope
    return data, no_targets


def check_sparse_schedule(config: SparseLlamaConfig, max_steps: int) -> None:
    """The dense tail is counted back from `max_steps`, so it needs a known run length and
    must fit in it; with weight 2:4 on, the sparse phase [start, max_steps - tail) must
    hold at least one optimizer step (otherwise weight 2:4 would silently never run)."""
    tail, start = config.sparse_dense_finetune_steps, config.weight_2by4_start_step
    if tail > 0 and max_steps <= 0:
        raise ConfigError(
            f"sparse_dense_finetune_steps={tail} needs max_steps > 0: the dense tail is the last "
            f"{tail} of max_steps optimizer steps."
        )
    if tail > max_steps > 0:
        raise ConfigError(
            f"sparse_dense_finetune_steps={tail} is larger than max_steps={max_steps}; "
            f"use sparse_dense_finetune_steps <= {max_steps}."
        )
    if config.weight_2by4 and max_steps > 0 and start + tail >= max_steps:
        raise ConfigError(
            f"weight_2by4_start_step={start} and sparse_dense_finetune_steps={tail} leave no sparse step in "
            f"max_steps={max_steps} (dense before step {start} and from step {max_steps - tail} on); "
            "need weight_2by4_start_step + sparse_dense_finetune_steps < max_steps."
        )


# TrainingArguments values that the Trainer accepts and only trips over once data and model
# are built (the sampler's ValueError, a ZeroDivisionError, torch's optimizer): key ->
# (the strategy key that makes it matter, what it counts). Checked on the raw JSON because
# building TrainingArguments already raises a multi-line error for some of them.
_POSITIVE_TRAINER_KEYS = {
    "per_device_train_batch_size": (None, "sequences per device per micro-batch"),
    "per_device_eval_batch_size": (None, "sequences per device per evaluation batch"),
    "gradient_accumulation_steps": (None, "micro-batches per optimizer step"),
    "logging_steps": ("logging_strategy", "steps between log rows, or a fraction of the run below 1"),
    "save_steps": ("save_strategy", "steps between checkpoints, or a fraction of the run below 1"),
    "eval_steps": ("eval_strategy", "steps between evaluations, or a fraction of the run below 1"),
}


def _trainer_default(name: str):
    return next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == name)


def check_trainer_values(data: dict) -> None:
    """Refuse TrainingArguments values that would fail (or silently do nothing) mid-run."""
    for key, (strategy_key, meaning) in _POSITIVE_TRAINER_KEYS.items():
        value = data.get(key, _trainer_default(key))
        if value is None or value > 0:
            continue
        if strategy_key is None:
            raise ConfigError(f"{key}: {value!r} is not valid; use a positive integer ({meaning}).")
        strategy = str(data.get(strategy_key, _trainer_default(strategy_key)))
        if strategy.lower().endswith("steps"):  # "steps" or IntervalStrategy.STEPS
            raise ConfigError(
                f"{key}: {value!r} is not valid with {strategy_key}='steps'; use a positive value ({meaning}), "
                f"or another {strategy_key} ('epoch', 'no')."
            )
    learning_rate = data.get("learning_rate", _trainer_default("learning_rate"))
    if learning_rate < 0:
        raise ConfigError(f"learning_rate: {learning_rate!r} is negative; use a positive value such as 1e-3.")
    max_steps = data.get("max_steps", _trainer_default("max_steps"))
    if max_steps == 0 or max_steps < -1:
        raise ConfigError(
            f"max_steps: {max_steps!r} is not valid; use a positive number of optimizer steps, or -1 (the default) "
            "to train for num_train_epochs."
        )


def check_output_dir_path(output_dir: str | None) -> None:
    """output_dir, or a folder above it, being a file would fail the first save (FileExistsError)."""
    if not output_dir:
        return
    target = path = os.path.abspath(os.path.expanduser(output_dir))
    while not os.path.exists(path):  # the nearest existing folder (or file) above it
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        where = "is an existing file" if path == target else f"is below the file {path!r}"
        raise ConfigError(f"output_dir: {output_dir!r} {where}; output_dir must be a directory (existing or new).")


def check_keys_and_types(data: dict) -> None:
    known = _known_keys()
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, [*known, *ALIAS_KEYS], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}.{hint}")
        hints = typing.get_type_hints(known[key])
        annotation = hints.get(key, typing.Any)
        if key in PATH_LIST_FIELDS and isinstance(value, str):
            continue  # one path: DataArguments makes it a one-item list
        if not _value_fits(value, annotation):
            raise ConfigError(
                f"{key}: expected {_type_name(annotation)}, got {value!r} ({type(value).__name__})."
            )


def load_model_config(path: str, overrides: dict) -> SparseLlamaConfig:
    """Build a `SparseLlamaConfig` from a model JSON plus the run's model keys.

    Accepts this project's model JSONs and the original research code's LLaMA JSONs
    unchanged (`model_type: llama`, `max_sequence_length`, `pad_token_id: -1`).
    """
    if not path:
        raise ConfigError("model_config is required: the path of a model JSON such as configs/llama_130m.json.")
    if not os.path.isfile(path):
        raise ConfigError(f"model_config: file {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except json.JSONDecodeError as err:
        raise ConfigError(f"model_config {path}: invalid JSON at line {err.lineno}, column {err.colno}.") from None
    model_type = raw.pop("model_type", "llama")
    if model_type not in ("llama", "sparse_llama"):
        raise ConfigError(f"model_config {path}: model_type {model_type!r} is not 'llama' or 'sparse_llama'.")
    for key in MODEL_JSON_DROPPED_KEYS:
        raw.pop(key, None)
    # The original LLaMA JSONs name the context length differently and mark "no pad" as -1.
    if "max_sequence_length" in raw:
        raw.setdefault("max_position_embeddings", raw.pop("max_sequence_length"))
        raw.pop("max_sequence_length", None)
    if raw.get("pad_token_id") == -1:
        raw["pad_token_id"] = None
    raw.update({k: v for k, v in overrides.items() if v is not None})
    check_attention_heads(raw, path)
    try:
        return SparseLlamaConfig(**raw)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    except StrictDataclassError as err:
        # Keep the one informative line of the strict-dataclass report.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ConfigError(f"model_config {path}: {lines[-1]}") from None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_attention_heads(raw: dict, path: str) -> None:
    """Head counts that do not divide: transformers checks hidden_size % num_attention_heads
    in a multi-line report; a num_attention_heads that num_key_value_heads does not divide
    passes every config check and crashes inside attention at the first step."""
    values = {}
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads"):
        value = raw.get(key, getattr(SparseLlamaConfig, key, None))
        if key == "num_key_value_heads" and value is None:
            value = values["num_attention_heads"]  # None means plain multi-head attention
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}: {value!r} in model_config {path!r} is not valid; use a positive integer.")
        values[key] = value
    hidden, heads, kv_heads = values["hidden_size"], values["num_attention_heads"], values["num_key_value_heads"]
    if hidden % heads:
        near = sorted(_divisors(hidden), key=lambda d: (abs(d - heads), d))[:2]
        raise ConfigError(
            f"num_attention_heads: {heads} in model_config {path!r} does not divide hidden_size={hidden} (each head "
            f"gets hidden_size / num_attention_heads features); use a divisor of {hidden} such as "
            f"{' or '.join(map(str, sorted(near)))}."
        )
    if heads % kv_heads:
        raise ConfigError(
            f"num_key_value_heads: {kv_heads} in model_config {path!r} does not divide num_attention_heads={heads} "
            f"(each key/value head serves a whole group of query heads); use one of "
            f"{', '.join(map(str, _divisors(heads)))}."
        )


def parse_run_config(argv: list[str]) -> RunConfig:
    """argv = [CONFIG.json, --key, value, ...] -> a validated `RunConfig`."""
    if not argv or argv[0].startswith("-"):
        raise ConfigError(f"usage: {USAGE}; train_hf.py --help lists the keys.")
    data, no_weight_targets = resolve_aliases(apply_cli_overrides(read_run_json(argv[0]), argv[1:]))
    # TrainingArguments types resume_from_checkpoint as a path; true/false are ours: true
    # means the last finished checkpoint ("last"), false no resume.
    if data.get("resume_from_checkpoint") is True:
        data["resume_from_checkpoint"] = "last"
    elif data.get("resume_from_checkpoint") is False:
        data.pop("resume_from_checkpoint")
    check_keys_and_types(data)
    check_trainer_values(data)
    # Before TrainingArguments: building them already sets up accelerate's distributed state.
    check_launch_environment(data)

    if "use_cpu" not in data and not torch.cuda.is_available():
        # Without this, each torchrun rank on a GPU-less machine would train alone.
        data["use_cpu"] = True
    try:
        *model_parts, data_args, script_args, training_args = HfArgumentParser(ARGUMENT_CLASSES).parse_dict(
            data, allow_extra_keys=False
        )
    except ValueError as err:
        # TrainingArguments' own cross-key checks (multi-line, no key prefix); keep them one line.
        raise ConfigError(" ".join(str(err).split())) from None
    model_keys = {k: v for part in model_parts for k, v in dataclasses.asdict(part).items()}

    if script_args.optimizer not in OPTIMIZER_CHOICES:
        raise ConfigError(
            f"optimizer={script_args.optimizer!r} is not valid; choose one of {', '.join(map(repr, OPTIMIZER_CHOICES))}."
        )
    if script_args.scheduler not in SCHEDULER_CHOICES:
        raise ConfigError(
            f"scheduler={script_args.scheduler!r} is not valid; choose one of {', '.join(map(repr, SCHEDULER_CHOICES))}."
        )
    if script_args.scheduler == "cosine_restart" and script_args.optimizer != "loro_adamw":
        raise ConfigError("scheduler='cosine_restart' is available with optimizer='loro_adamw'; use lr_scheduler_type otherwise.")
    if script_args.scheduler == "cosine_restart" and training_args.max_steps <= 0:
        raise ConfigError("scheduler='cosine_restart' needs max_steps > 0 (the schedule's length).")
    if script_args.optimizer == "loro_adamw" and not model_keys["loro_scope"]:
        raise ConfigError(
            "optimizer='loro_adamw' needs low-rank linears: set loro_scope to 'all', 'attn' or 'mlp'."
        )
    if script_args.nonfinite_policy not in ("stop", "skip"):
        raise ConfigError(
            f"nonfinite_policy={script_args.nonfinite_policy!r} is not valid; choose one of 'stop', 'skip'."
        )
    if script_args.loro_type not in ("loro", "eucl"):
        raise ConfigError(f"loro_type={script_args.loro_type!r} is not valid; choose one of 'loro', 'eucl'.")
    if script_args.loro_refresh not in (None, "all", "lrk", "reg"):
        raise ConfigError(
            f"loro_refresh={script_args.loro_refresh!r} is not valid; choose one of null, 'all', 'lrk', 'reg'."
        )
    for key in ("loro_freq", "loro_refresh_freq"):
        if getattr(script_args, key) <= 0:
            raise ConfigError(f"{key}={getattr(script_args, key)!r} must be a positive integer.")
    model_config_path = model_keys.pop("model_config")
    model_config = load_model_config(model_config_path, model_keys)
    if no_weight_targets and model_config.weight_2by4:
        raise ConfigError(_NO_WEIGHT_TARGETS)
    check_sparse_schedule(model_config, training_args.max_steps)
    # The backward token permutation follows the training seed (and the config carries it
    # into checkpoints, so a resumed run permutes identically).
    model_config.permute_2by4_seed = training_args.seed

    try:
        validate_data_args(data_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if data_args.max_length > model_config.max_position_embeddings:
        raise ConfigError(
            f"max_length={data_args.max_length} is larger than the model's max_position_embeddings="
            f"{model_config.max_position_embeddings}; use max_length <= {model_config.max_position_embeddings}."
        )
    if training_args.push_to_hub and "hub_strategy" not in data:
        # train_hf.py uploads the finished folder (code files, our model card) once at the
        # end; the Trainer's default every-save push would mirror only weights and config
        # into the repo (a config whose auto_map points at code that is not there yet).
        training_args.hub_strategy = HubStrategy.END
    check_reporting_integrations(training_args.report_to)
    check_output_dir_path(training_args.output_dir)
    check_output_dir(training_args, script_args)
    return RunConfig(training_args, model_config, data_args, script_args, data)


def check_hub_access(data_args: DataArguments) -> None:
    """The hub tokenizer/dataset of a parsed run can be had (see `data.check_hub_resources`).

    Separate from `parse_run_config`, which needs neither the hub nor its cache (the shipped
    hub recipes parse offline): train_hf.py calls it next, before anything is loaded.
    """
    try:
        check_hub_resources(data_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def accelerator_available() -> bool:
    """Whether a device that accelerate's FSDP can shard onto exists (not CPU, not MPS)."""
    if not torch.accelerator.is_available():
        return False
    return torch.accelerator.current_accelerator().type != "mps"


def _env_true(env, name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


# What `accelerate launch` exports to the script: ACCELERATE_MIXED_PRECISION always,
# ACCELERATE_USE_CPU only from its single-process launcher, WORLD_SIZE only from the
# torchrun-based ones (DDP, FSDP, DeepSpeed), ACCELERATE_USE_FSDP with an FSDP config.
_TWO_PROCESSES_ON_CPU = (
    "`accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 train_hf.py CONFIG.json` "
    "or `torchrun --nproc_per_node 2 train_hf.py CONFIG.json`"
)


def check_launch_environment(data: dict, env=None) -> None:
    """Refuse (one line, before any data or model is built) what accelerate would only fail
    on later in every rank, and warn when `accelerate launch` silently runs one process.

    - An FSDP accelerate config on a machine without GPUs: once data and model are built,
      FSDP1's plugin raises in every rank, and FSDP2 quietly trains plain DDP instead (the
      CPU fall-back, `use_cpu`, wins over the FSDP config).
    - An accelerate mixed precision (config file or --mixed_precision) that the run JSON
      does not ask for: the run JSON's `bf16`/`fp16` keys decide precision. DeepSpeed stops
      every rank on the mismatch; DDP/FSDP would silently autocast a run configured fp32.
    - `accelerate launch --num_processes N` without a config file (or with --cpu) starts ONE
      process on a machine without several GPUs; its single-process launcher still exports
      MASTER_ADDR for N > 1, which is how we know more were asked for.
    """
    env = os.environ if env is None else env
    if _env_true(env, "ACCELERATE_USE_FSDP") and not accelerator_available():
        version = env.get("FSDP_VERSION", "1")
        raise LaunchError(
            f"the accelerate config asks for FSDP (distributed_type: FSDP, fsdp_version {version}), which needs "
            f"GPUs, and this machine has none; on CPU train with several processes through {_TWO_PROCESSES_ON_CPU} "
            "(DDP over gloo), or DeepSpeed (configs/accelerate/deepspeed_zero2.yaml)."
        )
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision in ("bf16", "fp16") and data.get(precision) is not True:
        raise LaunchError(
            f"accelerate's mixed_precision is {precision!r} (accelerate config file or --mixed_precision) but the run "
            f"config has {precision}={data.get(precision, False)!r}; precision is set in the run JSON: add "
            f"\"{precision}\": true to it (or --{precision} true), or set mixed_precision: 'no' in the accelerate config."
        )
    # (An MPI launch, `--mpirun_hostfile`, does run N processes: they see MPI's size variables.)
    mpi = any(name in env for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    single_process_launcher = "ACCELERATE_USE_CPU" in env and "WORLD_SIZE" not in env and not mpi
    if single_process_launcher and "MASTER_ADDR" in env:
        gpus = torch.cuda.device_count()
        why = "accelerate's CPU mode (--cpu or use_cpu: true) starts one process" if _env_true(
            env, "ACCELERATE_USE_CPU"
        ) else (
            "without a config file accelerate starts several processes only on several GPUs, and this machine "
            f"has {gpus or 'none'}"
        )
        logger.warning(
            "accelerate launch started ONE process (world_size 1) although --num_processes > 1 was asked for: %s. "
            "For two processes on CPU use %s. This run continues as a single process.",
            why,
            _TWO_PROCESSES_ON_CPU,
        )


def check_reporting_integrations(report_to: list[str]) -> None:
    """Fail now, not when the Trainer builds its callbacks after the data and model are ready."""
    from transformers import integrations

    requested = [name for name in (report_to or []) if name not in ("all", "none")]
    if not requested:
        return
    unknown = [name for name in requested if name not in integrations.INTEGRATION_TO_CALLBACK]
    if unknown:
        raise ConfigError(
            f"report_to: {', '.join(map(repr, unknown))} is not a reporting integration; choose from "
            f"{', '.join(map(repr, integrations.INTEGRATION_TO_CALLBACK))}."
        )
    installed = integrations.get_available_reporting_integrations()
    missing = [name for name in requested if name not in installed]
    if missing:
        raise ConfigError(
            f"report_to: {', '.join(map(repr, missing))} requested but not installed (pip install "
            f"{' '.join(missing)}); installed integrations: {installed or 'none'}."
        )
    if "wandb" in requested:
        check_wandb_credentials()


_WANDB_QUIET_MODES = ("offline", "dryrun", "disabled")


def wandb_credentials_missing() -> str | None:
    """The W&B host for which no API key can be found, or None when wandb.init() will not
    need one (offline/disabled mode) or will find one. No network: wandb's own lookup order,
    read the way wandb reads it: WANDB_MODE (env, then the settings files that `wandb
    offline` writes), WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE, then the netrc entry that
    `wandb login` writes for the host (WANDB_BASE_URL or the settings' base_url)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in _WANDB_QUIET_MODES:
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth
        from wandb.sdk.wandb_settings import Settings

        # A fresh Settings, not wandb's process-wide singleton: that one is frozen at the
        # first wandb call, and this must see the environment as it is now.
        settings = Settings(quiet=True)  # no "Loading settings from ..." line
        config_dir = os.environ.get("WANDB_CONFIG_DIR")
        settings.settings_system = os.path.join(
            os.path.expanduser(config_dir) if config_dir else os.path.expanduser(os.path.join("~", ".config", "wandb")),
            "settings",
        )
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))
        if str(settings.mode).lower() in _WANDB_QUIET_MODES or settings.api_key:
            return None
        if read_netrc_auth(host=settings.base_url):
            return None
        return settings.base_url
    except Exception as err:  # wandb internals moved or a settings file is odd: let wandb decide
        logger.debug("wandb credential lookup skipped: %s", err)
        return None


def check_wandb_credentials() -> None:
    """`report_to: ["wandb"]` without a key fails in wandb.init(), after data and model are
    built (UsageError: No API key configured), or prompts in a terminal."""
    host = wandb_credentials_missing()
    if host is not None:
        raise ConfigError(
            f"report_to: 'wandb' needs a W&B API key and none is configured for {host} (WANDB_API_KEY, or the "
            "~/.netrc entry that 'wandb login' writes); run 'wandb login' or set WANDB_API_KEY, or log offline with "
            "WANDB_MODE=offline (upload later with 'wandb sync'), or drop 'wandb' from report_to."
        )


def output_dir_holds_run(output_dir: str) -> bool:
    if not output_dir or not os.path.isdir(output_dir):
        return False
    return any(
        name in ("trainer_state.json", "config.json", "all_results.json") or name.startswith("checkpoint-")
        for name in os.listdir(output_dir)
    )


def check_output_dir(training_args: TrainingArguments, script_args: ScriptArguments) -> None:
    """Refuse to mix a new run into the folder of another one."""
    if script_args.overwrite_output_dir or training_args.resume_from_checkpoint:
        return
    if output_dir_holds_run(training_args.output_dir):
        raise ConfigError(
            f"output_dir {training_args.output_dir!r} already holds a run; set overwrite_output_dir=true, "
            "resume it with resume_from_checkpoint, or choose another output_dir."
        )
