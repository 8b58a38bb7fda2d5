"""hf_sparse: Squared-ReLU LLaMA pretraining with 2:4 activation sparsity, sparsity
telemetry and a low-rank (LORO) mode, on the stock HuggingFace Trainer."""

import contextlib
import io
import os
import sys

_WANDB_OFFLINE_BANNER = "[INFO] Running in WANDB offline mode\n"


def _import_integrations_without_wandb_banner() -> None:
    """transformers 5.24 prints "[INFO] Running in WANDB offline mode" to stdout when its
    integrations module is imported under WANDB_MODE=offline, before any output of every
    tool (--help included). Import that module first, here, with exactly that line taken
    out of what it prints; anything else still reaches stdout."""
    module = "transformers.integrations.integration_utils"
    if os.environ.get("WANDB_MODE") != "offline" or module in sys.modules:
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            import transformers.integrations.integration_utils  # noqa: F401
    finally:
        sys.stdout.write(printed.getvalue().replace(_WANDB_OFFLINE_BANNER, "", 1))


_import_integrations_without_wandb_banner()

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .model.configuration_sparse_llama import SparseLlamaConfig
from .model.modeling_sparse_llama import (
    SparseLlamaForCausalLM,
    SparseLlamaModel,
    SparseLlamaPreTrainedModel,
    prepare_2to4_gemms,
    set_training_step,
)
from .training.callbacks.telemetry import sparsity_metrics
from .training.callbacks.core import SparsityCallback, add_callbacks

__version__ = "0.2.0"  # the package version (pyproject.toml reads it from here)

AutoConfig.register(SparseLlamaConfig.model_type, SparseLlamaConfig, exist_ok=True)
AutoModel.register(SparseLlamaConfig, SparseLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(SparseLlamaConfig, SparseLlamaForCausalLM, exist_ok=True)
# `register` fills the lazy mapping only; tools that ask "is this model type a causal LM?"
# read the name table (lm-eval's backend choice, the Trainer's label smoothing, which
# shifts labels only for the causal LMs listed there). Entries without a config in
# CONFIG_MAPPING_NAMES are skipped by the lazy mapping, so the table stays consistent.
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(SparseLlamaConfig.model_type, SparseLlamaForCausalLM.__name__)
# With these, save_pretrained writes `auto_map` and copies the code files, so checkpoints
# load with trust_remote_code=True where hf_sparse is not installed.
SparseLlamaConfig.register_for_auto_class()
SparseLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "SparseLlamaConfig",
    "SparseLlamaForCausalLM",
    "SparseLlamaModel",
    "SparseLlamaPreTrainedModel",
    "SparsityCallback",
    "add_callbacks",
    "prepare_2to4_gemms",
    "set_training_step",
    "sparsity_metrics",
]
