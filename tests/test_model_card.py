"""Model cards are hub-standard: ModelCardData metadata with a model-index, the training
hyperparameters actually used, framework versions and the report's figures."""

from huggingface_hub import ModelCard
from transformers import TrainingArguments

from hf_sparse.training.callbacks.checkpoints import write_model_card
from tests.conftest import tiny_config

HISTORY = [
    {"loss": 3.0, "step": 5},
    {"eval_loss": 2.5, "eval_perplexity": 12.18, "eval_accuracy": 0.31, "eval_runtime": 1.0, "step": 10},
]


def test_card_loads_back_with_model_index_hyperparameters_and_versions(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=10,
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        use_cpu=True,
        report_to=[],
    )
    (tmp_path / "sparsity_relu_heatmap.png").write_bytes(b"png")  # as written by python -m hf_sparse.report
    path = write_model_card(
        str(tmp_path), tiny_config(activation_2by4=True, weight_2by4=True), HISTORY, args, "allenai/c4"
    )
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"hf_sparse", "sparse_llama", "2:4-activation-sparsity", "2:4-weight-sparsity"} <= set(data.tags)
    assert data.datasets == ["allenai/c4"]
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"loss": 2.5, "perplexity": 12.18, "accuracy": 0.31}
    assert all(r.dataset_name == "allenai/c4" and r.task_type == "text-generation" for r in data.eval_results)
    text = card.text
    assert "- learning_rate: 0.003" in text and "- max_steps: 10" in text
    assert "num_train_epochs" not in text  # max_steps bounds this run: an epoch count would mislead
    assert "- total train batch size: 8 (1 process)" in text
    assert "## Framework versions" in text and "- transformers 5." in text and "- torch " in text
    assert "![ReLU² sparsity per layer](sparsity_relu_heatmap.png)" in text
    assert "flip_rate.png" not in text  # only the figures that exist are linked
    assert "2:4 weights (`s_ste`) on `mlp` linears" in text


def test_card_without_evaluation_or_arguments_is_still_valid(tmp_path):
    path = write_model_card(str(tmp_path), tiny_config(), [{"loss": 3.0, "step": 1}])
    card = ModelCard.load(path)
    assert card.data.eval_results is None and card.data.datasets is None
    assert "No evaluation has run yet." in card.text and "Training hyperparameters" not in card.text
