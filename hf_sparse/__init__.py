"""hf_sparse: Squared-ReLU LLaMA pretraining with 2:4 activation sparsity, sparsity
telemetry and a low-rank (LORO) mode, on the stock HuggingFace Trainer."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

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
