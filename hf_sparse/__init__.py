"""hf_sparse: Squared-ReLU LLaMA pretraining with 2:4 activation sparsity, sparsity
telemetry and a low-rank (LORO) mode, on the stock HuggingFace Trainer."""

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
from .training.telemetry import sparsity_metrics
from .training.callbacks import SparsityCallback

__version__ = "0.1.0"

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
    "prepare_2to4_gemms",
    "set_training_step",
    "sparsity_metrics",
]
