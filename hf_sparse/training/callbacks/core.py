"""The project's Trainer callbacks (`SparsityCallback`: the 2:4 dense warm-up driven by the
Trainer's optimizer step, sparsity telemetry merged into every logging backend;
`EvalPerplexityCallback`; `ModelCardCallback`) and where the Trainer runs them.

Callback order. The Trainer calls `on_log` on its callbacks in list order, and the reporting
integrations (wandb, TensorBoard, ...) send `logs` on in their own `on_log`; a callback that
adds keys to the row (a "log-row" callback, `_FirstCallback` below) must run before them or
its keys reach the console only. `Trainer(callbacks=[...])` and `trainer.add_callback` put a
callback behind them (DefaultFlowCallback, the integrations, the given callbacks, the
printer). A merge that does not depend on the order is not possible with the stock Trainer:
`Trainer.log` builds the row and hands it straight to the callbacks, and it hands a callback
neither itself nor its `CallbackHandler`. So:

- `add_callbacks(trainer, *callbacks)` (what train_hf.py does, and the documented way in a
  script; `hf_sparse.add_callbacks`) adds callbacks as `trainer.add_callback` does, with the
  log-row ones at the front of the callback list, ahead of DefaultFlowCallback and the
  integrations. Nothing is looked up.
- A log-row callback attached by hand (`Trainer(callbacks=[...])`, `trainer.add_callback`,
  `trainer.callback_handler.callbacks.insert(0, ...)`) puts itself at the front at
  `on_init_end` and `on_train_begin`. The handler that holds it is found through the garbage
  collector's referrer graph (handler -> its list -> the callback), about once per Trainer:
  a handler met before is remembered (weakly) and searched first, and the one calling is
  told apart by the objects it passes (model, optimizer, dataloaders, ...). No stack frames.
- At every `on_log` a log-row callback checks that no reporting integration runs before it
  in the handler calling it, and raises naming the fix otherwise: a callback list changed
  after training began cannot be repaired for the row under way.

Log-row callbacks therefore run before DefaultFlowCallback too: `evaluation_due` says from
`args` and `state`, as DefaultFlowCallback decides, whether the Trainer evaluates after this
step or epoch.
"""

import gc
import logging
import math
import os
import weakref

import torch
from transformers import TrainerCallback
from transformers.integrations import INTEGRATION_TO_CALLBACK
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy

from ... import metric_keys as keys
from ...model.modeling_sparse_llama import (
    ensure_activation_stats,
    prepare_2to4_gemms,
    set_nm_counting,
    set_training_step,
)
from ...model.weight_sparse import next_weight_generation
from ..evaluation import perplexity
from .auto_switch import auto_switch_config, switch_reason, update_switch
from .dense_tail import dense_tail_config, dense_tail_step_to_log, update_dense_tail
from .checkpoints import apply_umask_permissions, enable_cache_in_saved_config, write_model_card
from .telemetry import snapshot_weight_masks, sparsity_metrics

logger = logging.getLogger(__name__)

_REPORTING_CALLBACK_TYPES = tuple(cb for cb in INTEGRATION_TO_CALLBACK.values() if isinstance(cb, type))

_ORDER_HELP = (
    "{name} runs after the reporting integration {reporter} at this logging step, so its metrics "
    "would reach the console only; it must run before the reporting integrations (wandb, "
    "TensorBoard, ...). Add it with hf_sparse.add_callbacks(trainer, {name}(...)) (or "
    "trainer.callback_handler.callbacks.insert(0, {name}(...))) before training, and do not "
    "move an integration ahead of it once training has begun."
)

