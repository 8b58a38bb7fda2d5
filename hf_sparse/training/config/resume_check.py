"""Resuming and finishing a run without silent surprises.

`warn_on_resume_changes` compares the settings a checkpoint was trained with against the
ones a resumed run uses and logs one warning per difference that bends the trajectory
(the stock Trainer resumes without a word): `max_steps`, `learning_rate`, the learning-rate
schedule and the batch geometry. `final_step_eval` tells `train_hf.py` whether the
Trainer already evaluated the last step, so the final evaluation is not run twice.

Where the checkpoint's settings come from (its training_args.bin, a pickle, is not read):
- `trainer_state.json`: `global_step`, `max_steps`, `train_batch_size`.
- `scheduler.pt`: the schedule's base learning rates and last value, read with
  `weights_only=True` exactly as the Trainer itself reads it on resume.
- `run_config.json`, the resolved run JSON each checkpoint carries (run_record.py), for the
  rest: the learning rate, scheduler type, warm-up, gradient accumulation and world size.
  A checkpoint without one (written before hf_sparse kept it) or with an unreadable one
  still resumes; one line says that those settings are not compared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re

import torch

from ..loro import run_cosine_restart_schedule, uses_run_cosine_restart
from .run_record import RUN_CONFIG_NAME, UnreadableRunConfig, read_run_config

logger = logging.getLogger(__name__)

_RNG_RE = re.compile(r"^rng_state_(\d+)\.pth$")


@dataclasses.dataclass
class RunSettings:
    """The settings that decide a run's trajectory; None where a checkpoint does not say."""

    max_steps: int | None = None
    learning_rate: float | None = None
    lr_scheduler_type: str | None = None
    warmup_steps: float | None = None
    lr_scheduler_kwargs: dict | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    world_size: int | None = None

    @property
    def total_batch_size(self) -> int | None:
        parts = (self.per_device_train_batch_size, self.gradient_accumulation_steps, self.world_size)
        return None if None in parts else math.prod(parts)

    def num_warmup_steps(self) -> int:
        # TrainingArguments.get_warmup_steps, for settings that are not a TrainingArguments.
        warmup = self.warmup_steps or 0
        return int(warmup) if warmup >= 1 else math.ceil(self.max_steps * warmup)


# --- reading a checkpoint -------------------------------------------------------------------


# The recorded settings read, with the JSON types each must have (bool is no number here).
_NUMBER, _INT = (int, float), (int,)
_RUN_KEYS = {
    "max_steps": _INT, "learning_rate": _NUMBER, "lr_scheduler_type": (str,), "warmup_steps": _NUMBER,
    "lr_scheduler_kwargs": (dict, str), "per_device_train_batch_size": _INT, "gradient_accumulation_steps": _INT,
}  # fmt: skip
_LAUNCH_KEYS = {"world_size": _INT, "n_gpu": _INT}
_NOT_COMPARED = (
    "its learning rate, schedule, warm-up and gradient accumulation are not compared with this run's (comparison "
    "skipped; max_steps, the batch size and the world size still are, from trainer_state.json and the RNG files)"
)


def _typed(section: dict, types: dict, where: str) -> dict:
    out = {}
    for key, allowed in types.items():
        value = section.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, allowed)):
            raise UnreadableRunConfig(f"{where}.{key} is {value!r}")
        out[key] = value
    return out


def _recorded_settings(checkpoint: str) -> tuple[dict, dict]:
    """(run keys, launch facts) from the checkpoint's run_config.json; both empty, after one
    line that says so, where the checkpoint has none or an unreadable one."""
    path = os.path.join(checkpoint, RUN_CONFIG_NAME)
    try:
        record = read_run_config(checkpoint)
        if record is not None:
            return _typed(record.get("run", {}), _RUN_KEYS, "run"), _typed(
                record.get("launch", {}), _LAUNCH_KEYS, "launch"
            )
        logger.warning("resume: %s has no %s (written before hf_sparse kept the run's settings in each checkpoint): "
                       "%s", checkpoint, RUN_CONFIG_NAME, _NOT_COMPARED)  # fmt: skip
    except UnreadableRunConfig as err:
        logger.warning("resume: %s is unreadable (%s): %s", path, err, _NOT_COMPARED)
    return {}, {}


