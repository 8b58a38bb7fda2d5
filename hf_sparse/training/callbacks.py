"""`SparsityCallback`: drives the 2:4 dense warm-up from the Trainer's optimizer step and
merges sparsity telemetry into every logging backend."""

import logging
import math
import os
import sys

import torch
from transformers import TrainerCallback
from transformers.integrations import INTEGRATION_TO_CALLBACK
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..model.modeling_sparse_llama import ensure_activation_stats, prepare_2to4_gemms, set_training_step
from ..model.weight_sparse import next_weight_generation
from .auto_switch import SWITCH_STEP_KEY, auto_switch_config, update_switch
from .checkpoints import apply_umask_permissions, enable_cache_in_saved_config, write_model_card
from .telemetry import snapshot_weight_masks, sparsity_metrics

logger = logging.getLogger(__name__)

_REPORTING_CALLBACK_TYPES = tuple(
    cb for cb in INTEGRATION_TO_CALLBACK.values() if isinstance(cb, type)
)

_ORDER_HELP = (
    "{name} must run before the reporting integrations (wandb, TensorBoard, ...) "
    "or its metrics reach the console only. Insert it first: "
    "trainer.callback_handler.callbacks.insert(0, {name}())."
)


def _calling_handler():
    """The `CallbackHandler` that is calling the current callback event, if any.

    `CallbackHandler.call_event` does not hand callbacks a reference to itself, and the
    order it calls them in decides whether our metrics reach wandb/TensorBoard (they run
    before callbacks passed in `Trainer(callbacks=...)`), so we look a few frames up for
    `call_event`.
    """
    frame = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler):
            return candidate
        frame = frame.f_back
    return None


def merge_into_log_row(state, logs: dict, metrics: dict) -> None:
    """Add `metrics` to the row being logged: to `logs` (what the reporting integrations
    that run later see) and to the copy Trainer.log already appended to log_history."""
    logs.update(metrics)
    if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items() if k not in metrics):
        state.log_history[-1].update(metrics)


class _FirstCallback(TrainerCallback):
    """A callback that adds keys to `logs` and so must run before the reporting
    integrations; it moves itself to the front of the handler the first time it is
    called, and refuses to log silently to the console only."""

    def _move_first(self):
        handler = _calling_handler()
        if handler is None or (handler.callbacks and handler.callbacks[0] is self):
            return
        # A new list: call_event keeps iterating the old one, so no callback runs twice.
        handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]

    def _check_order(self):
        handler = _calling_handler()
        if handler is None:
            return
        position = next(i for i, cb in enumerate(handler.callbacks) if cb is self)
        if any(isinstance(cb, _REPORTING_CALLBACK_TYPES) for cb in handler.callbacks[:position]):
            raise RuntimeError(_ORDER_HELP.format(name=type(self).__name__))

    def on_init_end(self, args, state, control, **kwargs):
        self._move_first()

    def on_train_begin(self, args, state, control, **kwargs):
        self._move_first()


def _block_length(train_dataloader) -> int | None:
    """Tokens per example when the data says so (packed blocks of a map-style dataset);
    None for a stream, whose blocks are only seen in step 1."""
    dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or len(dataset) == 0:
        return None
    try:
        return len(dataset[0]["input_ids"])
    except (KeyError, TypeError, IndexError):
        return None


def _prepare_gemms(model, args, train_dataloader, sequence_length: int | None) -> None:
    """The verdicts for a training micro-batch and, forward only, a full evaluation batch
    (the Trainer's evaluations and lm-eval's batches of items at max_length: both use the
    eval batch size). Shapes met otherwise (lm-eval's shorter batches) are tuned, eagerly,
    at their first call, also inside a compiled graph."""
    length = _block_length(train_dataloader) or sequence_length
    if model is None or length is None:
        return  # each shape is then tuned at its first call
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    train_tokens = args.per_device_train_batch_size * length
    prepare_2to4_gemms(model, train_tokens, dtype)
    eval_tokens = args.per_device_eval_batch_size * length
    if eval_tokens != train_tokens:
        prepare_2to4_gemms(model, eval_tokens, dtype, backward=False)