# What CallbackHandler.call_event hands every callback from the handler's own attributes.
_HANDLER_OBJECTS = ("model", "processing_class", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader")
# The handlers met so far (weakly: a Trainer and its callbacks go when dropped).
_met_handlers: "weakref.WeakSet[CallbackHandler]" = weakref.WeakSet()


def _holds(handler, callback) -> bool:
    return any(cb is callback for cb in handler.callbacks)


def _handlers_holding(callback) -> list:
    """Every `CallbackHandler` whose callback list holds `callback`: the lists that refer to
    it, then the handlers that refer to one of those lists (directly, or through their
    `__dict__` once Python has made one)."""
    lists = [r for r in gc.get_referrers(callback) if type(r) is list]
    handlers, attribute_dicts = [], []
    for owner in gc.get_referrers(*lists) if lists else ():
        if isinstance(owner, CallbackHandler):
            handlers.append(owner)
        elif type(owner) is dict and any(owner.get("callbacks") is held for held in lists):
            attribute_dicts.append(owner)
    if attribute_dicts:
        handlers += [o for o in gc.get_referrers(*attribute_dicts) if isinstance(o, CallbackHandler)]
    unique = {id(h): h for h in handlers}.values()
    return [h for h in unique if _holds(h, callback)]


def _ahead_of(handler, callback) -> list:
    """The callbacks `handler` calls before `callback`."""
    return handler.callbacks[: next(i for i, cb in enumerate(handler.callbacks) if cb is callback)]


def _passed_by(handler, kwargs: dict) -> bool:
    return all(getattr(handler, name, None) is kwargs[name] for name in _HANDLER_OBJECTS if name in kwargs)


def _handlers_calling(callback, kwargs: dict, look: bool = True) -> list:
    """The handlers that hold `callback` and pass it the objects in `kwargs` (those of the
    event under way: the calling one). A handler met before answers without a look-up;
    else (`look`, or no handler met holds it) the handlers holding it are looked up. A
    handler that passes other objects (a custom one) counts when no other does."""
    met = [h for h in _met_handlers if _holds(h, callback)]
    calling = [h for h in met if _passed_by(h, kwargs)]
    if calling or (met and not look):
        return calling or met
    found = _handlers_holding(callback)
    _met_handlers.update(found)
    return [h for h in found if _passed_by(h, kwargs)] or found


def _put_first(handler, *callbacks) -> None:
    """`callbacks` at the front of `handler`'s list, in this order. A new list: a handler
    iterating the old one during an event calls no callback twice."""
    rest = [cb for cb in handler.callbacks if not any(cb is first for first in callbacks)]
    handler.callbacks = list(callbacks) + rest
    _met_handlers.add(handler)


def add_callbacks(trainer, *callbacks) -> None:
    """Add `callbacks` (instances or classes) to `trainer` as `trainer.add_callback` does,
    except that hf_sparse's log-row callbacks (`SparsityCallback`, `EvalPerplexityCallback`,
    `LoroCallback`, `LmEvalCallback`, ...) go to the front of its callback list, in the order
    given, where their metrics reach every reporting integration in the row with `loss`."""
    handler = trainer.callback_handler
    first = []
    for callback in callbacks:
        callback = callback() if isinstance(callback, type) else callback
        if isinstance(callback, _FirstCallback):
            first.append(callback)
        elif not _holds(handler, callback):
            handler.add_callback(callback)
    _put_first(handler, *first)


def evaluation_due(event: str, args, state) -> bool:
    """Whether DefaultFlowCallback sets `should_evaluate` at `event` ("on_step_end" or
    "on_epoch_end"), decided from `args` and `state` as it decides (steps: every `eval_steps`
    and at `max_steps`; epoch: each epoch end; neither before `eval_delay`)."""
    if event == "on_step_end":
        return (
            args.eval_strategy == IntervalStrategy.STEPS
            and (state.global_step % state.eval_steps == 0 or state.global_step >= state.max_steps)
            and args.eval_delay <= state.global_step
        )
    if event == "on_epoch_end":
        return args.eval_strategy == IntervalStrategy.EPOCH and args.eval_delay <= state.epoch
    raise ValueError(f"evaluation_due: no evaluation is decided at {event!r}")


def merge_into_log_row(state, logs: dict, metrics: dict) -> None:
    """Add `metrics` to the row being logged: to `logs` (what the reporting integrations
    that run later see) and to the copy Trainer.log already appended to log_history."""
    logs.update(metrics)
    if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items() if k not in metrics):
        state.log_history[-1].update(metrics)


