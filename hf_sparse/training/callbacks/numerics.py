"""Numerics guard: a non-finite loss or activation never silently poisons a run.

Each sparse MLP counts non-finite outputs on device during training forwards. The guard
reads those counts (one transfer) only at logging and save steps, so the hot path has no
extra host sync, and it names the first layer that produced a non-finite value.

Policies (`nonfinite_policy` in train_hf.py):
- "stop" (default): at the first logging/save step after a non-finite value appears, the
  checkpoint of that step is not written, training stops, and `train_hf.py` exits with a
  message naming the layer, the step window and the last good checkpoint.
- "skip": every optimizer step checks that the gradients are finite (one host sync per
  step, the price of knowing before the update) and drops the update of a bad step; the
  skipped steps and layers are logged as `numerics/skipped_steps`.
"""

import logging

import torch
from transformers import TrainerCallback

from ... import metric_keys as keys
from ...model.modeling_sparse_llama import STAT_FIRST_NONFINITE_STEP, STAT_NONFINITE, sparse_mlps
from .core import _FirstCallback, _handlers_calling, _holds, _put_first, merge_into_log_row
from .checkpoints import last_complete_checkpoint

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite value under the "stop" policy."""


def nonfinite_origin(model) -> tuple[int, int] | None:
    """(layer, optimizer step) where non-finite MLP outputs first appeared since the last
    reset, or None. A NaN spreads to every later layer and, after an update, to all of
    them: the earliest step, then the lowest layer of that step, is where it started.
    One device->host read."""
    mlps = [(i, m) for i, m in sparse_mlps(model) if m.activation_stats is not None]
    if not mlps:
        return None
    device = mlps[0][1].activation_stats.device
    guard_slots = slice(STAT_NONFINITE, STAT_FIRST_NONFINITE_STEP + 1)
    rows = torch.stack([m.activation_stats[guard_slots].to(device) for _, m in mlps]).tolist()
    bad = [(int(first), i) for (i, _), (count, first) in zip(mlps, rows) if count > 0]
    if not bad:
        return None
    step, layer = min(bad)
    return layer, step


def _reset_nonfinite(model) -> None:
    for _, mlp in sparse_mlps(model):
        if mlp.activation_stats is not None:
            mlp.activation_stats[STAT_NONFINITE] = 0
            mlp.activation_stats[STAT_FIRST_NONFINITE_STEP] = -1


def _parameters_finite(model) -> bool:
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


class _SkippedStepsLog(_FirstCallback):
    """Merges the guard's `numerics/skipped_steps` into training log rows. A callback of
    its own because it must run before the reporting integrations (to reach wandb and
    TensorBoard), while the guard itself must run after DefaultFlowCallback."""

    def __init__(self, guard: "NumericsGuardCallback"):
        self.guard = guard

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._check_order(kwargs)
        if self.guard.policy == "skip" and logs is not None and "loss" in logs:
            merge_into_log_row(state, logs, {keys.SKIPPED_STEPS: float(len(self.guard.skipped))})


class NumericsGuardCallback(TrainerCallback):
    # Not a _FirstCallback: on_step_end must run after DefaultFlowCallback has set
    # should_log/should_save for the step, so this stays behind it. Its log metric goes
    # through a companion callback placed first (see _SkippedStepsLog).
    def __init__(self, policy: str = "stop"):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_policy={policy!r} is not valid; choose one of 'stop', 'skip'.")
        self.policy = policy
        self.last_checked_step = 0
        self.failure: str | None = None
        self.skipped: list[tuple[int, int | None]] = []  # (optimizer step, first bad layer)
        self.log_callback = _SkippedStepsLog(self)

    def on_init_end(self, args, state, control, **kwargs):
        self._attach_log_callback(kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        self._attach_log_callback(kwargs)  # for a guard added with trainer.add_callback

    def _attach_log_callback(self, kwargs: dict):
        # The companion goes to the front of the handler that calls this guard.
        for handler in _handlers_calling(self, kwargs):
            if not _holds(handler, self.log_callback):
                _put_first(handler, self.log_callback)

    # --- "skip": drop the update of a step whose gradients are not finite -------------------
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.policy != "skip" or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return
        origin = nonfinite_origin(model)
        step = state.global_step + 1
        layer = origin[0] if origin else None
        self.skipped.append((step, layer))
        logger.warning("non-finite gradients at optimizer step %d (first bad layer: %s): update skipped", step, layer)
        # Optimizers leave parameters whose .grad is None untouched (no moment update either).
        model.zero_grad(set_to_none=True)
        _reset_nonfinite(model)

    # --- "stop": check at logging/save steps, before anything is written --------------------
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.policy != "stop" or model is None or not (control.should_log or control.should_save):
            return
        origin = nonfinite_origin(model)
        if origin is None and _parameters_finite(model):
            self.last_checked_step = state.global_step
            return
        where = (
            f"layer {origin[0]} (first at optimizer step {origin[1]})"
            if origin
            else "the parameters (after the optimizer step)"
        )
        last_good = last_complete_checkpoint(args.output_dir)
        self.failure = (
            f"non-finite values in {where} between optimizer steps {self.last_checked_step + 1} and "
            f"{state.global_step}; training stopped without saving. Last good checkpoint: "
            f"{last_good or 'none'}."
        )
        logger.error("%s", self.failure)
        control.should_save = False
        control.should_evaluate = False
        control.should_training_stop = True


__all__ = ["NONFINITE_POLICIES", "NonFiniteError", "NumericsGuardCallback", "nonfinite_origin"]
