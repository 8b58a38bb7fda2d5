"""The in-loop lm-eval callback (`LmEvalCallback`): every `steps` optimizer steps (or whenever
the Trainer evaluates) it evaluates the in-memory model on lm-eval tasks and merges
`lm_eval/<task>/<metric>` into the log row of that step. The lm-eval integration it runs
(task index, rank-0 evaluation, the scores' names) is `hf_sparse/training/lm_eval_integration.py`.
"""

import logging
import math

import torch

from ..lm_eval_integration import (
    EvaluationStopped,
    build_task_manager,
    evaluate_model,
    flatten_results,
    lm_eval_metrics,
    on_rank0_then_share,
    require_lm_eval,
    sharded_training_reason,
)
from .core import _FirstCallback, evaluation_due, merge_into_log_row

logger = logging.getLogger(__name__)


class LmEvalCallback(_FirstCallback):
    """Evaluates the model with lm-eval every `steps` optimizer steps (None: whenever the
    Trainer evaluates) and merges `lm_eval/<task>/<metric>` into the log row of that step.

    At a due step it asks the Trainer for a training log row (`control.should_log`), so the
    scores land in the row with `loss` even when `logging_steps` does not divide the step;
    an evaluation outside training (`trainer.evaluate()`) gets them in its eval row. Needs
    the tokenizer (given here or the Trainer's `processing_class`)."""

    def __init__(self, tasks, include_path=None, limit=None, steps=None, max_length=None, tokenizer=None,
                 should_stop=None):  # fmt: skip
        require_lm_eval()
        self.tasks, self.include_path, self.limit, self.steps = list(tasks), include_path, limit, steps
        self.max_length, self.tokenizer = max_length, tokenizer
        # A stop signal (train_hf.py's StopSignals) ends an evaluation between batches.
        self.should_stop = should_stop
        self.last_step, self.metrics = None, {}
        self._manager = None

    def _due(self, state, control) -> bool:
        if self.steps:
            return state.global_step > 0 and state.global_step % self.steps == 0
        return bool(control.should_evaluate)

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        reason = sharded_training_reason(args)
        if reason:
            raise RuntimeError(f"lm_eval_tasks: in-loop lm-eval needs the whole model on rank 0, which {reason} shards; "
                               "evaluate the finished run with hf-sparse-eval instead.")  # fmt: skip

    def _evaluation_coming(self, event: str, args, state, control) -> bool:
        """Will the Trainer evaluate after this step (or epoch)? This callback runs first
        (see _FirstCallback), before DefaultFlowCallback has decided: decide as it does."""
        return bool(control.should_evaluate) or evaluation_due(event, args, state)

    def on_step_end(self, args, state, control, **kwargs):
        due = self._due(state, control) if self.steps else self._evaluation_coming("on_step_end", args, state, control)
        if due:
            control.should_log = True  # a row with the loss to merge into

    def on_epoch_end(self, args, state, control, **kwargs):
        due = self._due(state, control) if self.steps else self._evaluation_coming("on_epoch_end", args, state, control)
        if due:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kwargs):
        self._check_order(kwargs)
        if logs is None or model is None or self.last_step == state.global_step or lm_eval_metrics(logs):
            return
        training_row = "loss" in logs
        # An eval row outside training (trainer.evaluate()) always; in training only when
        # no training row was logged at this step.
        if not (training_row and self._due(state, control)) and "eval_loss" not in logs:
            return
        if "eval_loss" in logs and self.steps and state.global_step % self.steps:
            return
        metrics = self.evaluate(model, args, processing_class)
        if metrics is None:  # stopped by a signal: no scores at this step
            return
        self.last_step = state.global_step
        merge_into_log_row(state, logs, metrics)

    def evaluate(self, model, args, processing_class=None) -> dict[str, float] | None:
        """Evaluate now (rank 0; the other ranks wait) and remember the scores; None when a
        stop signal cut the evaluation short (on every rank: rank 0 shares that too)."""
        tokenizer = self.tokenizer or processing_class
        if tokenizer is None:
            raise RuntimeError(
                "LmEvalCallback needs a tokenizer: pass tokenizer=... or the Trainer's processing_class."
            )
        # As the Trainer's autocast: accelerate ignores fp16 on CPU (float32 training there).
        fp16 = args.fp16 and args.device.type != "cpu"
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if fp16 else None

        def run():
            if self._manager is None:
                self._manager = build_task_manager(self.tasks, self.include_path)
            try:
                return evaluate_model(
                    model, tokenizer, self.tasks, limit=self.limit, max_length=self.max_length,
                    batch_size=args.per_device_eval_batch_size, mixed_precision_dtype=dtype,
                    task_manager=self._manager, should_stop=self.should_stop,
                )  # fmt: skip
            except EvaluationStopped:
                return None

        scores = on_rank0_then_share(run)
        if scores is None:
            logger.warning("lm-eval stopped: a stop signal arrived; no lm_eval/* scores at this step.")
            return None
        metrics = {k: v for k, v in scores.items() if math.isfinite(v)}
        self.metrics = metrics
        return metrics

    def evaluate_at_end(self, trainer) -> dict[str, float]:
        """Scores of the final model: the last in-loop ones when they were taken at the
        final step, else a new evaluation logged as a row of its own (on every rank)."""
        state = trainer.state
        best_is_not_last = trainer.args.load_best_model_at_end and state.best_global_step not in (
            None,
            state.global_step,
        )
        if self.last_step != state.global_step or best_is_not_last:
            metrics = self.evaluate(trainer.model, trainer.args, trainer.processing_class)
            if metrics is None:  # a stop signal during the final save: the run ends without them
                return {}
            self.last_step = state.global_step
            trainer.log(dict(metrics))
        return dict(self.metrics)


__all__ = [
    "EvaluationStopped",
    "LmEvalCallback",
    "build_task_manager",
    "evaluate_model",
    "flatten_results",
    "require_lm_eval",
]
