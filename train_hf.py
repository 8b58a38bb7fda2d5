#!/usr/bin/env python
"""Pretrain a `sparse_llama` model with the stock HuggingFace Trainer.

    python train_hf.py CONFIG.json [--key value ...]
    accelerate launch train_hf.py CONFIG.json
    torchrun --nproc_per_node N train_hf.py CONFIG.json

CONFIG.json is one flat object: TrainingArguments keys, model keys, data keys and the
keys of this script (see README). This file is wiring only: the run's lifecycle, its exits
and their codes live in hf_sparse/training/run.py; here they meet the terminal.
"""

import os
import sys

from hf_sparse.training.config.cli_help import format_help, wants_help
from hf_sparse.training.callbacks.preemption import StopSignals
from hf_sparse.training.run import main, release_process_groups, run_to_outcome

__all__ = ["cli", "main"]


def cli() -> None:
    """`python train_hf.py CONFIG.json ...` and the `hf-sparse-train` console script."""
    argv = sys.argv[1:]
    if wants_help(argv):  # usage and every key, to stdout, exit 0
        print(format_help(prog=os.path.basename(sys.argv[0]) or "train_hf.py"), end="")
        return
    signals = StopSignals().install()
    signals.raise_now = True  # until the Trainer takes over: nothing to checkpoint yet
    outcome = run_to_outcome(argv, signals)
    release_process_groups()
    if outcome.message and (outcome.every_rank or os.environ.get("RANK", "0") == "0"):
        print(outcome.message, file=sys.stderr, flush=True)
    signals.farewell = b""  # said: a Ctrl-C from here on ends the process quietly
    sys.exit(outcome.code)  # outside any except block: the SystemExit carries nothing of the run


if __name__ == "__main__":
    cli()
