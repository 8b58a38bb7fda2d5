"""The training data: data keys and their checks, hub access, tokenizers, packing into blocks,
and the train/validation datasets."""
