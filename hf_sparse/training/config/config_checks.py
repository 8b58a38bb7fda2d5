"""Value checks of a run configuration: values the Trainer or the model would accept and
only trip over mid-run (batch sizes, step counts, schedules, head counts, output_dir).
"""

import dataclasses
import logging
import os
import tempfile

import torch
from transformers import TrainingArguments

from ...model.configuration_sparse_llama import SparseLlamaConfig
from ...model.gemm_backends import fp8_ineligibility_reason
from .run_args import OPTIMIZER_CHOICES, SCHEDULER_CHOICES, ConfigError, DownstreamEvalArguments, ScriptArguments

logger = logging.getLogger(__name__)


def check_sparse_schedule(config: SparseLlamaConfig, max_steps: int) -> None:
    """The dense tail is counted back from `max_steps`, so it needs a known run length and
    must fit in it; with weight 2:4 on, the sparse phase [start, max_steps - tail) must
    hold at least one optimizer step (otherwise weight 2:4 would silently never run)."""
    tail, start = config.sparse_dense_finetune_steps, config.weight_2by4_start_step
    if tail > 0 and max_steps <= 0:
        raise ConfigError(
            f"sparse_dense_finetune_steps={tail} needs max_steps > 0: the dense tail is the last "
            f"{tail} of max_steps optimizer steps."
        )
    if tail > max_steps > 0:
        raise ConfigError(
            f"sparse_dense_finetune_steps={tail} is larger than max_steps={max_steps}; "
            f"use sparse_dense_finetune_steps <= {max_steps}."
        )
    if config.weight_2by4 and max_steps > 0 and start + tail >= max_steps:
        raise ConfigError(
            f"weight_2by4_start_step={start} and sparse_dense_finetune_steps={tail} leave no sparse step in "
            f"max_steps={max_steps} (dense before step {start} and from step {max_steps - tail} on); "
            "need weight_2by4_start_step + sparse_dense_finetune_steps < max_steps."
        )
    act_tail = config.activation_dense_tail_steps
    if act_tail > 0 and max_steps <= 0:
        raise ConfigError(
            f"activation_dense_tail_steps={act_tail} needs max_steps > 0: the activation dense tail is the last "
            f"{act_tail} of max_steps optimizer steps."
        )
    if act_tail >= max_steps > 0:
        raise ConfigError(
            f"activation_dense_tail_steps={act_tail} leaves no 2:4 step in max_steps={max_steps}; use "
            f"activation_dense_tail_steps < {max_steps}."
        )
    _warn_short_sparse_phase(config, max_steps)


def _warn_short_sparse_phase(config: SparseLlamaConfig, max_steps: int) -> None:
    """A run legal but mostly dense (e.g. a shortened run that kept its warm-up or tail)."""
    if max_steps <= 0:
        return
    tail = config.sparse_dense_finetune_steps
    phases = []
    if config.weight_2by4:
        phases.append(
            ("weight 2:4", config.weight_2by4_start_step, "weight_2by4_start_step", tail, "sparse_dense_finetune_steps")
        )
    if config.activation_2by4:
        weights_tail = tail if config.activation_dense_finetune else 0
        act_tail, tail_key = max(
            (weights_tail, "sparse_dense_finetune_steps"),
            (config.activation_dense_tail_steps, "activation_dense_tail_steps"),
        )
        phases.append(
            (
                "2:4 activations",
                config.activation_dense_warmup_steps,
                "activation_dense_warmup_steps",
                act_tail,
                tail_key,
            )
        )
    for what, start, start_key, end_tail, tail_key in phases:
        sparse = max(0, max_steps - min(start, max_steps) - end_tail)
        if sparse < max(start, end_tail):
            logger.warning(
                "%s: only %d of max_steps=%d optimizer steps are sparse (%s=%d dense first%s); "
                "shorten those too, or this run is mostly dense.",
                what, sparse, max_steps, start_key, start,
                f", {tail_key}={end_tail} dense at the end" if end_tail else "",
            )  # fmt: skip


# TrainingArguments values that the Trainer accepts and only trips over once data and model
# are built (the sampler's ValueError, a ZeroDivisionError, torch's optimizer): key ->
# (the strategy key that makes it matter, what it counts). Checked on the raw JSON because
# building TrainingArguments already raises a multi-line error for some of them.
_POSITIVE_TRAINER_KEYS = {
    "per_device_train_batch_size": (None, "sequences per device per micro-batch"),
    "per_device_eval_batch_size": (None, "sequences per device per evaluation batch"),
    "gradient_accumulation_steps": (None, "micro-batches per optimizer step"),
    "logging_steps": ("logging_strategy", "steps between log rows, or a fraction of the run below 1"),
    "save_steps": ("save_strategy", "steps between checkpoints, or a fraction of the run below 1"),
    "eval_steps": ("eval_strategy", "steps between evaluations, or a fraction of the run below 1"),
}


