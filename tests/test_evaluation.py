"""hf_sparse.training.evaluation: next-token accuracy through `evaluate` (loaded by path, offline),
Trainer hooks, perplexity."""

import math
import os

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_sparse.training import evaluation as E


@pytest.fixture(scope="module")
def compute_metrics():
    return E.build_compute_metrics()


def test_metric_files_ship_with_the_source():
    assert os.path.isfile(os.path.join(E.NEXT_TOKEN_ACCURACY_PATH, "next_token_accuracy.py"))


def test_metric_loads_by_path_offline():
    metric = E.load_next_token_accuracy()
    assert metric.compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4]) == {"accuracy": 0.75}
    # Row form (ragged rows are concatenated).
    assert metric.compute(predictions=[[1, 2], [3]], references=[[1, 0], [3]])["accuracy"] == pytest.approx(2 / 3)
    assert metric.compute(predictions=[7, 8], references=[1, 2])["accuracy"] == 0.0


def test_preprocess_logits_for_metrics_returns_argmax():
    logits = torch.randn(2, 5, 11)
    ids = E.preprocess_logits_for_metrics(logits, None)
    assert ids.shape == (2, 5) and torch.equal(ids, logits.argmax(-1))
    assert torch.equal(E.preprocess_logits_for_metrics((logits, torch.zeros(3)), None), ids)


# Predictions at t are scored against labels at t+1; -100 labels are skipped.
PREDICTIONS = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
LABELS = np.array([[-100, 1, 5, 3], [9, 5, -100, 7]])
# Pairs: (1,1) ok, (2,5) no, (3,3) ok | (5,5) ok, (6,-100) skipped, (7,7) ok  ->  4/5.
# Unshifted scoring would give 0/6, counting -100 positions 4/6.
EXPECTED = 0.8


def test_compute_metrics_hand_example(compute_metrics):
    result = compute_metrics(EvalPrediction(predictions=PREDICTIONS, label_ids=LABELS))
    assert set(result) == {"accuracy"} and isinstance(result["accuracy"], float)
    assert result["accuracy"] == pytest.approx(EXPECTED)


def test_compute_metrics_accepts_tuple_and_raw_logits(compute_metrics):
    logits = np.full(PREDICTIONS.shape + (10,), -1.0)
    np.put_along_axis(logits, PREDICTIONS[..., None], 1.0, axis=-1)
    for predictions in ((PREDICTIONS,), logits):
        result = compute_metrics(EvalPrediction(predictions=predictions, label_ids=LABELS))
        assert result["accuracy"] == pytest.approx(EXPECTED)


def test_compute_metrics_all_ignored(compute_metrics):
    result = compute_metrics(EvalPrediction(predictions=PREDICTIONS, label_ids=np.full_like(LABELS, -100)))
    assert math.isnan(result["accuracy"])


def test_perplexity():
    assert E.perplexity(0.0) == 1.0
    assert E.perplexity(math.log(24.6)) == pytest.approx(24.6)
    assert E.perplexity(1e6) == float("inf")


def test_trainer_evaluate_reports_next_token_accuracy(tmp_path, compute_metrics):
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval()
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, 64, size=(10, 16))
    with torch.no_grad():
        # Half the rows greedy continuations: the model predicts those perfectly, so the
        # expected accuracy is far from both 0 and 1.
        for t in range(1, 16):
            input_ids[:5, t] = model(torch.tensor(input_ids[:5, :t])).logits[:, -1].argmax(-1).numpy()
    labels = input_ids.copy()
    labels[:, 10:] = -100  # e.g. padding: must not be scored
    dataset = datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, use_cpu=True, report_to=[], disable_tqdm=True
    )
    trainer = Trainer(
        model=model,
        args=args,
        eval_dataset=dataset,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=E.preprocess_logits_for_metrics,
    )
    metrics = trainer.evaluate()

    with torch.no_grad():
        predicted = model(torch.tensor(input_ids)).logits.argmax(-1)[:, :-1]
    target = torch.tensor(labels)[:, 1:]
    keep = target != -100
    expected = (predicted[keep] == target[keep]).double().mean().item()
    assert 0.4 < expected < 0.7
    assert metrics["eval_accuracy"] == pytest.approx(expected)
    assert E.perplexity(metrics["eval_loss"]) == pytest.approx(math.exp(metrics["eval_loss"]))