def _world_size(checkpoint: str, recorded: int | None) -> int | None:
    # The Trainer writes rng_state.pth in a single process, rng_state_<rank>.pth per rank
    # otherwise. Each witness gives a lower bound: on node-local disks a checkpoint folder
    # holds only its node's ranks' files, and a folder assembled by hand may hold more.
    names = os.listdir(checkpoint)
    ranks = [int(m.group(1)) for n in names if (m := _RNG_RE.match(n))]
    from_files = max(ranks) + 1 if ranks else (1 if "rng_state.pth" in names else None)
    witnesses = [count for count in (recorded, from_files) if count is not None]
    return max(witnesses) if witnesses else None


def checkpoint_settings(checkpoint: str) -> tuple[RunSettings, int | None]:
    """(the settings of the run that wrote `checkpoint`, its global step)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, json.JSONDecodeError):
        state = {}
    fields, launch = _recorded_settings(checkpoint) if os.path.isdir(checkpoint) else ({}, {})
    per_device = fields.get("per_device_train_batch_size")
    # trainer_state.json's train_batch_size is per process (times n_gpu under DataParallel).
    if state.get("train_batch_size") is not None:
        per_device = state["train_batch_size"] // max(1, launch.get("n_gpu") or 1)
    settings = RunSettings(
        max_steps=state.get("max_steps") or fields.get("max_steps"),
        learning_rate=fields.get("learning_rate"),
        lr_scheduler_type=fields.get("lr_scheduler_type"),
        warmup_steps=fields.get("warmup_steps"),
        lr_scheduler_kwargs=fields.get("lr_scheduler_kwargs") if fields.get("lr_scheduler_type") else None,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=fields.get("gradient_accumulation_steps"),
        world_size=_world_size(checkpoint, launch.get("world_size")) if os.path.isdir(checkpoint) else None,
    )
    return settings, state.get("global_step")


def current_settings(args) -> RunSettings:
    """The settings a TrainingArguments asks for (max_steps None when epochs decide it)."""
    return RunSettings(
        max_steps=args.max_steps if args.max_steps > 0 else None,
        learning_rate=args.learning_rate,
        # SchedulerType.COSINE → "cosine", as the checkpoint's value reads.
        lr_scheduler_type=getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        warmup_steps=args.warmup_steps,
        lr_scheduler_kwargs=args.lr_scheduler_kwargs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=args.world_size,
    )


# --- the learning rate a resumed run actually gets ------------------------------------------


def _build_scheduler(optimizer, settings: RunSettings, script_args):
    """The scheduler `train_hf.py` would give the Trainer for `settings`."""
    if uses_run_cosine_restart(script_args):
        return run_cosine_restart_schedule(optimizer, script_args, settings.num_warmup_steps(), settings.max_steps)
    from transformers import get_scheduler

    return get_scheduler(
        settings.lr_scheduler_type, optimizer, num_warmup_steps=settings.num_warmup_steps(),
        num_training_steps=settings.max_steps, scheduler_specific_kwargs=settings.lr_scheduler_kwargs or {},
    )  # fmt: skip


def resumed_lrs(saved_scheduler: dict, settings: RunSettings, script_args=None) -> tuple[float, float] | None:
    """(lr of step N+1, lr of step N+2) of a run resumed at step N with `settings`.

    Replays what the Trainer does on a dummy optimizer: it builds the scheduler from the
    new settings, then loads the checkpoint's optimizer and scheduler states over it. So
    step N+1 still runs at the checkpoint's last lr, the base learning rate stays the
    checkpoint's, and the new schedule takes over from step N+2. None where this cannot be
    replayed (a scheduler that is not step-driven, settings it refuses)."""
    if not saved_scheduler or settings.max_steps is None:
        return None
    base_lrs = saved_scheduler.get("base_lrs") or [0.0]
    try:
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
        optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)])
        scheduler = _build_scheduler(optimizer, settings, script_args)
        scheduler.load_state_dict(dict(saved_scheduler))
        last = saved_scheduler.get("_last_lr") or scheduler.get_last_lr()
        for group, lr in zip(optimizer.param_groups, last):
            group["lr"] = lr  # what optimizer.pt restores
        first = optimizer.param_groups[0]["lr"]
        scheduler.step()
        return float(first), float(optimizer.param_groups[0]["lr"])
    except Exception as err:  # noqa: BLE001 - the warning then names the change without the lrs
        logger.debug("could not replay the schedule: %s", err)
        return None


def _load_scheduler_state(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, "scheduler.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - DeepSpeed keeps it elsewhere; missing means no lr figures
        return {}
    return state if isinstance(state, dict) else {}


# --- the warnings --------------------------------------------------------------------------


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _schedule_effect(
    old: RunSettings, resumed: RunSettings, saved_scheduler: dict, step: int | None, script_args, together: str = ""
) -> str | None:
    """What the resumed schedule (`resumed`: the checkpoint's settings with the new schedule
    settings) does to the learning rate at the resume step; None when unaffected."""
    new_lrs = resumed_lrs(saved_scheduler, resumed, script_args)
    if step is None or new_lrs is None:
        return "the run does not follow the checkpoint's trajectory"
    first, second = new_lrs
    # Within the checkpoint's schedule, compare with what it gives at step N+2; past its
    # end (the usual "train longer"), with the lr the run stood at.
    old_lrs = resumed_lrs(saved_scheduler, old, script_args) if old.max_steps and step + 1 < old.max_steps else None
    reference = old_lrs[1] if old_lrs is not None else first
    if math.isclose(reference, second, rel_tol=1e-6, abs_tol=1e-12):
        return None
    text = f"the learning rate jumps from {_fmt(first)} at step {step + 1} to {_fmt(second)} at step {step + 2}"
    if old_lrs is not None:
        text += f" (the checkpoint's schedule: {_fmt(old_lrs[1])})"
    return text + together + "; the run does not follow the checkpoint's trajectory"


def _differs(old, new) -> bool:
    if old is None or new is None:
        return False  # the checkpoint (or the new run) does not say: nothing to compare
    if isinstance(old, float) or isinstance(new, float):
        return not math.isclose(float(old), float(new), rel_tol=1e-9, abs_tol=0.0)
    return old != new


def resume_warnings(
    old: RunSettings, new: RunSettings, step: int | None, saved_scheduler: dict | None = None,
    script_args=None, checkpoint: str = "the checkpoint",
) -> list[str]:  # fmt: skip
    """One message per setting that differs between the checkpoint's run (`old`) and the
    resumed one (`new`), each naming old → new and what it does to the run."""
    saved_scheduler = saved_scheduler or {}
    where = f"since {checkpoint}" + (f" (step {step})" if step is not None else "")
    messages = []
    loro = uses_run_cosine_restart(script_args)
    schedule = "LORO cosine_restart" if loro else new.lr_scheduler_type or old.lr_scheduler_type

    if _differs(old.learning_rate, new.learning_rate):
        base = saved_scheduler.get("base_lrs")
        kept = _fmt(float(base[0])) if base else _fmt(old.learning_rate)
        messages.append(
            f"resume: learning_rate changed {_fmt(old.learning_rate)} → {_fmt(new.learning_rate)} {where}: it has no "
            f"effect, the Trainer restores the checkpoint's optimizer and scheduler states, whose base learning "
            f"rate {kept} stays; start a new run from the checkpoint's weights to train at {_fmt(new.learning_rate)}"
        )

    # The schedule settings that differ, each with why it moves the learning rate. The LORO
    # schedule ignores lr_scheduler_type and lr_scheduler_kwargs: no warning for them there.
    changes = []
    keys = ("max_steps", "warmup_steps")
    if not loro:
        keys += ("lr_scheduler_type", "lr_scheduler_kwargs")
    for key in keys:
        before, after = getattr(old, key), getattr(new, key)
        if key == "lr_scheduler_kwargs":
            before, after = (before or {}) if old.lr_scheduler_type else None, after or {}
        if _differs(before, after):
            how = (f"the {schedule} schedule is re-stretched to the new max_steps" if key == "max_steps"
                   else "the schedule changes at the resume step")  # fmt: skip
            changes.append((key, before, after, how))
    if changes:
        # The figures are those the resumed run really gets: all schedule changes together.
        resumed = dataclasses.replace(old, **{key: getattr(new, key) for key, *_ in changes})
        together = " (with the other schedule changes)" if len(changes) > 1 else ""
        effect = _schedule_effect(old, resumed, saved_scheduler, step, script_args, together)
        for key, before, after, how in changes:
            text = f"resume: {key} changed {_fmt(before)} → {_fmt(after)} {where}: "
            if key == "max_steps" and step is not None and new.max_steps is not None and new.max_steps <= step:
                text += f"the checkpoint is already at step {step}, nothing is left to train"
            else:
                text += f"{how}, so {effect}" if effect else f"the learning rate is unaffected{together}"
            messages.append(text)

    geometry = [
        (key, getattr(old, key), getattr(new, key))
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")
        if _differs(getattr(old, key), getattr(new, key))
    ]
    for key, before, after in geometry:
        effect = "the data order/samples per step change"
        if old.total_batch_size and new.total_batch_size and step is not None:
            effect += (
                f": each optimizer step now takes {new.total_batch_size} sequences instead of "
                f"{old.total_batch_size}, and the Trainer skips {step} steps of the new size "
                f"({step * new.total_batch_size} sequences) where {step * old.total_batch_size} were trained on, "
                f"so sequences are {'skipped' if new.total_batch_size > old.total_batch_size else 'repeated'}"
            )
        messages.append(f"resume: {key} changed {before} → {after} {where}: {effect}")
    return messages


def warn_on_resume_changes(checkpoint: str, args, script_args=None) -> list[str]:
    """Log (logger.warning) and return one message per trajectory-changing difference
    between the run that wrote `checkpoint` and `args` (the resumed run's TrainingArguments).
    `script_args` (train_hf.py's) tells whether the LORO schedule is in use."""
    if not checkpoint or not os.path.isdir(checkpoint):
        return []  # the Trainer reports a missing checkpoint itself
    old, step = checkpoint_settings(checkpoint)
    messages = resume_warnings(
        old, current_settings(args), step, _load_scheduler_state(checkpoint), script_args, os.path.basename(checkpoint)
    )
    for message in messages:
        logger.warning(message)
    return messages


# --- the final evaluation ------------------------------------------------------------------


def final_step_eval(state, args) -> dict | None:
    """The eval metrics the Trainer already logged at the last step, or None when the final
    model still has to be evaluated. (transformers 5 evaluates the last step under
    eval_strategy "steps" whatever eval_steps is, and "epoch" at the end of the last epoch.)

    Evaluating again would log a second identical row (and open a second TensorBoard
    events file, the writer being closed at the end of training). With
    load_best_model_at_end the final model is the best one, not the last step's, unless
    both are the same step."""
    if args.load_best_model_at_end and state.best_global_step not in (None, state.global_step):
        return None
    rows = [row for row in state.log_history if "eval_loss" in row and row.get("step") == state.global_step]
    if not rows:
        return None
    return {key: value for key, value in rows[-1].items() if key.startswith("eval_")}
