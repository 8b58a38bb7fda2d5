"""Configuration of the `sparse_llama` model family: Llama with a Squared-ReLU FFN,
optional 2:4 activation sparsity and optional low-rank (LORO) linears."""

import math

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig
from transformers.utils import logging

from .lowrank import parse_low_rank_init
from .select_2to4 import SPARSE_METHODS
from .sparse_ffn import BACKWARD_MODES
from .weight_sparse import WEIGHT_SPARSE_METHODS

logger = logging.get_logger(__name__)

# The choices of the keys whose modes live in another file are declared there, beside the
# code that implements them (2:4 rules, backward modes, weight 2:4 methods, factor inits);
# the ones below choose which modules modeling_sparse_llama builds.
SQU_RELU_CHOICES = ("silu", "relu", "relu2")
LORO_SCOPE_CHOICES = (None, "all", "attn", "mlp")
WEIGHT_2BY4_SCOPE_CHOICES = ("mlp", "attn", "all")

# Non-gated FFN widths are rounded up to this multiple: it keeps the 4-feature groups of
# the 2:4 mask whole and matches the alignment sparse GEMM kernels want.
NONGATED_WIDTH_MULTIPLE = 64

# Tensor-parallel styles of low-rank linears, registered with transformers by the modeling
# file. A low-rank linear cannot use "colwise"/"rowwise": those split both factors like a
# dense weight. Column-parallel: `weight_in` replicated, `weight_out` (and bias) sharded on
# the output dim. Row-parallel: `weight_in` sharded on the input dim (its dim 0),
# `weight_out` (and bias) replicated; the rank-r intermediate is what gets summed.
LOWRANK_COLWISE = "sparse_llama_lowrank_colwise"
LOWRANK_ROWWISE = "sparse_llama_lowrank_rowwise"


def _choice_error(key, value, choices):
    return ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(repr(c) for c in choices)}.")


