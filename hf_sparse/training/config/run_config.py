"""One flat run JSON -> (TrainingArguments, SparseLlamaConfig, DataArguments, ScriptArguments).

Everything here runs before any model is built or file written, so bad input fails fast
with one line naming the key and its valid values.
"""

import dataclasses
import difflib
import functools
import json
import os
import types
import typing

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import HfArgumentParser
from transformers.trainer_utils import HubStrategy

from ...model.configuration_sparse_llama import SparseLlamaConfig
from ...model.env_knobs import check_environment
from .cli_help import USAGE
from .config_checks import (
    check_attention_heads,
    check_fp8_support,
    check_lm_eval_args,
    check_output_dir,
    check_output_dir_path,
    check_script_values,
    check_sparse_schedule,
    check_trainer_values,
    warn_on_training_settings,
)
from ..data.data_args import PATH_LIST_FIELDS, validate_data_args
from .launch_checks import check_launch_environment, check_reporting_integrations
from .run_args import (
    ALIAS_KEYS,
    ARGUMENT_CLASSES,
    MODEL_JSON_DROPPED_KEYS,
    ConfigError,
    RunConfig,
)


def _known_keys():
    return {f.name: cls for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def _parse_cli_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_run_json(path: str) -> dict:
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory; give a run JSON such as configs/quickstart.json.")
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


# TrainingArguments keys that transformers 5 removed, which run JSONs of the 4.x era still hold.
REMOVED_TRAINER_KEYS = {
    "warmup_ratio": "transformers 5 removed this key; give the ratio as warmup_steps below 1 (warmup_steps: 0.05 "
    "warms up over the first 5% of the steps).",
}


def check_keys_and_types(data: dict) -> None:
    known = _known_keys()
    for key, value in data.items():
        if key in REMOVED_TRAINER_KEYS:
            raise ConfigError(f"{key}: {REMOVED_TRAINER_KEYS[key]}")
        if key not in known:
            close = difflib.get_close_matches(key, [*known, *ALIAS_KEYS], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}.{hint}")
        hints = typing.get_type_hints(known[key])
        annotation = hints.get(key, typing.Any)
        if key in PATH_LIST_FIELDS and isinstance(value, str):
            continue  # one path: DataArguments makes it a one-item list
        if not _value_fits(value, annotation):
            raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r} ({type(value).__name__}).")


