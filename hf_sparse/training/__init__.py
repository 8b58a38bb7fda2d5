"""The training harness around the stock `transformers.Trainer`, in rooms: `config/` (the
run's keys, parsing, checks, help, resume checks), `data/` (data, tokenizers, packing) and
`callbacks/` (telemetry, auto switch, numerics guard, preemption, in-loop lm-eval,
checkpoints); beside them the LORO optimizer, the run, evaluation and the lm-eval
integration. Imports the model from `hf_sparse.model`; nothing here ships in a checkpoint.
"""
