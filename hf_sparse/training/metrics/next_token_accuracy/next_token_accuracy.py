"""Next-token accuracy as an `evaluate` metric.

This file is loaded by path (`evaluate.load(<this folder>)`) because the hub, where
`evaluate.load("accuracy")` would fetch its module, is not reachable everywhere we train.
`evaluate` copies this file into its module cache and imports it there, outside the
`hf_sparse` package: it must import nothing from `hf_sparse`.
"""

import datasets
import evaluate
import numpy as np


def _flat(values):
    # Rows (one list per evaluated sequence) are the fast input form: `datasets` encodes a
    # list feature by checking its first element only, a flat one element by element.
    if len(values) and isinstance(values[0], (list, tuple, np.ndarray)):
        return np.concatenate([np.asarray(row, dtype=np.int64).reshape(-1) for row in values])
    return np.asarray(values, dtype=np.int64)


_DESCRIPTION = """
Fraction of positions where the predicted token id equals the reference token id.
Inputs are int lists (flat, or one row per sequence); the caller aligns them (prediction at position t against
the label at t+1) and drops ignored positions (label -100) beforehand, so every pair
given here counts.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]` or `list[list[int]]`): predicted token ids, flat or one row
        per sequence (rows may differ in length; they are concatenated).
    references (same form as `predictions`): reference token ids, one per prediction.
Returns:
    accuracy (`float`): matches / total, in [0, 1]; NaN when no pair is given.
Examples:
    >>> metric = evaluate.load("hf_sparse/metrics/next_token_accuracy")
    >>> metric.compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NextTokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # int64: token ids of large vocabularies and -100 sentinels both fit, and numpy
            # int64 arrays from the Trainer encode without a cast.
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features(
                    {
                        "predictions": datasets.List(datasets.Value("int64")),
                        "references": datasets.List(datasets.Value("int64")),
                    }
                ),
            ],
        )

    def _compute(self, predictions, references):
        predictions = _flat(predictions)
        references = _flat(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions and references differ in length: {predictions.shape} vs {references.shape}")
        if predictions.size == 0:
            return {"accuracy": float("nan")}
        return {"accuracy": float((predictions == references).mean())}