def _trainer_default(name: str):
    return next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == name)


def check_fp8_support(config: SparseLlamaConfig, use_cpu: bool) -> None:
    """activation_2by4_fp8 runs only where FP8 2:4 GEMMs exist: say so before anything is built."""
    if not config.activation_2by4_fp8:
        return
    cuda = torch.cuda.is_available() and not use_cpu
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    reason = fp8_ineligibility_reason(device)
    if reason is not None:
        raise ConfigError(
            f"activation_2by4_fp8=True needs FP8 2:4 GEMMs, which cannot run here ({reason}); set "
            "activation_2by4_fp8 to false (the bf16 2:4 recipe runs anywhere)."
        )


_MAX_SEED = 2**32 - 1


def check_trainer_values(data: dict) -> None:
    """Refuse TrainingArguments values that would fail (or silently do nothing) mid-run."""
    for key, (strategy_key, meaning) in _POSITIVE_TRAINER_KEYS.items():
        value = data.get(key, _trainer_default(key))
        if value is None or value > 0:
            continue
        if strategy_key is None:
            raise ConfigError(f"{key}: {value!r} is not valid; use a positive integer ({meaning}).")
        strategy = str(data.get(strategy_key, _trainer_default(strategy_key)))
        if strategy.lower().endswith("steps"):  # "steps" or IntervalStrategy.STEPS
            raise ConfigError(
                f"{key}: {value!r} is not valid with {strategy_key}='steps'; use a positive value ({meaning}), "
                f"or another {strategy_key} ('epoch', 'no')."
            )
    learning_rate = data.get("learning_rate", _trainer_default("learning_rate"))
    if learning_rate < 0:
        raise ConfigError(f"learning_rate: {learning_rate!r} is negative; use a positive value such as 1e-3.")
    max_steps = data.get("max_steps", _trainer_default("max_steps"))
    if max_steps == 0 or max_steps < -1:
        raise ConfigError(
            f"max_steps: {max_steps!r} is not valid; use a positive number of optimizer steps, or -1 (the default) "
            "to train for num_train_epochs."
        )
    for key in ("seed", "data_seed"):
        # numpy's seed range: set_seed (and the data shuffle) fail on anything outside it.
        seed = data.get(key)
        if seed is not None and not 0 <= seed <= _MAX_SEED:
            raise ConfigError(
                f"{key}: {seed!r} is not valid; use an integer from 0 to {_MAX_SEED} (numpy's seed range)."
            )


def check_script_values(script_args: ScriptArguments, training_args: TrainingArguments, loro_scope: str | None) -> None:
    """Values of the script keys (optimizer, scheduler, LORO and non-finite settings) that
    their types allow but the run cannot use."""
    if script_args.optimizer not in OPTIMIZER_CHOICES:
        raise ConfigError(
            f"optimizer={script_args.optimizer!r} is not valid; choose one of {', '.join(map(repr, OPTIMIZER_CHOICES))}."
        )
    if script_args.scheduler not in SCHEDULER_CHOICES:
        raise ConfigError(
            f"scheduler={script_args.scheduler!r} is not valid; choose one of {', '.join(map(repr, SCHEDULER_CHOICES))}."
        )
    if script_args.scheduler == "cosine_restart" and script_args.optimizer != "loro_adamw":
        raise ConfigError(
            "scheduler='cosine_restart' is available with optimizer='loro_adamw'; use lr_scheduler_type otherwise."
        )
    if script_args.scheduler == "cosine_restart" and training_args.max_steps <= 0:
        raise ConfigError("scheduler='cosine_restart' needs max_steps > 0 (the schedule's length).")
    if script_args.optimizer == "loro_adamw" and not loro_scope:
        raise ConfigError("optimizer='loro_adamw' needs low-rank linears: set loro_scope to 'all', 'attn' or 'mlp'.")
    if script_args.optimizer == "loro_adamw" and training_args.weight_decay < 0:
        raise ConfigError(
            f"weight_decay: {training_args.weight_decay!r} is negative, which optimizer='loro_adamw' refuses; use 0 "
            "(off) or a positive value such as 0.1."
        )
    if script_args.nonfinite_policy not in ("stop", "skip"):
        raise ConfigError(
            f"nonfinite_policy={script_args.nonfinite_policy!r} is not valid; choose one of 'stop', 'skip'."
        )
    if script_args.loro_type not in ("loro", "eucl"):
        raise ConfigError(f"loro_type={script_args.loro_type!r} is not valid; choose one of 'loro', 'eucl'.")
    if script_args.loro_refresh not in (None, "all", "lrk", "reg"):
        raise ConfigError(
            f"loro_refresh={script_args.loro_refresh!r} is not valid; choose one of null, 'all', 'lrk', 'reg'."
        )
    for key in ("loro_freq", "loro_refresh_freq"):
        if getattr(script_args, key) <= 0:
            raise ConfigError(f"{key}={getattr(script_args, key)!r} must be a positive integer.")


