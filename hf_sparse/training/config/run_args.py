"""The run JSON's keys, declared: one argument dataclass per `--help` section (model, 2:4
activations, weight 2:4, low rank, script; data keys in `data_args`), the original
research flags accepted as aliases, and the parsed `RunConfig`.
"""

import dataclasses
import re
import typing
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ...model.configuration_sparse_llama import SparseLlamaConfig
from ..data.data_args import DataArguments


class ConfigError(ValueError):
    """A bad run configuration; its message is one line meant for the user."""


class LaunchError(ConfigError):
    """A launcher setting that cannot work here (an accelerate config that needs a GPU on a
    machine without one, ...). Every rank finds the same, so only rank 0 reports it."""


# The model keys of the run JSON are SparseLlamaConfig's fields: each one's type, default
# and help come from the config class (its annotation, default and docstring entry), and
# only the `--help` section a key sits in is said here. A run key defaults to None: absent,
# it keeps the model JSON's value (--help shows SparseLlamaConfig's default).
MODEL_KEY_SECTIONS = (
    ("ModelArguments", "A model JSON, and the FFN type that overrides it.", ("squ_relu", "nongated_intermediate_size")),
    (
        "ActivationSparsityArguments",
        "2:4 sparsity of the ReLU² activations (Haziza et al., arXiv 2503.16672).",
        (
            "activation_2by4", "activation_sparse_method", "activation_dense_warmup_steps", "activation_auto_switch",
            "activation_auto_switch_max_drop", "activation_auto_switch_window", "activation_l1", "permute_2by4",
            "activation_backward", "activation_dense_features", "activation_2by4_fp8", "activation_dense_tail_steps",
        ),
    ),
    (
        "WeightSparsityArguments",
        "2:4 sparse weights trained from dense masters (S-STE).",
        (
            "weight_2by4", "weight_2by4_scope", "weight_sparse_method", "weight_grad_mvue", "weight_masked_decay",
            "weight_2by4_start_step", "sparse_dense_finetune_steps", "activation_dense_finetune",
        ),
    ),
    (
        "LowRankArguments",
        "Low-rank (LORO) linears, W = weight_out · weight_inᵀ; train with optimizer loro_adamw.",
        ("loro_scope", "loro_attn_rank", "loro_mlp_rank", "loro_init"),
    ),
)  # fmt: skip

# SparseLlamaConfig fields the run sets, not the run JSON.
MODEL_FIELDS_SET_BY_THE_RUN = ("activation_switch_step", "activation_dense_tail_step", "permute_2by4_seed")

# A docstring entry of a config field: `name (`type`, ...):`, then its indented description.
_FIELD_DOC_HEAD = re.compile(r"^    (\w+) \(`[^`]+`.*\):$")


def config_field_docs(config_class=SparseLlamaConfig) -> dict[str, str]:
    """Each field documented in `config_class`'s docstring (transformers' format) -> its
    description on one line, without the Markdown code marks."""
    docs, name, lines = {}, None, []
    for line in (config_class.__doc__ or "").splitlines() + [""]:
        head = _FIELD_DOC_HEAD.match(line)
        if head or (name and not line.startswith("        ")):
            if name:
                docs[name] = " ".join(" ".join(lines).split()).replace("`", "")
            name, lines = (head.group(1) if head else None), []
        elif name:
            lines.append(line)
    return docs


def _run_key_type(annotation):
    """A config field's annotation as a run key's: None allowed (absent keeps the model
    JSON's value), and `float | int` (a strict-dataclass way to accept 0) as float."""
    members = set(typing.get_args(annotation)) or {annotation}
    if float in members:
        members.discard(int)
    members.discard(type(None))
    (member,) = members
    return member | None


def _model_argument_class(name: str, doc: str, keys: tuple) -> type:
    # The class's own annotations (real types; get_type_hints would also resolve the parent's
    # string annotations, which name modules this file does not import).
    hints, docs = SparseLlamaConfig.__annotations__, config_field_docs()
    fields = [(key, _run_key_type(hints[key]), field(default=None, metadata={"help": docs[key]})) for key in keys]
    if name == "ModelArguments":
        help_text = "Model JSON (configs/llama_*.json, or the original research code's LLaMA JSON unchanged)."
        fields.insert(0, ("model_config", str, field(default=None, metadata={"help": help_text})))
    return dataclasses.make_dataclass(name, fields, namespace={"__doc__": doc, "__module__": __name__})


