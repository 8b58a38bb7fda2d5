"""The run JSON's keys, declared: one argument dataclass per `--help` section (model, 2:4
activations, weight 2:4, low rank, script; data keys in `data_args`), the original
research flags accepted as aliases, and the parsed `RunConfig`.
"""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ...model.configuration_sparse_llama import SparseLlamaConfig
from ..data.data_args import DataArguments


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
        "Optimizer steps trained densely before the 2:4 activations switch on (with activation_auto_switch: "
        "the most allowed)."
    )
    activation_auto_switch: bool | None = _model_key(
        "Switch to 2:4 once the would-drop fraction (pooled over layers and ranks) stays below "
        "activation_auto_switch_max_drop for activation_auto_switch_window training log rows."
    )
    activation_auto_switch_max_drop: float | None = _model_key(
        "The auto switch's threshold: fraction of non-zero activations 2:4 would drop, in (0, 1]."
    )
    activation_auto_switch_window: int | None = _model_key("Consecutive training log rows below the threshold.")
    activation_l1: float | None = _model_key(
        "λ of an L1 penalty λ·mean(act) per MLP added to the training loss (relu/relu2; with 2:4 on, on the "
        "2:4 activation); logged as activation_l1/loss."
    )
    permute_2by4: bool | None = _model_key("Fixed token permutation for the backward 2:4 (drawn from the seed).")
    activation_backward: str | None = _model_key(
        "split_gemm (the paper's) | naive (feature-wise 2:4 on all features) | exact (gradient of the masked forward)."
    )
    activation_dense_features: float | None = _model_key(
        "split_gemm: fraction of the densest features kept in a dense GEMM (1.0: same as exact)."
    )
    activation_2by4_fp8: bool | None = _model_key(
        "Forward and input-gradient 2:4 GEMMs in row-wise FP8 e4m3 (the paper's fast path); needs an sm90 "
        "GPU with cuSPARSELt >= 0.6.2 and is refused before anything runs elsewhere."
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
