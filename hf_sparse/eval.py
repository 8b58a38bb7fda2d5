"""Evaluate a finished run, a checkpoint or an export with lm-evaluation-harness.

    python -m hf_sparse.eval RUN_OR_CHECKPOINT --tasks hf_sparse_local[,hellaswag,...] [--limit N]
    hf-sparse-eval RUN_OR_CHECKPOINT --tasks ...          (pip install hf_sparse[eval])

A thin layer over `lm_eval.simple_evaluate` with the settings a run folder implies, which
the plain `lm_eval --model hf` command leaves to the user:
- `trust_remote_code` only for `sparse_llama` folders (stock llama/arcee exports need none);
- `max_length` = the trained block size (the saved tokenizer's `model_max_length`), also
  when the model JSON declared a longer `max_position_embeddings`;
- `dtype="auto"`: the stored dtype;
- the shipped offline tasks (`hf_sparse_local`: `hf_sparse_nextline`, `hf_sparse_heldout`)
  are found without an `--include_path` pointing into the installed package.
The equivalent plain command is printed, so results can be reproduced with lm_eval alone.
"""

import argparse
import json
import logging
import os
import sys

from .training.callbacks.checkpoints import last_complete_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["EvalError", "lm_eval_settings", "evaluate_folder", "main"]

# transformers' "no limit" sentinel for model_max_length is 1e30; anything this large is unset.
_UNSET_LENGTH = 10**18


class EvalError(ValueError):
    """A one-line, user-facing reason why the evaluation cannot run."""


def lm_eval_settings(folder: str) -> dict:
    """lm-eval `model_args` for a saved model folder: pretrained, trust_remote_code, max_length, dtype."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        checkpoint = last_complete_checkpoint(folder) if os.path.isdir(folder) else None
        hint = f"; its last finished checkpoint is {checkpoint!r}" if checkpoint else ""
        raise EvalError(f"{folder!r} is not a saved model folder (no config.json){hint}.")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    max_length = None
    tokenizer_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tokenizer_path):
        with open(tokenizer_path, encoding="utf-8") as handle:
            length = json.load(handle).get("model_max_length")
        if isinstance(length, int) and 0 < length < _UNSET_LENGTH:
            max_length = length
    if max_length is None:
        max_length = config.get("max_position_embeddings")
    settings = {"pretrained": os.path.abspath(folder), "dtype": "auto"}
    if config.get("model_type") == "sparse_llama":
        settings["trust_remote_code"] = True
    if max_length:
        settings["max_length"] = int(max_length)
    return settings


def plain_command(settings: dict, tasks: list[str], limit: int | None, include_path: str) -> str:
    model_args = ",".join(f"{k}={v}" for k, v in settings.items())
    limit_arg = f" --limit {limit}" if limit else ""
    return f"lm_eval --model hf --model_args {model_args} --tasks {','.join(tasks)} --include_path {include_path}{limit_arg}"


def evaluate_folder(
    folder: str,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    include_path: str | None = None,
    log_samples: bool = False,
) -> dict:
    """lm-eval's full output (results, configs, and samples with `log_samples`) for `folder`."""
    from .training.lm_eval_integration import build_task_manager, quiet_lm_eval, require_lm_eval

    try:
        require_lm_eval("hf-sparse-eval")
    except ImportError as err:
        raise EvalError(str(err)) from None
    settings = lm_eval_settings(folder)
    try:
        manager = build_task_manager(tasks, include_path)
    except ValueError as err:
        raise EvalError(
            str(err).replace("lm_eval_tasks: ", "--tasks: ").replace("lm_eval_include_path", "--include_path")
        )
    import torch
    from lm_eval import simple_evaluate

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with quiet_lm_eval():
        return simple_evaluate(
            model="hf", model_args=settings, tasks=list(tasks), limit=limit, batch_size=batch_size, device=device,
            task_manager=manager, log_samples=log_samples,
        )  # fmt: skip


def main(argv=None) -> int:
    from .training.config.cli_help import tool_prog
    from .training.lm_eval_integration import flatten_results, require_lm_eval, shipped_tasks_dir

    parser = argparse.ArgumentParser(
        prog=tool_prog("hf-sparse-eval", "hf_sparse.eval"),
        description="Evaluate a run folder, checkpoint or export with lm-evaluation-harness (trained block size, "
        "stored dtype, trust_remote_code for sparse_llama, the shipped offline tasks).",
    )
    parser.add_argument("folder", help="a finished run folder, a checkpoint-N folder or an export")
    parser.add_argument("--tasks", required=True, help="comma-separated task names, e.g. hf_sparse_local,hellaswag")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--include_path", default=None, help="a folder of extra task YAMLs")
    parser.add_argument("--output", default=None, help="write lm-eval's results JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.limit is not None and args.limit <= 0:
        parser.error(f"--limit {args.limit} is not valid; use a positive number of examples per task.")
    try:
        try:
            require_lm_eval("hf-sparse-eval")
        except ImportError as err:
            raise EvalError(str(err)) from None
        settings = lm_eval_settings(args.folder)
        logger.info("same as: %s", plain_command(settings, tasks, args.limit, args.include_path or shipped_tasks_dir()))
        output = evaluate_folder(args.folder, tasks, args.limit, args.batch_size, args.device, args.include_path)
    except EvalError as err:
        logger.error("hf-sparse-eval: error: %s", err)
        return 2
    from lm_eval.utils import make_table

    logger.info("%s", make_table(output))  # the command's result (as hf_sparse.report's summary)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"results": output["results"], "metrics": flatten_results(output["results"])}, handle,
                      indent=2, default=str)  # fmt: skip
        logger.info("results: %s", os.path.abspath(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