def check_output_dir_path(output_dir: str | None) -> None:
    """output_dir, or a folder above it, being a file would fail the first save (FileExistsError)."""
    if output_dir is not None and not output_dir.strip():
        # The Trainer would save into "" (os.makedirs("") fails) once data and model are built.
        raise ConfigError(
            f'output_dir: {output_dir!r} is empty; give the folder the run writes to, e.g. "outputs/my_run".'
        )
    if not output_dir:
        return
    target = path = os.path.abspath(os.path.expanduser(output_dir))
    while not os.path.exists(path):  # the nearest existing folder (or file) above it
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        where = "is an existing file" if path == target else f"is below the file {path!r}"
        raise ConfigError(f"output_dir: {output_dir!r} {where}; output_dir must be a directory (existing or new).")
    # Can the run write there? Probe with a scratch folder in the nearest existing one and
    # remove it: nothing is left behind, and root's access() answers would be no answer.
    try:
        probe = tempfile.mkdtemp(prefix=".hf_sparse_write_probe_", dir=path)
    except OSError as err:
        raise ConfigError(
            f"output_dir: {output_dir!r} cannot be written ({err.strerror or err} in {path!r}); choose a folder "
            "you can write to."
        ) from None
    os.rmdir(probe)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_attention_heads(raw: dict, path: str) -> None:
    """Head counts that do not divide: transformers checks hidden_size % num_attention_heads
    in a multi-line report; a num_attention_heads that num_key_value_heads does not divide
    passes every config check and crashes inside attention at the first step."""
    layers = raw.get("num_hidden_layers", getattr(SparseLlamaConfig, "num_hidden_layers", None))
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ConfigError(
            f"num_hidden_layers: {layers!r} in model_config {path!r} is not valid; use a positive integer "
            "(a model without decoder layers has nothing to train)."
        )
    values = {}
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads"):
        value = raw.get(key, getattr(SparseLlamaConfig, key, None))
        if key == "num_key_value_heads" and value is None:
            value = values["num_attention_heads"]  # None means plain multi-head attention
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}: {value!r} in model_config {path!r} is not valid; use a positive integer.")
        values[key] = value
    hidden, heads, kv_heads = values["hidden_size"], values["num_attention_heads"], values["num_key_value_heads"]
    if hidden % heads:
        near = sorted(_divisors(hidden), key=lambda d: (abs(d - heads), d))[:2]
        raise ConfigError(
            f"num_attention_heads: {heads} in model_config {path!r} does not divide hidden_size={hidden} (each head "
            f"gets hidden_size / num_attention_heads features); use a divisor of {hidden} such as "
            f"{' or '.join(map(str, sorted(near)))}."
        )
    if heads % kv_heads:
        raise ConfigError(
            f"num_key_value_heads: {kv_heads} in model_config {path!r} does not divide num_attention_heads={heads} "
            f"(each key/value head serves a whole group of query heads); use one of "
            f"{', '.join(map(str, _divisors(heads)))}."
        )


def output_dir_holds_run(output_dir: str) -> bool:
    if not output_dir or not os.path.isdir(output_dir):
        return False
    return any(
        name in ("trainer_state.json", "config.json", "all_results.json") or name.startswith("checkpoint-")
        for name in os.listdir(output_dir)
    )


def check_output_dir(training_args: TrainingArguments, script_args: ScriptArguments) -> None:
    """Refuse to mix a new run into the folder of another one."""
    if script_args.overwrite_output_dir or training_args.resume_from_checkpoint:
        return
    if output_dir_holds_run(training_args.output_dir):
        raise ConfigError(
            f"output_dir {training_args.output_dir!r} already holds a run; set overwrite_output_dir=true, "
            "resume it with resume_from_checkpoint, or choose another output_dir."
        )


