"""Evaluation helpers for `transformers.Trainer`: next-token accuracy and perplexity.

`evaluate` is imported only by `build_compute_metrics` (importing it costs seconds), and
its metric is loaded from the file shipped in this package: `evaluate.load("accuracy")`
would need the hub.
"""

import logging
import math
import os

import numpy as np

logger = logging.getLogger(__name__)

NEXT_TOKEN_ACCURACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "next_token_accuracy")
IGNORE_INDEX = -100


def preprocess_logits_for_metrics(logits, labels):
    """Trainer hook: keep only the predicted ids, so evaluation gathers (batch, seq) ints
    instead of (batch, seq, vocab) floats."""
    if isinstance(logits, (tuple, list)):
        # Models returning extra outputs (past_key_values, ...) put the logits first.
        logits = logits[0]
    return logits.argmax(dim=-1)


def load_next_token_accuracy():
    """The `evaluate` metric module, loaded by path (works offline)."""
    import evaluate

    # keep_in_memory: no cache file and no file lock. The Trainer already gathers the
    # predictions, so every rank computes the metric alone; with files, ranks on one
    # machine would share the same cache file name.
    return evaluate.load(NEXT_TOKEN_ACCURACY_PATH, keep_in_memory=True)


def build_compute_metrics():
    """A `compute_metrics(eval_pred) -> {"accuracy": float}` for `transformers.Trainer`.

    The prediction at position t is scored against the label at t+1 (causal LM), and
    positions whose label is -100 are skipped. Expects predictions already reduced to ids
    by `preprocess_logits_for_metrics`; raw logits are reduced here as a fallback.
    """
    metric = load_next_token_accuracy()

    def compute_metrics(eval_pred):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        predictions = np.asarray(predictions)
        labels = np.asarray(labels)
        if predictions.ndim == labels.ndim + 1:
            predictions = predictions.argmax(-1)
        if predictions.shape != labels.shape:
            raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
        predictions = predictions.reshape(-1, predictions.shape[-1])[:, :-1]
        labels = labels.reshape(-1, labels.shape[-1])[:, 1:]
        keep = labels != IGNORE_INDEX
        if not keep.any():
            logger.warning("compute_metrics: every label is %d; accuracy is undefined", IGNORE_INDEX)
            return {"accuracy": float("nan")}
        # One row per sequence: the metric's fast input form (see the metric module).
        rows = [(p[k].tolist(), lab[k].tolist()) for p, lab, k in zip(predictions, labels, keep)]
        result = metric.compute(predictions=[r[0] for r in rows], references=[r[1] for r in rows])
        return {"accuracy": float(result["accuracy"])}

    return compute_metrics


def perplexity(loss: float) -> float:
    """exp(loss); inf when that overflows a float."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
