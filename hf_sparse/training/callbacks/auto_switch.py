"""The automatic dense -> 2:4 switch (`activation_auto_switch`), decided from the telemetry.

During the dense warm-up every 2:4 MLP already counts the non-zero activations the 2:4
rule *would* drop. At each training log row `SparsityCallback` reads that count pooled over
layers and ranks (`activation_auto_switch/drop`, one all-reduce shared with the other
metrics, so every rank reads the same number). Once it has stayed below
`activation_auto_switch_max_drop` for `activation_auto_switch_window` consecutive rows,
2:4 starts at the next optimizer step; `activation_dense_warmup_steps` stays the cap.

The decision is a pure function of the log history, which the Trainer restores with a
checkpoint: a resumed run re-derives it from the same rows, so it switches where the
uninterrupted run did (before or after the switch alike) without extra state to save.
"""

import logging

from ... import metric_keys as keys
from ...model.modeling_sparse_llama import sparse_mlps

logger = logging.getLogger(__name__)

DROP_KEY = keys.AUTO_SWITCH_DROP
SWITCH_STEP_KEY = keys.SWITCH_STEP
# The values of keys.SWITCH_REASON: what ended the warm-up.
SWITCH_BY_THRESHOLD, SWITCH_BY_CAP = "threshold", "cap"


def decide_switch_step(log_history: list[dict], max_drop: float, window: int, cap: int) -> int | None:
    """The step the auto switch chose from these log rows, or None if it has not switched.

    Only rows up to `cap` count: from the cap on the warm-up is over anyway, and later
    rows measure what 2:4 really dropped. A row equal to the threshold is not below it."""
    below = 0
    for row in log_history:
        step, drop = row.get("step"), row.get(DROP_KEY)
        if drop is None or step is None or step > cap:
            continue
        below = below + 1 if drop < max_drop else 0
        if below >= window:
            return int(step)
    return None


def auto_switch_config(model):
    """The model's config when its 2:4 MLPs use the auto switch, else None."""
    for _, mlp in sparse_mlps(model):
        if mlp.config.activation_2by4 and mlp.config.activation_auto_switch:
            return mlp.config
    return None


def set_switch_step(model, step: int | None) -> None:
    """Record the switch on every 2:4 MLP's config (saved with the model's config.json)."""
    for _, mlp in sparse_mlps(model):
        mlp.config.activation_switch_step = step


def update_switch(model, config, log_history: list[dict], global_step: int) -> int | None:
    """Re-derive the switch from `log_history` after `global_step` optimizer steps (the cap
    counts as the switch once reached); returns the step if it was set just now, to log it."""
    before = config.activation_switch_step
    cap = config.activation_dense_warmup_steps
    by_threshold = decide_switch_step(log_history, config.activation_auto_switch_max_drop,
                                      config.activation_auto_switch_window, cap)  # fmt: skip
    decided = by_threshold if by_threshold is not None else (cap if global_step >= cap else None)
    if decided != before:
        set_switch_step(model, decided)
    if decided is None or before is not None:
        return None
    if by_threshold is not None:
        logger.info(
            "activation_auto_switch (reason: threshold): the 2:4 rule would drop < %g of the non-zero activations "
            "for %d log rows; 2:4 activations start after step %d (cap %d).",
            config.activation_auto_switch_max_drop,
            config.activation_auto_switch_window,
            decided,
            cap,
        )
    else:
        logger.info("activation_auto_switch (reason: cap): the threshold was not met by the cap; 2:4 activations "
                    "started after step %d (activation_dense_warmup_steps).", cap)  # fmt: skip
    return decided


def switch_reason(config, log_history: list[dict]) -> str | None:
    """Why the auto switch switched: "threshold" (the pooled drop stayed below it for the
    window, at or before the cap) or "cap" (activation_dense_warmup_steps came first); None
    without the auto switch or before it switched."""
    if not config.activation_auto_switch or config.activation_switch_step is None:
        return None
    decided = decide_switch_step(log_history, config.activation_auto_switch_max_drop,
                                 config.activation_auto_switch_window, config.activation_dense_warmup_steps)  # fmt: skip
    return SWITCH_BY_THRESHOLD if decided is not None else SWITCH_BY_CAP


def switch_step_reached(config, global_step: int) -> int | None:
    """The step 2:4 activations started at in a run that reached `global_step` (None: still dense)."""
    if not config.activation_2by4:
        return None
    end = config.activation_warmup_end()
    return end if end <= global_step else None


__all__ = ["decide_switch_step", "auto_switch_config", "update_switch", "switch_reason", "switch_step_reached"]
