"""The folder `resume_from_checkpoint` names, checked before anything is built.

A resume restores more than the weights: the optimizer's moments, the learning-rate
schedule and the random generators. A folder without them (a finished run's own folder, a
`save_only_model` checkpoint) would "resume" with all three started over, silently. A
checkpoint of another model shape would fail in `load_state_dict` after the data is built,
with a long size-mismatch traceback. Both are refused here in one line. This module also
words the "nothing to train" line so that it describes the folders as they really are.
"""

from __future__ import annotations

import json
import os
import re

from huggingface_hub.errors import StrictDataclassError

from ...model.configuration_sparse_llama import SparseLlamaConfig
from ..callbacks.checkpoints import _CHECKPOINT_RE, COMPLETION_MARKER, last_complete_checkpoint
from .run_args import ConfigError

# What transformers 5.24's Trainer writes next to the weights of a checkpoint (unless
# save_only_model): optimizer.pt (plain / DDP; optimizer.bin or an optimizer_* folder under
# FSDP, rank*-of-*-optimizer.pt under XLA FSDP), scheduler.pt, scaler.pt (fp16 loss scaling),
# rng_state.pth (rng_state_<rank>.pth with several processes). DeepSpeed keeps the optimizer
# (and its own scheduler) in a global_step<N> folder written by its engine.
_STATE_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt")
_STATE_FILE_RE = re.compile(r"^(rng_state(_\d+)?\.pth|rank\d+-of-\d+-optimizer\.pt)$")
_STATE_DIR_RE = re.compile(r"^(global_step\d+|optimizer.*)$")
STATE_FILES_TEXT = "optimizer.pt, scheduler.pt, rng_state*.pth; under DeepSpeed a global_step* folder"


def training_state(folder: str) -> list[str]:
    """The entries of `folder` a resume restores the optimizer, schedule or RNGs from."""
    found = []
    for name in sorted(os.listdir(folder)):
        if os.path.isdir(os.path.join(folder, name)):
            if _STATE_DIR_RE.match(name):
                found.append(name + "/")
        elif name in _STATE_FILES or _STATE_FILE_RE.match(name):
            found.append(name)
    return found


def _no_training_state(folder: str) -> str:
    missing = f"it holds no optimizer, scheduler or RNG state ({STATE_FILES_TEXT})"
    effect = (
        "so resuming from it would restart Adam's moments and the learning-rate schedule from step 0 and lose "
        "the random generators' state"
    )
    if _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(folder))):
        return (
            f"resume_from_checkpoint: {folder!r} cannot be resumed: {missing}, as a checkpoint saved with "
            f"save_only_model=true, {effect}; resume from a checkpoint saved without save_only_model."
        )
    latest = last_complete_checkpoint(folder)
    hint = (
        f"resume from its last complete checkpoint, {latest!r}"
        if latest
        else "it keeps no checkpoint-N folder, so that run cannot be resumed"
    )
    return f"resume_from_checkpoint: {folder!r} is a run's final folder, not a checkpoint: {missing}, {effect}; {hint}."


# --- the model's parameter shapes ------------------------------------------------------------


def _shape_facts(config: SparseLlamaConfig) -> dict:
    """The settings that decide which parameters the model has and their shapes, as the
    keys a user writes: what `SparseLlamaForCausalLM` builds from (embedding, attention
    heads, FFN kind and width, biases, tied head, low-rank factors and their ranks). The
    2:4 and LORO training options outside this list leave every parameter as it is. The
    head counts stay in even where the tensors keep their shapes (8 heads of 4 features in
    place of 4 of 8): the weights would then be read as other heads."""
    attn_low_rank = config.loro_scope in ("all", "attn")
    mlp_low_rank = config.loro_scope in ("all", "mlp")
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        # relu and relu2 build the same non-gated FFN; silu adds gate_proj.
        "squ_relu": "gated" if config.squ_relu == "silu" else "non-gated",
        "ffn_width": config.ffn_width,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "loro_scope": config.loro_scope,
        "loro_attn_rank": config.loro_attn_rank if attn_low_rank else None,
        "loro_mlp_rank": config.loro_mlp_rank if mlp_low_rank else None,
    }


def shape_differences(theirs: SparseLlamaConfig, ours: SparseLlamaConfig) -> list[str]:
    """The config keys (in the user's terms) on which the two models' parameters differ."""
    a, b = _shape_facts(theirs), _shape_facts(ours)
    keys = [key for key in a if key != "ffn_width" and a[key] != b[key]]
    if a["ffn_width"] != b["ffn_width"]:
        # The width comes from intermediate_size (or nongated_intermediate_size) and the FFN kind.
        sizes = [
            k for k in ("intermediate_size", "nongated_intermediate_size") if getattr(theirs, k) != getattr(ours, k)
        ]
        keys += sizes or ([] if "squ_relu" in keys else ["squ_relu"])
    return keys


def _describe(config: SparseLlamaConfig, keys: list[str]) -> str:
    return ", ".join(f"{key}={getattr(config, key)!r}" for key in keys)


def _saved_config(folder: str) -> SparseLlamaConfig | None:
    """The checkpoint's model config, or None when it is not one this check can read (a
    model of another family: the Trainer then reports what it finds)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"resume_from_checkpoint: {path!r} is not readable JSON ({err}).") from None
    try:
        return SparseLlamaConfig.from_dict(raw) if isinstance(raw, dict) else None
    except (TypeError, ValueError, StrictDataclassError):
        return None


def check_model_shapes(folder: str, model_config: SparseLlamaConfig) -> None:
    saved = _saved_config(folder)
    if saved is None:
        return
    keys = shape_differences(saved, model_config)
    if keys:
        raise ConfigError(
            f"resume_from_checkpoint: {folder!r} holds a model with {_describe(saved, keys)} but this run's model "
            f"has {_describe(model_config, keys)}; its weights do not fit this model. Resume with the model_config "
            "(and model keys) it was trained with, or start a new run in another output_dir."
        )


def check_resume_target(resume: str | None, model_config: SparseLlamaConfig) -> None:
    """Refuse (ConfigError, one line) a resume folder without training state or with a
    model of other parameter shapes. Run before anything is built or written."""
    if resume is None:
        return
    if not training_state(resume):
        raise ConfigError(_no_training_state(resume))
    check_model_shapes(resume, model_config)


def nothing_to_train_message(resume: str, step: int, max_steps: int, output_dir: str) -> str:
    """The line said when the checkpoint is already at (or past) max_steps, true to where
    the checkpoint is and to what output_dir holds: nothing is trained or written."""
    out = os.path.abspath(output_dir)
    head = f"nothing to train: {resume} is at step {step} of max_steps={max_steps}"
    own_run = os.path.dirname(os.path.abspath(resume)) == out
    finished = all(os.path.isfile(os.path.join(out, name)) for name in (COMPLETION_MARKER, "config.json"))
    if own_run and finished:
        return (
            f"{head}, so this run already finished; its model and trainer_state.json in {out} are left as they are "
            "(raise max_steps to train further)."
        )
    where = f"output_dir {out} is left as it is" if os.path.exists(out) else f"output_dir {out} was not created"
    return f"{head}; nothing is trained or written ({where}); raise max_steps above {step} to train further from it."


__all__ = [
    "check_model_shapes",
    "check_resume_target",
    "nothing_to_train_message",
    "shape_differences",
    "training_state",
]
