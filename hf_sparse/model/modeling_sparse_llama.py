"""`sparse_llama`: Llama with a Squared-ReLU FFN, 2:4 activation sparsity and stat buffers.

A declared delta on `transformers`' Llama: attention, norms, rotary embeddings, the
decoder layer's forward and the model forwards are the stock ones; only the MLP (and the
constructors that build it) differ.

This file is shipped as remote code with every checkpoint: it may only import torch,
transformers and same-folder modules with `from .x import y`.
"""

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import logging

try:  # the DTensor tensor-parallel API of transformers 5.x
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer
except ImportError:
    ALL_PARALLEL_STYLES = TensorParallelLayer = None

from .configuration_sparse_llama import LOWRANK_COLWISE, LOWRANK_ROWWISE, SparseLlamaConfig
from .ffn_tensor_parallel import _is_dtensor, tp_sum_backward, tp_sum_forward
from .gemm_backends import select_gemms
from .gemm_tuning import GemmShape
from .lowrank import LowRankLinear, init_low_rank_, is_low_rank
from .select_2to4 import NM_PATTERNS, count_2to4_stats, count_nonzero
from .sparse_ffn import ffn_gemm_shapes, relu2_2to4_ffn
from .token_permutation import TokenPermutation, make_token_permutation
from .weight_sparse import Sparse24Linear, Sparse24LowRankLinear, is_weight_sparse

logger = logging.get_logger(__name__)

# Layout of each MLP's activation-stat tensor (float64: exact integer counts up to 2**53).
STAT_ZEROS, STAT_TOTAL, STAT_DROPPED_24 = 0, 1, 2  # telemetry window (reset at each log)
STAT_NONFINITE, STAT_FIRST_NONFINITE_STEP = 3, 4  # numerics guard: bad forwards, first bad step (-1: none)
# Mirror of `training_step` (None -> 0), written by its setter. The guard reads the step on
# device so that a compiled forward does not bake the Python int into its graph.
STAT_STEP = 5
# `activation_l1`: the penalty this layer added to the loss, summed over the training
# forwards of the telemetry window, and those forwards (reset at each log).
STAT_L1, STAT_FORWARDS = 6, 7
# What each N:M pattern of NM_PATTERNS would drop (reset at each log), from this slot on.
STAT_DROPPED_NM = 8
NUM_ACTIVATION_STATS = STAT_DROPPED_NM + len(NM_PATTERNS)
WINDOW_STATS = (STAT_ZEROS, STAT_TOTAL, STAT_DROPPED_24, STAT_L1, STAT_FORWARDS,
                *range(STAT_DROPPED_NM, NUM_ACTIVATION_STATS))  # fmt: skip


ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _make_linear(config: SparseLlamaConfig, in_features: int, out_features: int, bias: bool, scope: str):
    """nn.Linear, or its low-rank (`config.loro_scope` covers `scope`, "attn"/"mlp") and/or
    2:4-weight (`config.weight_2by4_scope` covers it) variant."""
    low_rank = config.loro_scope in ("all", scope)
    rank = config.loro_attn_rank if scope == "attn" else config.loro_mlp_rank
    if config.weight_2by4 and config.weight_2by4_scope in ("all", scope):
        sparse = dict(
            bias=bias,
            method=config.weight_sparse_method,
            masked_decay=config.weight_masked_decay,
            grad_mvue=config.weight_grad_mvue,
        )
        if low_rank:
            linear = Sparse24LowRankLinear(
                in_features, out_features, rank, init=config.loro_init, init_range=config.initializer_range, **sparse
            )
        else:
            linear = Sparse24Linear(in_features, out_features, **sparse)
        linear.sparse_weight_on = config.weight_2by4_active(None, None)  # until a trainer sets the step
        return linear
    if low_rank:
        return LowRankLinear(
            in_features, out_features, rank, bias=bias, init=config.loro_init, init_range=config.initializer_range
        )
    return nn.Linear(in_features, out_features, bias=bias)


