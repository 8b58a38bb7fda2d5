"""The training harness around the stock `transformers.Trainer`: run configuration, data,
callbacks and telemetry, the numerics guard, the LORO optimizer, checkpoints and
evaluation. Imports the model from `hf_sparse.model`; nothing here ships in a checkpoint.
"""