class _FirstCallback(TrainerCallback):
    """A log-row callback: it adds keys to `logs`, so it runs before the reporting
    integrations. Attached by hand, it moves itself to the front of the handler that calls
    it at init end and train begin; at each log it refuses to log to the console only."""

    def _move_first(self, kwargs: dict) -> None:
        for handler in _handlers_calling(self, kwargs):
            # Only other log-row callbacks ahead of it: already in place.
            if not all(isinstance(cb, _FirstCallback) for cb in _ahead_of(handler, self)):
                _put_first(handler, self)

    def _check_order(self, kwargs: dict) -> None:
        for handler in _handlers_calling(self, kwargs, look=False):
            reporters = [cb for cb in _ahead_of(handler, self) if isinstance(cb, _REPORTING_CALLBACK_TYPES)]
            if reporters:
                raise RuntimeError(_ORDER_HELP.format(name=type(self).__name__, reporter=type(reporters[0]).__name__))

    def on_init_end(self, args, state, control, **kwargs):
        self._move_first(kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        self._move_first(kwargs)


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
        self._check_order(kwargs)
        if logs and "eval_loss" in logs and keys.EVAL_PERPLEXITY not in logs:
            merge_into_log_row(state, logs, {keys.EVAL_PERPLEXITY: perplexity(float(logs["eval_loss"]))})


class SparsityCallback(_FirstCallback):
    """Sets the optimizer step on the sparse MLPs (dense warm-up, resume-safe) and, at each
    training logging step, merges `sparsity_metrics` into the Trainer's `logs` and the
    matching `state.log_history` row.

    Attach it with `hf_sparse.add_callbacks(trainer, SparsityCallback())` (placed where it
    must run) or any way transformers offers: `Trainer(callbacks=[SparsityCallback()])`,
    `trainer.add_callback(...)` or at index 0 of `trainer.callback_handler.callbacks`; then it
    moves itself ahead of the reporting integrations at init end and train begin. If one
    runs before it at a logging step all the same, it raises instead of silently logging to
    the console only.

    `flip_rate=True` (run key `flip_rate`) adds the 2:4 weight-mask flip rates
    (`flip_rate/layer_{i}/<matrix>[_in|_out]`, `flip_rate/mean`, `/max`, `/total`): the
    fraction of keep-mask entries that changed since the previous training log row. The
    masks are snapshotted at train begin (after a resume: from the restored weights), so
    the first log row already has a value, measured against that snapshot. They are kept
    bit-packed on the device, outside the state_dict; nothing is read on non-logging steps.

    `nm_metrics` (run key `nm_sparsity_metrics`, on by default; with `activation_metrics`)
    has 2:4 MLPs count what the N:M patterns 4:8 and 8:16 would drop beside 2:4
    (`sparsity_nm/<N>:<M>/layer_{i}`, `.../mean_across_layers`).

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
        nm_metrics: bool = True,
    ):
        self.activation_metrics = activation_metrics
        self.weight_metrics = weight_metrics
        self.flip_rate = flip_rate
        self.sequence_length = sequence_length
        self.nm_metrics = nm_metrics
        self._tail = None  # the config of the 2:4 MLPs when they have an activation dense tail

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._move_first(kwargs)
        # Stat tensors exist before the first (possibly compiled) forward, on the device the
        # inputs come on: creating them inside a compiled forward would cost a recompile.
        ensure_activation_stats(model, args.device)
        set_nm_counting(model, self.activation_metrics and self.nm_metrics)
        # Found once: the step hooks below run every optimizer step.
        self._tail = dense_tail_config(model)
        auto = auto_switch_config(model)
        if auto is not None:
            # A fresh run starts undecided; a resumed one re-derives the switch from the
            # restored log rows, as the uninterrupted run decided it.
            update_switch(model, auto, state.log_history, state.global_step)
        self._set_step(model, state)
        next_weight_generation(model)  # turns the per-step 2:4 weight cache on
        # The 2:4 GEMM verdicts (verified and timed per shape, with host syncs) are made
        # now, eagerly, not inside step 1 or while torch.compile traces it.
        _prepare_gemms(model, args, kwargs.get("train_dataloader"), self.sequence_length)
        if self.flip_rate:
            # The Trainer has loaded any resume checkpoint by now: the baseline is the
            # restored weights' masks (device work only, no host sync).
            snapshot_weight_masks(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set_step(model, state)

    def _set_step(self, model, state) -> None:
        # global_step = optimizer steps completed; restored by the Trainer on resume.
        set_training_step(model, state.global_step, state.max_steps)
        if self._tail is not None:
            update_dense_tail(model, self._tail, state.global_step, state.max_steps)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # The weights just changed (a fused optimizer does not bump their versions): the
        # cached 2:4 weights of the last step are stale.
        next_weight_generation(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        self._check_order(kwargs)
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
            metrics = {k: v for k, v in metrics.items() if not keys.in_family(k, *keys.ACTIVATION_FAMILIES)}
        # Plain floats: TensorBoard drops tensors and numpy scalars.
        merge_into_log_row(state, logs, {k: float(v) for k, v in metrics.items() if math.isfinite(v)})
        if auto is not None and auto.activation_switch_step is None:
            switched = update_switch(model, auto, state.log_history, state.global_step)
            if switched is not None:
                reason = switch_reason(auto, state.log_history)
                merge_into_log_row(state, logs, {keys.SWITCH_STEP: switched, keys.SWITCH_REASON: reason})
                set_training_step(model, state.global_step, state.max_steps)
        tail = self._tail
        if tail is not None:
            # The row of the step the tail starts after says so (as the switch row does).
            update_dense_tail(model, tail, state.global_step, state.max_steps)
            tail_step = dense_tail_step_to_log(tail, state.log_history)
            if tail_step is not None:
                merge_into_log_row(state, logs, {keys.DENSE_TAIL_STEP: tail_step})


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


__all__ = ["EvalPerplexityCallback", "ModelCardCallback", "SparsityCallback", "add_callbacks", "evaluation_due"]