def _with_row_sum_rows(w_down: torch.Tensor) -> torch.Tensor:
    """W_down (d×F) with rows appended: the first all ones (its output is each token's sum
    of the activations), the rest zero so that d stays 16-aligned for cuSPARSELt (CPU: one)."""
    if _is_dtensor(w_down):
        raise ValueError("activation_l1 with activation_2by4 is not supported under tensor parallelism yet.")
    extra = w_down.new_zeros(1 if w_down.device.type == "cpu" else 16, w_down.shape[1])
    extra[0] = 1
    return torch.cat([w_down, extra])


def _weight(linear: nn.Module) -> torch.Tensor:
    # The weight the forward uses: 2:4 weights as scale·S(W), low-rank factors as their
    # product (materialised out x in for the 2:4 FFN op only); autograd carries the
    # gradient back to the masters/factors.
    if hasattr(linear, "effective_weight"):
        return linear.effective_weight()
    if not is_low_rank(linear):
        return linear.weight
    if _is_dtensor(linear.weight_in) or _is_dtensor(linear.weight_out):
        return _tensor_parallel_low_rank_weight(linear)
    return linear.dense_weight()


def _local(t):
    return t.to_local() if _is_dtensor(t) else t


def _tensor_parallel_low_rank_weight(linear: nn.Module) -> torch.Tensor:
    """This rank's slice of a tensor-parallel low-rank linear's product, as a DTensor sharded
    like the dense weight would be (the 2:4 FFN op takes DTensor weights): column-parallel
    weight_out_local·weight_inᵀ (Shard(0)), row-parallel weight_out·weight_in_localᵀ
    (Shard(1)). The replicated factor feeds only this rank's slice, so its gradient is
    summed across ranks."""
    from torch.distributed.tensor import DTensor, Shard

    column = _is_dtensor(linear.weight_out)
    sharded = linear.weight_out if column else linear.weight_in
    mesh = sharded.device_mesh
    group = mesh.get_group()
    if column:
        local, dim = linear.weight_out.to_local() @ tp_sum_backward(linear.weight_in, group).t(), 0
    else:
        local, dim = tp_sum_backward(linear.weight_out, group) @ linear.weight_in.to_local().t(), 1
    shape = (linear.weight_out.shape[0], linear.weight_in.shape[0])
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=shape, stride=(shape[1], 1))


