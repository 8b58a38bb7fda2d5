#!/usr/bin/env python
"""Pretrain a `sparse_llama` model with the stock HuggingFace Trainer.

    python train_hf.py CONFIG.json [--key value ...]
    accelerate launch train_hf.py CONFIG.json
    torchrun --nproc_per_node N train_hf.py CONFIG.json

CONFIG.json is one flat object: TrainingArguments keys, model keys, data keys and the
keys of this script (see README). This file is wiring only: the run's lifecycle, its exits
and their codes live in hf_sparse/training/run.py.
"""

from hf_sparse.training.run import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