# Keys a model JSON may hold besides SparseLlamaConfig's fields (LlamaConfig's and
# PretrainedConfig's among them). PretrainedConfig 5.24 turns any unknown key into an
# attribute, so a typo ("hiden_size") would build a model with the default size; these are
# the ones it (or load_model_config) reads:
_MODEL_JSON_READ_KEYS = (
    # what PretrainedConfig.__post_init__ and its RoPE conversion consume
    "torch_dtype", "num_labels", "rope_scaling", "rope_theta", "partial_rotary_factor", "name_or_path",
    "_commit_hash", "output_attentions", "attn_implementation", "experts_implementation", "per_layer_config",
    # load_model_config: the original research JSONs, and files a save_pretrained wrote
    "model_type", "max_sequence_length", *MODEL_JSON_DROPPED_KEYS,
)  # fmt: skip
# Inert keys every config.json written by transformers 4 carried (PretrainedConfig's old
# __init__ arguments): a saved config of that era stays loadable as a model JSON.
_MODEL_JSON_LEGACY_KEYS = (
    "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "prefix",
    "tokenizer_class", "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task",
    "torchscript", "pruned_heads", "use_bfloat16", "tf_legacy_loss",
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def model_json_keys() -> frozenset[str]:
    from transformers import GenerationConfig

    # Generation settings saved in old configs are dropped by PretrainedConfig (they live
    # in generation_config.json now).
    generation = GenerationConfig._get_default_generation_params()
    fields = {f.name for f in dataclasses.fields(SparseLlamaConfig)}
    return frozenset(fields | set(_MODEL_JSON_READ_KEYS) | set(_MODEL_JSON_LEGACY_KEYS) | set(generation))


def check_model_json_keys(raw: dict, path: str) -> None:
    """Refuse a key of the model JSON that no config reads, naming the closest valid one."""
    valid = model_json_keys()
    for key in raw:
        if key in valid:
            continue
        if key in _known_keys():
            raise ConfigError(
                f"{key!r} in model_config {path!r} is a key of the run JSON, not of the model JSON; move it to the "
                f"run JSON (or pass it as --{key} VALUE)."
            )
        close = difflib.get_close_matches(key, sorted(valid), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown key {key!r} in model_config {path!r}.{hint}")


def load_model_config(path: str, overrides: dict, block_size: int | None = None) -> SparseLlamaConfig:
    """Build a `SparseLlamaConfig` from a model JSON plus the run's model keys.

    Accepts this project's model JSONs and the original research code's LLaMA JSONs
    unchanged (`model_type: llama`, `max_sequence_length`, `pad_token_id: -1`). A model JSON
    that does not set `max_position_embeddings` (nor `max_sequence_length`) gets the
    trained `block_size`: the context the saved model declares is the one it learned, so
    evaluation and serving tools do not silently use a longer one. An explicit value wins.
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
    if not isinstance(raw, dict):
        raise ConfigError(f"model_config {path}: a model JSON must be an object of keys to values.")
    check_model_json_keys(raw, path)
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
    if block_size is not None and "max_position_embeddings" not in raw:
        raw["max_position_embeddings"] = block_size
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


# Keys that only a model JSON has: a run JSON names its model JSON in model_config instead.
_MODEL_ONLY_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def refuse_model_json_as_run_json(path: str, data: dict) -> None:
    """`train_hf.py configs/llama_tiny.json` would otherwise fail on its first key
    ("unknown config key 'model_type'. Did you mean 'loro_type'?")."""
    found = [key for key in _MODEL_ONLY_KEYS if key in data]
    if not found or "model_config" in data:
        return
    raise ConfigError(
        f"{path!r} is a model JSON (it has {', '.join(found)}), not a run JSON; name it as model_config in a run "
        f'JSON (e.g. "model_config": {json.dumps(path)} in a copy of configs/quickstart.json), or pass it with '
        f"--model_config: train_hf.py configs/quickstart.json --model_config {path}"
    )


def parse_run_config(argv: list[str]) -> RunConfig:
    """argv = [CONFIG.json, --key, value, ...] -> a validated `RunConfig`."""
    if not argv or argv[0].startswith("-"):
        raise ConfigError(f"usage: {USAGE}; train_hf.py --help lists the keys.")
    file_data = read_run_json(argv[0])
    refuse_model_json_as_run_json(argv[0], file_data)
    data, no_weight_targets = resolve_aliases(apply_cli_overrides(file_data, argv[1:]))
    # TrainingArguments types resume_from_checkpoint as a path; true/false are ours: true
    # means the last finished checkpoint ("last"), false no resume.
    if data.get("resume_from_checkpoint") is True:
        data["resume_from_checkpoint"] = "last"
    elif data.get("resume_from_checkpoint") is False:
        data.pop("resume_from_checkpoint")
    if isinstance(data.get("lm_eval_tasks"), str):  # --lm_eval_tasks hellaswag,arc_easy
        data["lm_eval_tasks"] = [name.strip() for name in data["lm_eval_tasks"].split(",") if name.strip()]
    check_keys_and_types(data)
    try:
        check_environment()  # the HF_SPARSE_* switches, before anything is built
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_trainer_values(data)
    # Before TrainingArguments: building them already sets up accelerate's distributed state.
    check_launch_environment(data)

    # Every parameter of every sparse_llama mode takes part in each forward, so DDP need not
    # search the graph for unused ones (its default does, and says so on every rank).
    data.setdefault("ddp_find_unused_parameters", False)
    if "use_cpu" not in data and not torch.cuda.is_available():
        # Without this, each torchrun rank on a GPU-less machine would train alone.
        data["use_cpu"] = True
    try:
        *model_parts, data_args, script_args, eval_args, training_args = HfArgumentParser(ARGUMENT_CLASSES).parse_dict(
            data, allow_extra_keys=False
        )
    except ValueError as err:
        # TrainingArguments' own cross-key checks (multi-line, no key prefix); keep them one line.
        raise ConfigError(" ".join(str(err).split())) from None
    model_keys = {k: v for part in model_parts for k, v in dataclasses.asdict(part).items()}

    check_script_values(script_args, training_args, model_keys["loro_scope"])
    check_lm_eval_args(eval_args, training_args)
    model_config_path = model_keys.pop("model_config")
    model_config = load_model_config(model_config_path, model_keys, block_size=data_args.max_length)
    if no_weight_targets and model_config.weight_2by4:
        raise ConfigError(_NO_WEIGHT_TARGETS)
    check_sparse_schedule(model_config, training_args.max_steps)
    check_fp8_support(model_config, training_args.use_cpu)
    # The backward token permutation follows the training seed (and the config carries it
    # into checkpoints, so a resumed run permutes identically).
    model_config.permute_2by4_seed = training_args.seed

    try:
        validate_data_args(data_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    eval_strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    no_validation = (
        data_args.validation_split_percentage == 0 and not data_args.validation_files and not data_args.dataset_name
    )
    if no_validation and eval_strategy != "no":
        raise ConfigError(
            f"eval_strategy={eval_strategy!r} needs validation data, but validation_split_percentage is 0 (no "
            "validation split) and no validation_files are given; set eval_strategy to 'no', give "
            "validation_files, or a validation_split_percentage above 0."
        )
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
    warn_on_training_settings(training_args, script_args)
    return RunConfig(training_args, model_config, data_args, script_args, data, eval_args)