def _in_backward_pass() -> bool:
    # Gradient checkpointing re-runs forward from inside the backward graph task (both the
    # reentrant and the non-reentrant variants); counting there would double the stats.
    # Under torch.compile the query is a graph break, and it is not needed: dynamo traces a
    # checkpointed layer as a checkpoint region, AOTAutograd turns the stat updates into
    # mutations of a graph input applied once at the end of the forward graph, and the
    # backward graph recomputes only what the gradients need. Counted once with reentrant
    # and non-reentrant checkpointing under aot_eager and inductor (tests/test_compile.py
    # checks the Trainer's default, non-reentrant).
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class SparseLlamaMLP(nn.Module):
    """Identical to `LlamaMLP` for `squ_relu="silu"`; otherwise a non-gated
    `down(act(up(x)))` with ReLU or ReLU², optional 2:4 sparsity of the ReLU² output, and
    device-side activation statistics for telemetry."""

    def __init__(self, config: SparseLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.ffn_width
        self.squ_relu = config.squ_relu
        hidden, width, bias = self.hidden_size, self.intermediate_size, config.mlp_bias
        if self.squ_relu == "silu":
            self.gate_proj = _make_linear(config, hidden, width, bias, "mlp")
            self.act_fn = ACT2FN[config.hidden_act]
        else:
            self.act_fn = ACT2FN[self.squ_relu]
        self.up_proj = _make_linear(config, hidden, width, bias, "mlp")
        self.down_proj = _make_linear(config, width, hidden, bias, "mlp")

        self.track_activation_stats = True
        # Also count what the N:M patterns of NM_PATTERNS would drop (2:4 MLPs only; the
        # telemetry's switch, set by SparsityCallback).
        self.count_nm_stats = bool(config.activation_2by4)
        self.l1_penalty: torch.Tensor | None = None  # this forward's `activation_l1` term
        # Plain attribute, not a buffer: it must never reach a checkpoint, never be
        # broadcast by DDP. Created lazily on the input's device, or up front by
        # `ensure_activation_stats` (SparsityCallback does so before the first step, so a
        # compiled forward never creates it).
        self.activation_stats: torch.Tensor | None = None
        # Optimizer steps completed, set by `SparsityCallback` (or `set_training_step`);
        # None means "not under a trainer": a 2:4 model then runs sparse, as it was trained.
        self.max_steps: int | None = None  # set with the step: the dense tail needs the run length
        self.training_step = None
        self.token_permutation = TokenPermutation(config.permute_2by4_seed) if config.permute_2by4 else None
        # The optimizer step the weights belong to (next_weight_generation): FP8 weights are
        # quantized once per step with it.
        self.weight_generation: int | None = None

    # forward never reads the step itself: dynamo guards on every Python value a forward
    # reads, so a per-step int would recompile each step (and fall back to eager once
    # past the recompile limit). The setter derives what forward needs instead: two
    # bools that change at most once per run, and the step on device in the stat tensor.
    @property
    def training_step(self) -> int | None:
        return self._training_step

    @training_step.setter
    def training_step(self, step: int | None) -> None:
        step = None if step is None else int(step)
        self._training_step = step
        self._step_unset = step is None
        config = self.config
        self._sparse_2by4_on = (
            bool(config.activation_2by4)
            and (step is None or step >= config.activation_warmup_end())
            and not config.in_activation_dense_tail(step, self.max_steps)
        )
        if self.activation_stats is not None:
            # A fill from a Python scalar: one tiny kernel, no host sync.
            self.activation_stats[STAT_STEP].fill_(step or 0)

    @property
    def sparse_2by4_active(self) -> bool:
        return self._sparse_2by4_on

    def ensure_activation_stats(self, device) -> torch.Tensor:
        """The stat tensor, created (zeroed, no bad forward seen) if absent or on another device."""
        device = torch.device(device)
        if device.index is None and device.type != "cpu":
            device = torch.empty(0, device=device).device  # "cuda" -> "cuda:N", as inputs report it
        stats = self.activation_stats
        if stats is None or stats.device != device:
            stats = torch.zeros(NUM_ACTIVATION_STATS, dtype=torch.float64, device=device)
            stats[STAT_FIRST_NONFINITE_STEP] = -1
            stats[STAT_STEP] = self._training_step or 0
            self.activation_stats = stats
        return stats

    def _stats_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The stat tensor to accumulate into for this forward, or None to skip counting."""
        if not (self.training and self.track_activation_stats):
            return None
        if _in_backward_pass():
            return None
        return self.ensure_activation_stats(x.device)

    def _permutation(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # The per-module dict cache is Python state dynamo cannot keep in a graph; the
            # permutation is a pure function of (T, seed), computed in-graph instead.
            return make_token_permutation(num_tokens, self.config.permute_2by4_seed, device)
        return self.token_permutation(num_tokens, device)

    def forward(self, x):
        stats = self._stats_for(x)
        output = self._ffn(x, stats)
        if stats is not None:
            with torch.no_grad():
                # Read only at logging/save steps (NumericsGuardCallback): no sync here. The
                # first bad step per layer tells where a NaN started once it has spread.
                # A sum is non-finite iff some element is (NaN/Inf propagate; fp32
                # accumulation keeps fp16/bf16 outputs from overflowing): one cheap
                # reduction instead of an elementwise isfinite pass. Counts bad forwards.
                acc_dtype = torch.promote_types(output.dtype, torch.float32)
                bad = (~torch.isfinite(output.sum(dtype=acc_dtype))).to(stats.dtype)
                stats[STAT_NONFINITE] += bad
                first = stats[STAT_FIRST_NONFINITE_STEP]
                step = stats[STAT_STEP] + 1  # 1-based step of this forward, read on device
                stats[STAT_FIRST_NONFINITE_STEP] = torch.where((first < 0) & (bad > 0), step, first)
        return output

    def _nm_stats(self, stats):
        """The N:M slots of the stat tensor (a view: counts added to it land in `stats`)."""
        if stats is None or not self.count_nm_stats:
            return None
        return stats[STAT_DROPPED_NM:NUM_ACTIVATION_STATS]

    def _count_l1(self, stats) -> None:
        if stats is not None:
            with torch.no_grad():
                stats[STAT_L1] += self.l1_penalty.detach()
                stats[STAT_FORWARDS] += 1

    def _ffn(self, x, stats):
        if self.squ_relu == "silu":
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

        if self._sparse_2by4_on:
            # Eager only: a logging call cannot be traced into a graph.
            if not torch.compiler.is_compiling() and self.training and self._step_unset:
                logger.warning_once(
                    "sparse_llama: training with activation_2by4 but no training step was set, so the "
                    "dense warm-up cannot apply. Add hf_sparse.SparsityCallback to the Trainer."
                )
            permutation = None
            if self.token_permutation is not None and torch.is_grad_enabled():
                permutation = self._permutation(x.numel() // x.shape[-1], x.device)
            w_down, hidden = _weight(self.down_proj), x.shape[-1]
            l1 = self.config.activation_l1 if (self.training and torch.is_grad_enabled()) else 0.0
            if l1:
                w_down = _with_row_sum_rows(w_down)
            y = relu2_2to4_ffn(
                x,
                _weight(self.up_proj),
                w_down,
                method=self.config.activation_sparse_method,
                backward=self.config.activation_backward,
                dense_features=self.config.activation_dense_features,
                permutation=permutation,
                stats=stats,
                nm_stats=self._nm_stats(stats),
                fp8=self.config.activation_2by4_fp8,
                # Read eagerly only: an int that changes every step would be a recompile per step.
                weight_generation=None if torch.compiler.is_compiling() else self.weight_generation,
            )
            if not l1:
                return y
            # The extra output column is each token's sum of the 2:4 activation that reached
            # down_proj; its gradient (whatever scales the loss) adds λ/(T·F) to dy2 inside
            # the op's backward, exactly as the penalty λ·mean(y2s) would.
            row_sums = y[..., hidden]
            acc_dtype = torch.promote_types(y.dtype, torch.float32)
            self.l1_penalty = l1 * row_sums.sum(dtype=acc_dtype) / (row_sums.numel() * w_down.shape[1])
            self._count_l1(stats)
            return y[..., :hidden]

        activation = self.act_fn(self.up_proj(x))
        if self.config.activation_l1 and self.training and torch.is_grad_enabled():
            # act >= 0 for relu/relu2, so its mean is its mean absolute value; fp32 accumulation.
            # The CausalLM's loss_function adds it (and clears it) once per forward.
            acc_dtype = torch.promote_types(activation.dtype, torch.float32)
            self.l1_penalty = self.config.activation_l1 * activation.mean(dtype=acc_dtype)
            self._count_l1(stats)
        if stats is not None:
            with torch.no_grad():
                if self.config.activation_2by4:
                    # Dense warm-up: count what the 2:4 mask *would* drop.
                    count_2to4_stats(activation, stats, method=self.config.activation_sparse_method,
                                     nm_stats=self._nm_stats(stats))  # fmt: skip
                else:
                    stats[STAT_TOTAL] += activation.numel()
                    stats[STAT_ZEROS] += activation.numel() - count_nonzero(activation)
        return self.down_proj(activation)


# ----- Tensor parallelism of low-rank linears -----


class LowRankTensorParallel(TensorParallelLayer if TensorParallelLayer is not None else object):
    """transformers tensor-parallel style of a low-rank linear (W = weight_out·weight_inᵀ).

    Column-parallel (`column=True`): weight_in replicated, weight_out and bias sharded on the
    output dim; the rank-r intermediate h = x·weight_in is replicated, so its gradient is
    summed across ranks (one T×r all-reduce covers both x's and weight_in's gradients); the
    output is this rank's slice of the features, as with "colwise". Row-parallel: weight_in
    sharded on the input dim (its dim 0), weight_out and bias replicated; each rank's
    partial h is summed (a T×r all-reduce in place of "rowwise"'s T×out one) and the output
    is replicated. Replicated factors stay plain tensors, as norms do; every gradient has
    its parameter's layout."""

    def __init__(self, column: bool):
        self.column = column

    def shard_param(self, module, param, mesh):
        from torch.distributed.tensor import Shard, distribute_tensor

        meta = module._parameters.get(param)
        sharded = ("weight_out", "bias") if self.column else ("weight_in",)
        if meta is None or param not in sharded:
            return
        module._parameters[param] = nn.Parameter(
            distribute_tensor(meta, mesh, [Shard(0)], src_data_rank=None), requires_grad=meta.requires_grad
        )

    def install_forward(self, module, mesh):
        if not is_low_rank(module) or is_weight_sparse(module):
            raise ValueError(
                f"{LOWRANK_COLWISE if self.column else LOWRANK_ROWWISE} shards low-rank linears "
                f"(weight_in/weight_out), not {type(module).__name__}"
            )
        group, column = mesh.get_group(), self.column

        def tp_forward(x):
            if _is_dtensor(x):
                from torch.distributed.tensor import Replicate, Shard

                x = x.redistribute(placements=[Replicate() if column else Shard(-1)]).to_local()
            weight_out, bias = _local(module.weight_out), _local(module.bias)
            if column:
                hidden = tp_sum_backward(F.linear(x, module.weight_in.t()), group)
            else:
                hidden = tp_sum_forward(F.linear(x, module.weight_in.to_local().t()), group)
            return F.linear(hidden, weight_out, bias)

        module.forward = tp_forward
        return module


if ALL_PARALLEL_STYLES is not None and torch.distributed.is_available():
    # Re-registering (a second copy of this file loaded as remote code) is harmless.
    ALL_PARALLEL_STYLES.register(LOWRANK_COLWISE, LowRankTensorParallel(column=True))
    ALL_PARALLEL_STYLES.register(LOWRANK_ROWWISE, LowRankTensorParallel(column=False))


class SparseLlamaDecoderLayer(LlamaDecoderLayer):
    """Identical to `LlamaDecoderLayer` except that its MLP is a `SparseLlamaMLP` and, in
    low-rank or 2:4-weight mode, its attention projections are the matching linears."""

    def __init__(self, config: SparseLlamaConfig, layer_idx: int):
        # Skip LlamaDecoderLayer.__init__ so no throw-away LlamaMLP is allocated.
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        weight_2by4_attn = config.weight_2by4 and config.weight_2by4_scope in ("all", "attn")
        if config.loro_scope in ("all", "attn") or weight_2by4_attn:
            for name in ATTENTION_LINEARS:
                dense = getattr(self.self_attn, name)
                low_rank = _make_linear(config, dense.in_features, dense.out_features, dense.bias is not None, "attn")
                setattr(self.self_attn, name, low_rank)
        self.mlp = SparseLlamaMLP(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SparseLlamaPreTrainedModel(LlamaPreTrainedModel):
    """Identical to `LlamaPreTrainedModel` except for the config class and layer names."""

    config: SparseLlamaConfig
    config_class = SparseLlamaConfig
    _no_split_modules = ["SparseLlamaDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": SparseLlamaDecoderLayer,
        "attentions": LlamaAttention,
    }

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        # Refuse what cannot be split before any parameter is sharded (one clear error on
        # every rank instead of a crash inside a collective).
        if mesh_manager is not None and getattr(distributed_config, "tp_size", 1) > 1:
            model.config.check_tensor_parallel(distributed_config.tp_size)
        return super().maybe_distribute_model(model, distributed_config, mesh_manager)

    def _init_weights(self, module):
        super()._init_weights(module)
        if is_low_rank(module):
            init_low_rank_(module, init=self.config.loro_init, init_range=self.config.initializer_range)
        if is_weight_sparse(module):
            # 0 = "not fixed yet": set on the first sparse forward from the weights then.
            for name, buffer in module.named_buffers(recurse=False):
                if name.endswith("2by4_scale"):
                    buffer.zero_()


class SparseLlamaModel(SparseLlamaPreTrainedModel, LlamaModel):
    """Identical to `LlamaModel` except that its layers are `SparseLlamaDecoderLayer`s."""

    def __init__(self, config: SparseLlamaConfig):
        SparseLlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [SparseLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class SparseLlamaForCausalLM(SparseLlamaPreTrainedModel, LlamaForCausalLM, GenerationMixin):
    """Identical to `LlamaForCausalLM` except that its body is a `SparseLlamaModel`.

    `GenerationMixin` is listed although `LlamaForCausalLM` already brings it: transformers
    recognises generative models by their direct bases. The MRO, hence `generate`, is
    unchanged."""

    def __init__(self, config: SparseLlamaConfig):
        SparseLlamaPreTrainedModel.__init__(self, config)
        self.model = SparseLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.activation_l1:
            # The loss gains the MLPs' L1 terms. Set as a bound method, not by overriding the
            # loss_function property: dynamo cannot trace `super().loss_function` (a graph
            # break per forward), and a bound method follows the model through deepcopy.
            self._base_loss_function = self.loss_function
            self.loss_function = self._loss_with_activation_l1

    def _loss_with_activation_l1(self, *args, **kwargs):
        """Llama's loss plus, in training, every MLP's `activation_l1` term of this forward."""
        loss = self._base_loss_function(*args, **kwargs)
        if self.training:
            for _, mlp in sparse_mlps(self):
                if mlp.l1_penalty is not None:
                    loss = loss + mlp.l1_penalty
                    mlp.l1_penalty = None  # one forward's term, added once
        return loss


def sparse_mlps(model: nn.Module):
    """(layer_idx, SparseLlamaMLP) pairs of `model`, in layer order; works through wrappers."""
    return [(m.layer_idx, m) for m in model.modules() if isinstance(m, SparseLlamaMLP)]


def set_training_step(model: nn.Module, step: int | None, max_steps: int | None = None) -> None:
    """Tell every sparse MLP and 2:4-weight linear how many optimizer steps are done of
    `max_steps` (drives the dense warm-up, the weight 2:4 start and the dense tail)."""
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(module, SparseLlamaMLP) or not isinstance(mlp, SparseLlamaMLP):
            continue
        # A decoder layer: its MLP and attention share the schedule of its config.
        mlp.max_steps = max_steps
        mlp.training_step = step
        weight_on = mlp.config.weight_2by4_active(step, max_steps)
        for linear in module.modules():
            if is_weight_sparse(linear):
                linear.sparse_weight_on = weight_on


def prepare_2to4_gemms(
    model: nn.Module, tokens: int, dtype: torch.dtype | None = None, *, backward: bool = True
) -> list[tuple[str, GemmShape]]:
    """Verify and time, eagerly, the 2:4 GEMMs the model will run for ``tokens`` tokens per
    forward (``dtype``: the compute dtype, e.g. the autocast one; default the weights');
    ``backward=False``: the forward's GEMMs only (an evaluation's).

    The per-shape verdicts (``gemm_tuning``) are otherwise made at the first call of each
    shape, inside step 1; made here, before the first (possibly compiled) step, they stay
    out of the hot path. Each shape goes to the back-end its calls will take
    (``gemm_backends.select_gemms``); only one that tunes (cuSPARSELt) makes verdicts.
    Returns the (name, shape) pairs whose verdicts were made.
    """
    # Shapes, dtypes and devices only: building a 2:4 weight here would fix its scale early.
    named: dict = {}  # back-end -> {(shape key, device): (label, shape, device)}

    def probe(rows: int, cols: int, like: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        return torch.empty(1, dtype=compute, device=like.device).expand(rows, cols)

    for _, mlp in sparse_mlps(model):
        param = next(mlp.up_proj.parameters())
        compute = dtype or param.dtype
        d, f = mlp.up_proj.in_features, mlp.up_proj.out_features
        x, w_up, w_down = probe(tokens, d, param, compute), probe(f, d, param, compute), probe(d, f, param, compute)
        backend = select_gemms(x, w_up, w_down)
        if mlp.config.activation_2by4 and backend.sparse:
            shapes = ffn_gemm_shapes(
                tokens, d, f, compute, mlp.config.activation_dense_features, mlp.config.activation_backward,
                fp8=mlp.config.activation_2by4_fp8,
            )  # fmt: skip
            shapes = shapes if backward else [(name, shape) for name, shape in shapes if name == "y3"]
            named.setdefault(backend, {}).update(
                {(shape.key(), param.device): (f"FFN {name}", shape, param.device) for name, shape in shapes}
            )
    for module_name, linear in model.named_modules():
        if is_weight_sparse(linear) and hasattr(linear, "weight"):
            compute = dtype or linear.weight.dtype
            out_f, in_f = linear.weight.shape
            weight = probe(out_f, in_f, linear.weight, compute)
            backend = select_gemms(probe(tokens, in_f, linear.weight, compute), weight, weight)
            if backend.sparse:
                shape = GemmShape(out_f, in_f, tokens, "col", True, str(compute).split(".")[-1])
                label = "2:4 weight " + module_name.rsplit(".", 2)[-2] + "." + module_name.rsplit(".", 1)[-1]
                entry = (label, shape, linear.weight.device)
                named.setdefault(backend, {}).setdefault((shape.key(), linear.weight.device), entry)
    done = []
    for backend, entries in named.items():
        by_device: dict = {}
        for label, shape, device in entries.values():
            by_device.setdefault(device, []).append((label, shape))
        for device, shapes in by_device.items():
            done += backend.prepare(shapes, device)
    return done


def set_nm_counting(model: nn.Module, enabled: bool) -> None:
    """Whether the 2:4 MLPs also count what the N:M patterns (NM_PATTERNS) would drop."""
    for _, mlp in sparse_mlps(model):
        mlp.count_nm_stats = bool(enabled and mlp.config.activation_2by4)


def ensure_activation_stats(model: nn.Module, device=None) -> None:
    """Create every sparse MLP's stat tensor on `device` (default: the MLP's parameters'
    device) unless it is already there. Call before compiled training forwards: a stat
    tensor created inside a compiled forward is a module-attribute mutation (one extra
    recompile). Eager use needs no call: forward creates the tensor itself."""
    for _, mlp in sparse_mlps(model):
        target = device
        if target is None:
            target = next((p.device for p in mlp.parameters()), torch.device("cpu"))
        mlp.ensure_activation_stats(target)


__all__ = [
    "SparseLlamaPreTrainedModel",
    "SparseLlamaModel",
    "SparseLlamaForCausalLM",
    "SparseLlamaMLP",
    "sparse_mlps",
    "set_training_step",
    "ensure_activation_stats",
    "set_nm_counting",
    "prepare_2to4_gemms",
]