@strict
class SparseLlamaConfig(LlamaConfig):
    r"""Identical to [`LlamaConfig`] except for the FFN and low-rank fields below.

    squ_relu (`str`, *optional*, defaults to `"silu"`):
        FFN activation: `"silu"` is the stock gated SwiGLU FFN (gate/up/down); `"relu"` and
        `"relu2"` (Squared ReLU) are non-gated, `down(act(up(x)))`.
    nongated_intermediate_size (`int`, *optional*):
        Width of the non-gated FFN. Default (null): `1.5 * intermediate_size` (the parameter
        count of SwiGLU) rounded up to a multiple of 64.
    activation_2by4 (`bool`, *optional*, defaults to `False`):
        2:4-sparsify the ReLU² output before `down_proj` (needs `squ_relu="relu2"`).
    activation_sparse_method (`str`, *optional*, defaults to `"naive"`):
        The forward 2:4 rule: `"naive"` (keep the 2 largest of each 4; the paper's), `"mvue"`
        (unbiased stochastic) or `"soft_threshold"` (S-STE).
    activation_dense_warmup_steps (`int`, *optional*, defaults to 1000):
        Optimizer steps trained with the dense FFN before 2:4 sparsity switches on (with
        `activation_auto_switch`: the longest warm-up allowed).
    activation_auto_switch (`bool`, *optional*, defaults to `False`):
        End the dense warm-up when the telemetry says 2:4 would cost little: once the
        fraction of non-zero activations the 2:4 rule would drop, pooled over layers and
        ranks, stays below `activation_auto_switch_max_drop` for
        `activation_auto_switch_window` consecutive training log rows (`SparsityCallback`).
    activation_auto_switch_max_drop (`float`, *optional*, defaults to 0.12):
        The auto switch's threshold: the fraction of non-zero activations 2:4 would drop, in
        (0, 1]. On the quickstart model it falls from 0.19 (step 10) to 0.11 (step 60) and
        levels off at 0.10: the default sits just above.
    activation_auto_switch_window (`int`, *optional*, defaults to 2):
        How many consecutive training log rows must stay below the auto switch's threshold.
    activation_switch_step (`int`, *optional*):
        Set by the auto switch (not a run key): the optimizer step at which 2:4 activations
        started.
    activation_dense_tail_steps (`int`, *optional*, defaults to 0):
        The last N optimizer steps run the FFN densely again (exact dense ReLU², no mask;
        needs max_steps), whatever the weights do; the telemetry still reports what 2:4
        would drop. A model with an activation dense tail runs dense after training.
    activation_dense_tail_step (`int`, *optional*):
        Set by the run (not a run key) once the activation dense tail began: the optimizer
        step from which the FFN ran dense again.
    activation_l1 (`float`, *optional*, defaults to 0.0):
        λ of an L1 penalty on the FFN activations: in training the loss gains λ·mean(a) for
        every MLP, a = the activation that reaches down_proj (`relu`/`relu2`, 2:4-sparsified
        once 2:4 is on; non-negative, so this is its mean absolute value): it pushes the
        activations sparser. Logged as `activation_l1/loss`.
    permute_2by4 (`bool`, *optional*, defaults to `True`):
        Apply a fixed token permutation (drawn from the seed) before the token-wise 2:4 of
        the backward pass.
    permute_2by4_seed (`int`, *optional*, defaults to 0):
        Seed of that permutation (not a run key: `train_hf.py` sets it from the training
        seed). It lives in the config so a resumed or reloaded model uses the same
        permutation.
    activation_backward (`str`, *optional*, defaults to `"split_gemm"`):
        The weight-gradient mode: `"split_gemm"` (the paper's), `"naive"` (feature-wise 2:4
        on all features) or `"exact"` (the gradient of the masked forward); see
        `hf_sparse.model.sparse_ffn`.
    activation_dense_features (`float`, *optional*, defaults to 0.05):
        `split_gemm`: the fraction of densest features kept in a dense GEMM of the weight
        gradients (1.0: the same as `exact`).
    activation_2by4_fp8 (`bool`, *optional*, defaults to `False`):
        Run the 2:4 FFN's forward and input-gradient GEMMs as row-wise scaled FP8 e4m3 2:4
        GEMMs (the paper's fast path); needs an sm90 GPU with cuSPARSELt >= 0.6.2 and is
        refused before anything runs elsewhere.
    loro_scope (`str`, *optional*):
        Which decoder linears are low-rank: null (full rank), `"all"`, `"attn"` or `"mlp"`.
    loro_attn_rank (`int`, *optional*, defaults to 256):
        Rank of the low-rank attention linears.
    loro_mlp_rank (`int`, *optional*, defaults to 256):
        Rank of the low-rank FFN linears.
    loro_init (`str`, *optional*, defaults to `"xavier"`):
        Factor initialisation: `xavier`, `auto`, `kaiming`, `orth` or `randn_<std>`.
    weight_2by4 (`bool`, *optional*, defaults to `False`):
        Train 2:4 sparse weights from dense masters (see `hf_sparse.model.weight_sparse`).
    weight_2by4_scope (`str`, *optional*, defaults to `"mlp"`):
        The linears with 2:4 weights: `"mlp"` (gate/up/down), `"attn"` (q/k/v/o) or `"all"`.
    weight_sparse_method (`str`, *optional*, defaults to `"s_ste"`):
        `"s_ste"` (shrunk by the third largest, with a fixed per-matrix scale) or `"ste"`
        (hard top-2).
    weight_grad_mvue (`bool`, *optional*, defaults to `False`):
        MVUE 2:4 of the output gradient (along tokens) in the weight-gradient GEMM.
    weight_masked_decay (`float`, *optional*, defaults to 0.0):
        λ of the masked decay λ·(1−M)⊙W added to the master's gradient (0: off).
    weight_2by4_start_step (`int`, *optional*, defaults to 0):
        Optimizer steps trained with dense weights before the 2:4 weights switch on.
    sparse_dense_finetune_steps (`int`, *optional*, defaults to 0):
        The last N optimizer steps run with dense weights (the dense tail; needs max_steps),
        and dense activations too with `activation_dense_finetune`. A model with a dense
        tail runs dense after training.
    activation_dense_finetune (`bool`, *optional*, defaults to `False`):
        Also run the FFN densely (no 2:4 activations) during the weights' dense tail.
    """

    model_type = "sparse_llama"

    squ_relu: str = "silu"
    nongated_intermediate_size: int | None = None
    activation_2by4: bool = False
    activation_sparse_method: str = "naive"
    activation_dense_warmup_steps: int = 1000
    activation_auto_switch: bool = False
    activation_auto_switch_max_drop: float | int = 0.12
    activation_auto_switch_window: int = 2
    activation_switch_step: int | None = None
    activation_dense_tail_steps: int = 0
    activation_dense_tail_step: int | None = None
    activation_l1: float | int = 0.0
    permute_2by4: bool = True
    permute_2by4_seed: int = 0
    activation_backward: str = "split_gemm"
    activation_dense_features: float | int = 0.05
    activation_2by4_fp8: bool = False
    loro_scope: str | None = None
    loro_attn_rank: int = 256
    loro_mlp_rank: int = 256
    loro_init: str = "xavier"
    weight_2by4: bool = False
    weight_2by4_scope: str = "mlp"
    weight_sparse_method: str = "s_ste"
    weight_grad_mvue: bool = False
    weight_masked_decay: float | int = 0.0
    weight_2by4_start_step: int = 0
    sparse_dense_finetune_steps: int = 0
    activation_dense_finetune: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_sparsity_settings()

    def validate_sparsity_settings(self):
        """Raises a `ValueError` naming the offending key and its valid values.

        Plain `ValueError`s (not the strict-dataclass wrappers) so that callers and users
        get one readable line.
        """
        if self.squ_relu not in SQU_RELU_CHOICES:
            raise _choice_error("squ_relu", self.squ_relu, SQU_RELU_CHOICES)
        if self.activation_sparse_method not in SPARSE_METHODS:
            raise _choice_error("activation_sparse_method", self.activation_sparse_method, SPARSE_METHODS)
        if self.activation_backward not in BACKWARD_MODES:
            raise _choice_error("activation_backward", self.activation_backward, BACKWARD_MODES)
        if self.activation_2by4 and self.squ_relu != "relu2":
            raise ValueError(
                f"activation_2by4=True requires squ_relu='relu2' (got squ_relu={self.squ_relu!r}); "
                "2:4 activation sparsity is defined on the Squared-ReLU output."
            )
        if self.activation_2by4_fp8 and not self.activation_2by4:
            raise ValueError("activation_2by4_fp8=True requires activation_2by4=True (FP8 is a mode of the 2:4 FFN).")
        if self.activation_2by4 and self.mlp_bias:
            raise ValueError("activation_2by4=True does not support mlp_bias=True; set mlp_bias=False.")
        if not 0.0 <= self.activation_dense_features <= 1.0:
            raise ValueError(f"activation_dense_features={self.activation_dense_features!r} must be in [0, 1].")
        if self.activation_dense_warmup_steps < 0:
            raise ValueError(f"activation_dense_warmup_steps={self.activation_dense_warmup_steps!r} must be >= 0.")
        if self.activation_l1 < 0:
            raise ValueError(f"activation_l1={self.activation_l1!r} must be >= 0.")
        if self.activation_l1 and self.squ_relu not in ("relu", "relu2"):
            raise ValueError(f"activation_l1 needs squ_relu 'relu' or 'relu2' (got {self.squ_relu!r}).")
        if self.activation_dense_tail_steps < 0:
            raise ValueError(f"activation_dense_tail_steps={self.activation_dense_tail_steps!r} must be >= 0.")
        if self.activation_dense_tail_steps and not self.activation_2by4:
            raise ValueError(
                "activation_dense_tail_steps > 0 requires activation_2by4=True (the tail ends the 2:4 activations)."
            )
        if self.activation_auto_switch and not self.activation_2by4:
            raise ValueError("activation_auto_switch=True requires activation_2by4=True (it decides when 2:4 starts).")
        if not 0.0 < self.activation_auto_switch_max_drop <= 1.0:
            raise ValueError(
                f"activation_auto_switch_max_drop={self.activation_auto_switch_max_drop!r} must be in (0, 1]."
            )
        if self.activation_auto_switch_window < 1:
            raise ValueError(f"activation_auto_switch_window={self.activation_auto_switch_window!r} must be >= 1.")
        if self.nongated_intermediate_size is not None:
            if self.nongated_intermediate_size <= 0 or self.nongated_intermediate_size % 4:
                raise ValueError(
                    f"nongated_intermediate_size={self.nongated_intermediate_size!r} must be a positive "
                    "multiple of 4 (2:4 groups span 4 features)."
                )
        if self.loro_scope not in LORO_SCOPE_CHOICES:
            raise _choice_error("loro_scope", self.loro_scope, LORO_SCOPE_CHOICES)
        parse_low_rank_init(self.loro_init)  # raises naming loro_init and its choices
        for key in ("loro_attn_rank", "loro_mlp_rank"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be a positive integer.")
        if self.loro_scope in ("all", "attn"):
            attn_dims = (
                self.hidden_size,
                self.num_attention_heads * self.head_dim,
                self.num_key_value_heads * self.head_dim,
            )
            if self.loro_attn_rank > min(attn_dims):
                raise ValueError(
                    f"loro_attn_rank={self.loro_attn_rank} is larger than the smallest attention matrix side "
                    f"({min(attn_dims)}); use loro_attn_rank <= {min(attn_dims)}."
                )
        self._validate_weight_2by4()
        if self.loro_scope in ("all", "mlp"):
            mlp_dims = (self.hidden_size, self.ffn_width)
            if self.loro_mlp_rank > min(mlp_dims):
                raise ValueError(
                    f"loro_mlp_rank={self.loro_mlp_rank} is larger than the smallest FFN matrix side "
                    f"({min(mlp_dims)}); use loro_mlp_rank <= {min(mlp_dims)}."
                )

    def _validate_weight_2by4(self):
        if self.weight_2by4_scope not in WEIGHT_2BY4_SCOPE_CHOICES:
            raise _choice_error("weight_2by4_scope", self.weight_2by4_scope, WEIGHT_2BY4_SCOPE_CHOICES)
        if self.weight_sparse_method not in WEIGHT_SPARSE_METHODS:
            raise _choice_error("weight_sparse_method", self.weight_sparse_method, WEIGHT_SPARSE_METHODS)
        for key in ("weight_2by4_start_step", "sparse_dense_finetune_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be >= 0.")
        if self.weight_masked_decay < 0:
            raise ValueError(f"weight_masked_decay={self.weight_masked_decay!r} must be >= 0.")
        if not self.weight_2by4:
            return
        # Each targeted matrix is 2:4 along its input dim (each factor along its own in
        # low-rank mode): those widths must split into groups of 4.
        for key, width in self.weight_2by4_input_widths().items():
            if width % 4:
                raise ValueError(
                    f"weight_2by4=True needs every targeted input width divisible by 4, but {key} has "
                    f"input width {width}; change that size or weight_2by4_scope={self.weight_2by4_scope!r}."
                )

    def weight_2by4_input_widths(self) -> dict[str, int]:
        """Input width (the 2:4 group dim) of every matrix weight 2:4 targets, by a readable name."""
        widths = {}
        low_rank = self.loro_scope
        if self.weight_2by4_scope in ("mlp", "all"):
            if low_rank in ("all", "mlp"):
                widths.update({"mlp weight_in": self.hidden_size, "mlp weight_out": self.loro_mlp_rank})
                widths["mlp down_proj.weight_in"] = self.ffn_width
            else:
                widths.update({"up_proj": self.hidden_size, "down_proj": self.ffn_width})
        if self.weight_2by4_scope in ("attn", "all"):
            if low_rank in ("all", "attn"):
                widths.update({"attn weight_in": self.hidden_size, "attn weight_out": self.loro_attn_rank})
                widths["o_proj.weight_in"] = self.num_attention_heads * self.head_dim
            else:
                widths.update({"q_proj": self.hidden_size, "o_proj": self.num_attention_heads * self.head_dim})
        return widths

    def weight_2by4_active(self, step: int | None, max_steps: int | None) -> bool:
        """Whether the forward uses 2:4 weights after `step` optimizer steps of `max_steps`.

        `step=None` (no trainer: inference, export) means "as the run ended": sparse,
        unless the run had a dense tail.
        """
        if not self.weight_2by4:
            return False
        if step is None:
            return self.sparse_dense_finetune_steps == 0
        return step >= self.weight_2by4_start_step and not self.in_dense_tail(step, max_steps)

    def activation_warmup_end(self) -> int:
        """The optimizer step from which 2:4 activations run: the fixed warm-up, or the auto
        switch's step once it has switched (the fixed warm-up stays its cap)."""
        warmup = self.activation_dense_warmup_steps
        if self.activation_auto_switch and self.activation_switch_step is not None:
            return min(warmup, self.activation_switch_step)
        return warmup

    def in_dense_tail(self, step: int | None, max_steps: int | None) -> bool:
        """Whether `step` falls in the last `sparse_dense_finetune_steps` of `max_steps`."""
        tail = self.sparse_dense_finetune_steps
        if not tail:
            return False
        if step is None:
            return True
        return bool(max_steps) and max_steps > 0 and step >= max_steps - tail

    def activation_dense_tail_start(self, max_steps: int | None) -> int | None:
        """The optimizer step from which the FFN runs dense again (`activation_dense_tail_steps`
        counted back from `max_steps`); None without a tail or a known run length."""
        tail = self.activation_dense_tail_steps
        if not tail or not max_steps or max_steps <= 0:
            return None
        return max(0, max_steps - tail)

    def in_activation_dense_tail(self, step: int | None, max_steps: int | None) -> bool:
        """Whether the FFN runs without its 2:4 mask at `step`: in its own dense tail, or in
        the weights' with `activation_dense_finetune`. `step=None` (no trainer): as the run
        ended, so dense when the run had a tail."""
        if self.activation_dense_finetune and self.in_dense_tail(step, max_steps):
            return True
        if step is None:
            return self.activation_dense_tail_steps > 0
        start = self.activation_dense_tail_start(max_steps)
        return start is not None and step >= start

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel plan of the decoder (what `tp_plan="auto"` applies), from the
        FFN kind and `loro_scope`: Llama's plan without `mlp.gate_proj` for non-gated FFNs,
        and the low-rank styles on low-rank linears. Weight 2:4 keeps the dense names here
        (every key must name a module) and is refused when TP is applied
        (`check_tensor_parallel`)."""
        attn_low_rank = self.loro_scope in ("all", "attn")
        mlp_low_rank = self.loro_scope in ("all", "mlp")
        attn_col, attn_row = (LOWRANK_COLWISE, LOWRANK_ROWWISE) if attn_low_rank else ("colwise", "rowwise")
        mlp_col, mlp_row = (LOWRANK_COLWISE, LOWRANK_ROWWISE) if mlp_low_rank else ("colwise", "rowwise")
        plan = {f"layers.*.self_attn.{name}": attn_col for name in ("q_proj", "k_proj", "v_proj")}
        plan["layers.*.self_attn.o_proj"] = attn_row
        if self.squ_relu == "silu":
            plan["layers.*.mlp.gate_proj"] = mlp_col
        plan["layers.*.mlp.up_proj"] = mlp_col
        plan["layers.*.mlp.down_proj"] = mlp_row
        return plan

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raises a `ValueError` (one line) when this model cannot be split over `tp_size`
        tensor-parallel ranks; every rank reaches the same verdict, so none is left waiting."""
        if tp_size <= 1:
            return
        if self.weight_2by4:
            raise ValueError(
                "tensor parallelism (tp_plan) is not supported with weight_2by4=True: the 2:4 weight's scale "
                "<W,S(W)>/<S(W),S(W)> spans the whole matrix and its straight-through autograd runs on whole "
                "tensors. Train it with DDP/FSDP, or export it (`python -m hf_sparse.export RUN_DIR OUT_DIR` "
                "stores scale*S(W) as plain weights, weight_2by4=False) and load the export with tp_plan."
            )
        if self.activation_2by4:
            # Shards are torch.chunk slices of ceil(F / tp) features: their edges fall on 2:4
            # group edges iff that size is a multiple of 4 (F itself is).
            width = self.ffn_width
            local = math.ceil(width / tp_size)
            if local % 4:
                raise ValueError(
                    f"activation_2by4 with tensor parallelism needs each rank's slice of the FFN width to be a "
                    f"multiple of 4 (2:4 groups of 4 features must not straddle ranks): width {width} over "
                    f"{tp_size} ranks gives slices of {local}. Use a width that is a multiple of {4 * tp_size} "
                    "(nongated_intermediate_size) or another TP size."
                )

    @property
    def ffn_width(self) -> int:
        """Hidden width of the FFN actually built (the non-gated rule lives here only)."""
        if self.squ_relu == "silu":
            return self.intermediate_size
        if self.nongated_intermediate_size is not None:
            return self.nongated_intermediate_size
        width = 1.5 * self.intermediate_size
        return int(math.ceil(width / NONGATED_WIDTH_MULTIPLE) * NONGATED_WIDTH_MULTIPLE)


__all__ = ["SparseLlamaConfig"]
