"""The activation dense tail (`activation_dense_tail_steps`): the last N optimizer steps run
the FFN densely again.

The MLPs decide it from the optimizer step, as they decide the warm-up (`set_training_step`,
with the run's max_steps): a resumed run is dense from the same step. What this module adds
is the record: once the tail has begun, `activation_dense_tail_step` (the step from which
the FFN ran dense) is set on the config (config.json, the card, the report read it) and
logged once, in the first training log row at or after it. A resumed run finds that row in
the restored log history and does not log it twice.
"""

from ... import metric_keys as keys
from ...model.modeling_sparse_llama import sparse_mlps


def dense_tail_config(model):
    """The config of the model's 2:4 MLPs when they have an activation dense tail, else None."""
    for _, mlp in sparse_mlps(model):
        if mlp.config.activation_2by4 and mlp.config.activation_dense_tail_steps:
            return mlp.config
    return None


def update_dense_tail(model, config, global_step: int, max_steps: int) -> None:
    """Set (or clear, for a run resumed from before it) `activation_dense_tail_step` on every
    MLP's config from the optimizer steps done so far."""
    start = config.activation_dense_tail_start(max_steps)
    reached = start if start is not None and global_step >= start else None
    if config.activation_dense_tail_step != reached:
        for _, mlp in sparse_mlps(model):
            mlp.config.activation_dense_tail_step = reached


def dense_tail_step_to_log(config, log_history: list[dict]) -> int | None:
    """The tail's first step when it has begun and no log row has it yet, else None."""
    step = config.activation_dense_tail_step
    if step is None or any(keys.DENSE_TAIL_STEP in row for row in log_history):
        return None
    return step


__all__ = ["dense_tail_config", "update_dense_tail", "dense_tail_step_to_log"]
