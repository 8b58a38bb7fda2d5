"""Downstream evaluation in the training loop with lm-evaluation-harness (`pip install
hf_sparse[eval]`).

`LmEvalCallback` evaluates the in-memory model (`lm_eval.models.huggingface.HFLM` around
it, the Trainer's tokenizer, the trained block size as `max_length`) on lm-eval tasks and
merges the scores into the log row of that step, the row that carries `loss`:
`lm_eval/<task>/<metric>`, where `<metric>` is lm-eval's name without its `,none` filter
suffix (`acc,none` -> `acc`; another filter stays as a sub-key, `exact_match,strict-match`
-> `exact_match/strict-match`). Standard errors are not computed in the loop (lm-eval's
bootstrap starts a process pool, which has no place inside a training process).

Distributed (DDP, DeepSpeed ZeRO-1/2: every rank holds the whole model): rank 0 evaluates
its own replica, unwrapped, so no collective runs inside the forwards, while the other ranks
wait in the broadcast of its scores; every rank then logs the same row. Sharded models
(FSDP, ZeRO-3) are refused up front. lm-eval is imported only here and only when used.

This module is the integration (task index, offline hub checks, rank-0 evaluation), used by
the callback (`callbacks/lm_eval.py`), the run checks and `hf-sparse-eval`; it imports no
callback.
"""

import difflib
import functools
import importlib
import logging
import os
import random
from contextlib import contextmanager

import numpy as np
import torch

from .. import metric_keys as keys

logger = logging.getLogger(__name__)

METRIC_PREFIX = keys.LM_EVAL + "/"
EXTRA_NAME = "hf_sparse[eval]"
MISSING_LM_EVAL = (
    "{key} needs lm-evaluation-harness, which is not installed; install the extra: "
    f"pip install '{EXTRA_NAME}' (or pip install lm-eval==0.4.13)."
)
# Messages lm-eval logs on every call with an in-memory model, or for every task with a
# custom loader ("<task>: Custom kwargs can be passed ...", two lines); nothing to act on.
_BENIGN_LM_EVAL_MESSAGES = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
)
# lm-eval warns once per item longer than max_length (the trained block size), which it
# cuts from the left: expected here, and counted into one line instead.
_TRUNCATION_MESSAGE = " tokens from the left."


def require_lm_eval(key: str = "lm_eval_tasks") -> None:
    """Raise ImportError with one line naming the extra when lm-eval is missing."""
    try:
        importlib.import_module("lm_eval")
    except ImportError:
        raise ImportError(MISSING_LM_EVAL.format(key=key)) from None


def shipped_tasks_dir() -> str:
    from ..eval_tasks import TASKS_DIR

    return TASKS_DIR


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults)


