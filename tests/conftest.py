"""Shared fixtures: offline by construction, tiny models that run on CPU in seconds."""

import os
import sys
import tempfile

# Tests must never reach the hub; set before transformers/datasets are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One embedded-tokenizer cache per test session, never the user's.
os.environ.setdefault("HF_SPARSE_CACHE", os.path.join(tempfile.gettempdir(), "hf_sparse_test_cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def tiny_config(**overrides):
    """A 2-layer, hidden-32 sparse_llama config (LlamaModelTester-sized)."""
    from hf_sparse import SparseLlamaConfig

    values = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        squ_relu="relu2",
    )
    values.update(overrides)
    return SparseLlamaConfig(**values)


@pytest.fixture
def make_tiny_config():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when none is available")