ModelArguments, ActivationSparsityArguments, WeightSparsityArguments, LowRankArguments = (
    _model_argument_class(*section) for section in MODEL_KEY_SECTIONS
)
MODEL_ARGUMENT_CLASSES = (ModelArguments, ActivationSparsityArguments, WeightSparsityArguments, LowRankArguments)


@dataclass
class ScriptArguments:
    """Keys of train_hf.py itself (names follow the original research script)."""

    wandb_sparsityrelu: bool = field(default=False, metadata={"help": "Log per-layer activation sparsity."})
    nm_sparsity_metrics: bool = field(
        default=True,
        metadata={
            "help": "With wandb_sparsityrelu and activation_2by4: also log sparsity_nm/4:8/... and sparsity_nm/8:16/..., "
            "the fraction of non-zero activations that keeping 4 of 8 (8 of 16) consecutive features would drop."
        },
    )
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
        default="stop",
        metadata={
            "help": "stop | skip: what a non-finite loss/activation does (see hf_sparse.training.callbacks.numerics)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that holds another run."}
    )
    flip_rate: bool = field(
        default=False, metadata={"help": "Log the 2:4 weight-mask flip rate (changed mask entries between logs)."}
    )


@dataclass
class DownstreamEvalArguments:
    """Downstream evaluation in the training loop with lm-evaluation-harness (pip install hf_sparse[eval])."""

    lm_eval_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": 'lm-eval task names (or groups/tags) evaluated in the loop, e.g. ["hf_sparse_local"] '
            '(the shipped offline tasks) or hub tasks such as ["hellaswag", "arc_easy"] (a list, or one '
            "comma-separated string); scores are logged as lm_eval/<task>/<metric> in the row with the loss, "
            "<metric> without lm-eval's ',none' filter suffix (acc,none -> acc)."
        },
    )
    lm_eval_include_path: str | None = field(
        default=None, metadata={"help": "A folder of extra lm-eval task YAMLs (beside the shipped offline tasks)."}
    )
    lm_eval_limit: int | None = field(
        default=None, metadata={"help": "Examples per task (null: all); a few hundred keep an in-loop run short."}
    )
    lm_eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N optimizer steps (null: at each evaluation, eval_strategy)."}
    )


OPTIMIZER_CHOICES = ("adamw", "loro_adamw")


SCHEDULER_CHOICES = ("trainer", "cosine_restart")


# A saved config.json used as a model JSON: what describes the saved run, not the new one
# (hf_sparse_environment: the switches that run was computed with; the new run records its own).
MODEL_JSON_DROPPED_KEYS = (
    "architectures", "transformers_version", "_name_or_path", "auto_map", "dtype", "torch_dtype",
    "hf_sparse_environment",
)  # fmt: skip


@dataclass
class RunConfig:
    training_args: TrainingArguments
    model_config: SparseLlamaConfig
    data_args: DataArguments
    script_args: ScriptArguments
    raw: dict
    eval_args: DownstreamEvalArguments = field(default_factory=DownstreamEvalArguments)


ARGUMENT_CLASSES = (*MODEL_ARGUMENT_CLASSES, DataArguments, ScriptArguments, DownstreamEvalArguments, TrainingArguments)


# The original research script's weight-sparsity flags, accepted in the run JSON so its
# users can port their runs unchanged; each maps onto a SparseLlamaConfig key.
ALIASES = {
    "enable_2to4_sparse": "original name of weight_2by4.",
    "mlp_2by4": "original flag, default true: 2:4 weights in the MLP (-> weight_2by4_scope).",
    "attn_2by4": "original flag, default false: 2:4 weights in attention (-> weight_2by4_scope).",
}


ALIAS_KEYS = tuple(ALIASES)