def check_lm_eval_args(eval_args: DownstreamEvalArguments, training_args: TrainingArguments) -> None:
    """The lm_eval_* keys, before anything is built: values, that lm-eval is installed (the
    extra), that the run keeps the whole model on rank 0, and that every task is known."""
    tasks = eval_args.lm_eval_tasks
    if tasks is None:
        extra = [
            k for k in ("lm_eval_include_path", "lm_eval_limit", "lm_eval_steps") if getattr(eval_args, k) is not None
        ]
        if extra:
            raise ConfigError(f'{extra[0]} is set but lm_eval_tasks is not; name the tasks, e.g. ["hf_sparse_local"].')
        return
    if not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise ConfigError(
            f'lm_eval_tasks: {tasks!r} is not valid; give a list of task names, e.g. ["hf_sparse_local"].'
        )
    for key, meaning in (
        ("lm_eval_limit", "examples per task, or null for all"),
        ("lm_eval_steps", "optimizer steps between evaluations, or null for each evaluation"),
    ):
        value = getattr(eval_args, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: {value!r} is not valid; use a positive integer ({meaning}).")
    eval_strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if eval_args.lm_eval_steps is None and eval_strategy == "no":
        raise ConfigError(
            "lm_eval_tasks runs at each evaluation unless lm_eval_steps is set, and eval_strategy is 'no'; set "
            "lm_eval_steps (every N optimizer steps) or an eval_strategy."
        )
    path = eval_args.lm_eval_include_path
    if path is not None and not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise ConfigError(f"lm_eval_include_path: {path!r} {what}; give a folder of lm-eval task YAMLs.")
    from ..lm_eval_integration import build_task_manager, check_hub_datasets, require_lm_eval, sharded_training_reason

    try:
        require_lm_eval()
    except ImportError as err:
        raise ConfigError(str(err)) from None
    reason = sharded_training_reason(training_args)
    if reason:
        raise ConfigError(
            f"lm_eval_tasks: in-loop lm-eval needs the whole model on rank 0, and {reason} shards it; train with DDP "
            "or DeepSpeed ZeRO-1/2, or evaluate the finished run with hf-sparse-eval."
        )
    try:
        check_hub_datasets(build_task_manager(tasks, path), tasks)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# Schedulers that ignore warmup_steps (the others all warm up linearly from 0).
_NO_WARMUP_SCHEDULERS = ("constant", "reduce_lr_on_plateau")


def warn_on_training_settings(training_args: TrainingArguments, script_args: ScriptArguments) -> None:
    """Settings the Trainer accepts that do something else than they seem to: said once, on
    rank 0, before anything is built."""
    if training_args.process_index != 0:
        return
    for message in training_setting_warnings(training_args, script_args):
        logger.warning("%s", message)


def training_setting_warnings(training_args: TrainingArguments, script_args: ScriptArguments) -> list[str]:
    messages = []
    max_steps = training_args.max_steps
    scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    warms_up = script_args.scheduler == "cosine_restart" or scheduler not in _NO_WARMUP_SCHEDULERS
    if max_steps > 0 and warms_up and training_args.get_warmup_steps(max_steps) >= max_steps:
        warmup = training_args.get_warmup_steps(max_steps)
        given = training_args.warmup_steps
        steps = f"warmup_steps={given!r}" + (f" ({warmup} steps)" if given < 1 else "")
        messages.append(
            f"{steps} is not below max_steps={max_steps}: the learning rate rises through the whole run and never "
            f"leaves the warm-up (the last step trains at {max_steps - 1}/{warmup} of learning_rate="
            f"{training_args.learning_rate!r}); use a warmup_steps well below max_steps, or a ratio below 1 such as 0.05."
        )
    on_cpu = training_args.use_cpu or not torch.cuda.is_available()
    deepspeed = training_args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if training_args.fp16 and on_cpu and not deepspeed:
        # accelerate 1.15 enables fp16 autocast and loss scaling only off the CPU: measured,
        # every activation of such a run is float32 (bf16 does autocast on CPU).
        messages.append(
            "fp16=True has no effect on CPU: accelerate autocasts to float16 only on GPUs, so this run trains in "
            "float32, without autocast or loss scaling (its config.json says float32); use bf16=true for bfloat16 "
            "autocast on CPU, or drop fp16."
        )
    if training_args.weight_decay < 0:
        messages.append(
            f"weight_decay={training_args.weight_decay!r} is negative: the decay then pushes the weights away from "
            "zero every step (it grows them) instead of shrinking them; use 0 (off) or a positive value such as 0.1."
        )
    return messages