def build_task_manager(tasks: list[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows `tasks`: the shipped offline tasks and
    `include_path` first; lm-eval's own (hub) task index only when a name is not there
    (indexing its ~15k task files takes seconds, so each index is built once per process).
    Raises ValueError (one line) for a name that no index has."""
    paths = (shipped_tasks_dir(),) + ((os.path.abspath(include_path),) if include_path else ())
    manager = _task_manager(paths, False)
    if all(name in manager.all_tasks for name in tasks):
        return manager
    manager = _task_manager(paths, True)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"lm_eval_tasks: {unknown[0]!r} is not an lm-eval task, group or tag (nor one of the shipped offline tasks "
            f"in {shipped_tasks_dir()}{' or of lm_eval_include_path' if include_path else ''}).{hint}"
        )
    return manager


def hub_datasets(manager, tasks: list[str]):
    """(task, hub dataset, config name) for each named task (or task of a named tag) that
    reads a hub dataset; groups are not expanded."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    from lm_eval.tasks._yaml_loader import load_yaml

    index = manager.task_index
    names = set()
    for name in tasks:
        names |= {n for n, entry in index.items() if name in entry.tags} | ({name} if index[name].yaml_path else set())
    for name in sorted(names):
        path = index[name].yaml_path
        config = load_yaml(path, resolve_func=False) if path is not None and str(path).endswith(".yaml") else {}
        dataset = config.get("dataset_path")
        if config.get("task") != name or config.get("custom_dataset") or not isinstance(dataset, str):
            continue
        if dataset in _PACKAGED_DATASETS_MODULES or os.path.exists(os.path.expanduser(dataset)):
            continue
        yield name, dataset, config.get("dataset_name")


def check_hub_datasets(manager, tasks: list[str]) -> None:
    """In offline mode, a task whose hub dataset is not cached would fail at the first
    in-loop evaluation, after training has started: say so now (ValueError, one line)."""
    import datasets.config

    from .data.hub_access import _dataset_cache_dirs, _dataset_cached, _offline_reason

    if not datasets.config.HF_HUB_OFFLINE:
        return
    for task, dataset, config_name in hub_datasets(manager, tasks):
        if not _dataset_cached(dataset, config_name):
            raise ValueError(
                f"lm_eval_tasks: task {task!r} reads the hub dataset {dataset!r}, the hub is unreachable "
                f"({_offline_reason(('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'))}), and the local cache "
                f"({' or '.join(_dataset_cache_dirs(dataset))}) has no copy of it; run the task once where the hub is "
                "reachable, or use the shipped offline tasks (hf_sparse_local)."
            )


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's `results` section -> {"lm_eval/<task>/<metric>": float}; non-numeric
    entries (aliases, "N/A" standard errors) and sample counts are dropped."""
    flat = {}
    for task, metrics in results.items():
        for name, value in metrics.items():
            if "," not in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = name.partition(",")
            key = metric if filter_name == "none" else f"{metric}/{filter_name}"
            flat[f"{METRIC_PREFIX}{task}/{key}"] = float(value)
    return flat


def lm_eval_metrics(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith(METRIC_PREFIX)}


class _DropBenign(logging.Filter):
    def __init__(self):
        super().__init__()
        self.truncated = 0

    def filter(self, record):
        message = str(record.msg)
        if message.endswith(_TRUNCATION_MESSAGE) and "Truncating" in message:
            self.truncated += 1
            return False
        return not any(benign in message for benign in _BENIGN_LM_EVAL_MESSAGES)


_truncation_said = False


def _git_commit_hash_quietly():
    """lm_eval.loggers.utils.get_git_commit_hash without git's "fatal: not a git repository"
    on the terminal: it runs `git describe` with stderr inherited, wherever the user is."""
    import subprocess

    from lm_eval.loggers.utils import get_commit_from_path

    try:
        described = subprocess.run(["git", "describe", "--always"], capture_output=True, check=True, text=True)
        return described.stdout.strip()
    except (subprocess.CalledProcessError, OSError):
        return get_commit_from_path(os.getcwd())


@contextmanager
def quiet_lm_eval():
    """lm-eval without its per-call and per-item chatter (the messages above) and without the
    stderr of its git probe; real warnings pass. Long items cut to max_length are said once
    per process, as a count."""
    global _truncation_said
    import lm_eval.evaluator

    benign = _DropBenign()
    loggers = [logging.getLogger(name) for name in ("lm_eval.models.huggingface", "lm_eval.api.task")]
    for each in loggers:
        each.addFilter(benign)
    git_hash, lm_eval.evaluator.get_git_commit_hash = lm_eval.evaluator.get_git_commit_hash, _git_commit_hash_quietly
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = git_hash
        for each in loggers:
            each.removeFilter(benign)
        if benign.truncated and not _truncation_said:
            _truncation_said = True
            logger.info(
                "lm-eval cut %d items longer than max_length to their last max_length tokens (lm-eval's rule; not "
                "repeated for later evaluations)", benign.truncated,
            )  # fmt: skip


@contextmanager
def _training_state_kept(model):
    """Evaluation must not change the training run: lm-eval switches the model to eval
    mode and its task setup draws from the global generators, which also feed data order,
    MVUE draws and dropout. Restore both afterwards."""
    was_training = model.training
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class EvaluationStopped(Exception):
    """A stop signal arrived while lm-eval was running: its scores are dropped."""


def _stop_between_batches(lm, should_stop) -> None:
    """Make every model call of `lm` check `should_stop()` first: a preempted run cannot wait
    for a whole task set (torch elastic kills a rank 30 s after SIGTERM)."""
    for name in ("_model_call", "_model_generate"):
        call = getattr(lm, name)

        def checked(*args, _call=call, **kwargs):
            if should_stop():
                raise EvaluationStopped()
            return _call(*args, **kwargs)

        setattr(lm, name, checked)


def evaluate_model(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    mixed_precision_dtype: torch.dtype | None = None,
    task_manager=None,
    should_stop=None,
) -> dict[str, float]:
    """Run lm-eval on an in-memory causal LM in this process; the flattened metrics.

    Uses `lm_eval.evaluator.evaluate` rather than `simple_evaluate`: the latter also
    reseeds the global generators and collects an environment report (subprocesses such
    as `pip list`) on every call, which a training loop neither wants nor needs.
    `should_stop`: checked before every batch; when it says yes, EvaluationStopped is raised.
    """
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager or build_task_manager(tasks, include_path)
    with _training_state_kept(model), quiet_lm_eval(), torch.no_grad():
        lm = HFLM(
            pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
            max_length=max_length or model.config.max_position_embeddings,
            mixed_precision_dtype=mixed_precision_dtype,
        )  # fmt: skip
        if should_stop is not None:
            _stop_between_batches(lm, should_stop)
        loaded = manager.load(list(tasks))
        for task in loaded["tasks"].values():
            # What simple_evaluate does per task: zero-shot unless the task says otherwise.
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
        output = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)
    return flatten_results(output["results"])


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def on_rank0_then_share(fn):
    """`fn()` on rank 0 alone while the other ranks wait in the broadcast of its result (or
    of its error, so that no rank is left waiting); every rank returns the same value."""
    dist = _distributed()
    if dist is None:
        return fn()
    payload = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except Exception as err:  # every rank must learn of it, or they would wait forever
            payload = [("error", f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise RuntimeError(f"lm-eval failed on rank 0: {value}")
    return value


def sharded_training_reason(args) -> str | None:
    """Why rank 0 does not hold the whole model in this run (FSDP, DeepSpeed ZeRO-3), or None."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "FSDP"
    if is_deepspeed_zero3_enabled() or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    return None