class EvalPerplexityCallback(_FirstCallback):
    """Adds `eval_perplexity = exp(eval_loss)` to every evaluation log row."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._check_order()
        if logs and "eval_loss" in logs and "eval_perplexity" not in logs:
            loss = float(logs["eval_loss"])
            merge_into_log_row(state, logs, {"eval_perplexity": math.exp(loss) if loss < 700 else float("inf")})


class SparsityCallback(_FirstCallback):
    """Sets the optimizer step on the sparse MLPs (dense warm-up, resume-safe) and, at each
    training logging step, merges `sparsity_metrics` into the Trainer's `logs` and the
    matching `state.log_history` row.

    Attach it any documented way: `Trainer(callbacks=[SparsityCallback()])`,
    `trainer.add_callback(...)` or at index 0 of `trainer.callback_handler.callbacks`. It
    moves itself ahead of the reporting integrations the first time the handler calls it;
    if that is not possible it raises instead of silently logging to the console only.

    `flip_rate=True` (run key `flip_rate`) adds the 2:4 weight-mask flip rates
    (`flip_rate/layer_{i}/<matrix>[_in|_out]`, `flip_rate/mean`, `/max`, `/total`): the
    fraction of keep-mask entries that changed since the previous training log row. The
    masks are snapshotted at train begin (after a resume: from the restored weights), so
    the first log row already has a value, measured against that snapshot. They are kept
    bit-packed on the device, outside the state_dict; nothing is read on non-logging steps.

    `sequence_length`: the tokens per example of a streamed dataset (the run's `max_length`),
    so the 2:4 GEMM verdicts for its micro-batches and evaluation batches are made at train
    begin too (a map-style dataset says it by itself).
    """

    def __init__(
        self,
        activation_metrics: bool = True,
        weight_metrics: bool = True,
        flip_rate: bool = False,
        sequence_length: int | None = None,
    ):
        self.activation_metrics = activation_metrics
        self.weight_metrics = weight_metrics
        self.flip_rate = flip_rate
        self.sequence_length = sequence_length

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._move_first()
        # Stat tensors exist before the first (possibly compiled) forward, on the device the
        # inputs come on: creating them inside a compiled forward would cost a recompile.
        ensure_activation_stats(model, args.device)
        auto = auto_switch_config(model)
        if auto is not None:
            # A fresh run starts undecided; a resumed one re-derives the switch from the
            # restored log rows, as the uninterrupted run decided it.
            update_switch(model, auto, state.log_history, state.global_step)
        set_training_step(model, state.global_step, state.max_steps)
        next_weight_generation(model)  # turns the per-step 2:4 weight cache on
        # The 2:4 GEMM verdicts (verified and timed per shape, with host syncs) are made
        # now, eagerly, not inside step 1 or while torch.compile traces it.
        _prepare_gemms(model, args, kwargs.get("train_dataloader"), self.sequence_length)
        if self.flip_rate:
            # The Trainer has loaded any resume checkpoint by now: the baseline is the
            # restored weights' masks (device work only, no host sync).
            snapshot_weight_masks(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # global_step = optimizer steps completed; restored by the Trainer on resume.
        set_training_step(model, state.global_step, state.max_steps)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # The weights just changed (a fused optimizer does not bump their versions): the
        # cached 2:4 weights of the last step are stale.
        next_weight_generation(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        self._check_order()
        # Only training rows carry the metrics; eval and end-of-training summary rows
        # would see an empty activation window.
        if logs is None or model is None or "loss" not in logs:
            return
        auto = auto_switch_config(model)
        metrics = sparsity_metrics(
            model,
            reset=True,
            activations=self.activation_metrics or auto is not None,
            weights=self.weight_metrics,
            flip_rate=self.flip_rate,
            pooled_drop=auto is not None,
        )
        if not self.activation_metrics:  # read for the auto switch only
            metrics = {k: v for k, v in metrics.items() if not k.startswith(("sparsity_relu/", "sparsity_24/"))}
        # Plain floats: TensorBoard drops tensors and numpy scalars.
        merge_into_log_row(state, logs, {k: float(v) for k, v in metrics.items() if math.isfinite(v)})
        if auto is not None and auto.activation_switch_step is None:
            switched = update_switch(model, auto, state.log_history, state.global_step)
            if switched is not None:
                merge_into_log_row(state, logs, {SWITCH_STEP_KEY: switched})
                set_training_step(model, state.global_step, state.max_steps)


class ModelCardCallback(TrainerCallback):
    """Writes a README.md model card into every checkpoint folder (hub-ready), whose files
    get the umask's permissions (readable by a serving container under another uid);
    `dataset_name` (the hub dataset trained on, when there is one) goes into its metadata."""

    def __init__(self, dataset_name: str | None = None):
        self.card_dataset = dataset_name

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            apply_umask_permissions(folder)  # model.safetensors comes out 0600
            if os.path.isfile(os.path.join(folder, "config.json")):
                enable_cache_in_saved_config(folder)
            write_model_card(folder, model.config, state.log_history, args, self.card_dataset)


__all__ = ["EvalPerplexityCallback", "ModelCardCallback", "SparsityCallback"]
