#!/usr/bin/env python
"""Pretrain a `sparse_llama` model with the stock HuggingFace Trainer.

    python train_hf.py CONFIG.json [--key value ...]
    accelerate launch train_hf.py CONFIG.json

CONFIG.json is one flat object: TrainingArguments keys, model keys, data keys and the
keys of this script (see README). This file is wiring only; the logic lives in hf_sparse.
"""

import logging
import os
import shlex
import shutil
import signal
import sys

import transformers
from transformers import AutoModelForCausalLM, Trainer, default_data_collator, set_seed

import hf_sparse
from hf_sparse.report import NotARunError, write_report
from hf_sparse.training.auto_switch import SWITCH_STEP_KEY, switch_step_reached
from hf_sparse.training.callbacks import EvalPerplexityCallback, ModelCardCallback
from hf_sparse.training.checkpoints import (
    checkpoint_step,
    is_complete_checkpoint,
    last_complete_checkpoint,
    write_model_card,
)
from hf_sparse.training.cli_help import format_help, wants_help
from hf_sparse.training.data import build_datasets
from hf_sparse.training.evaluation import build_compute_metrics, preprocess_logits_for_metrics
from hf_sparse.training.launch_checks import check_hub_access
from hf_sparse.training.lm_eval_callback import LmEvalCallback
from hf_sparse.training.loro import LoroCallback, build_loro_optimizer_and_scheduler
from hf_sparse.training.numerics import NonFiniteError, NumericsGuardCallback
from hf_sparse.training.preemption import PreemptionCallback
from hf_sparse.training.resume_check import final_step_eval, warn_on_resume_changes
from hf_sparse.training.run_args import ConfigError, LaunchError
from hf_sparse.training.run_config import parse_run_config
from hf_sparse.training.tokenizer import load_tokenizer

logger = logging.getLogger("train_hf")


def save_final_model(trainer: Trainer, output_dir: str) -> None:
    """Write the final model so that a crash mid-write never leaves something that looks
    finished: everything goes to a temporary folder first, config.json moves in last."""
    staging = os.path.join(output_dir, ".final_model.tmp")
    if trainer.is_world_process_zero():  # only rank 0 writes; another rank must not race it
        shutil.rmtree(staging, ignore_errors=True)
    # On every rank: FSDP/DeepSpeed gather the weights here. _internal_call: with push_to_hub
    # the Trainer would otherwise upload output_dir (with its own card) before it is complete.
    trainer.save_model(staging, _internal_call=True)
    if not trainer.is_world_process_zero():
        return
    names = sorted(os.listdir(staging), key=lambda name: name == "config.json")
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    shutil.rmtree(staging, ignore_errors=True)


def resolve_resume(args) -> str | None:
    """`resume_from_checkpoint: true` means the last *finished* checkpoint of output_dir; a
    folder given by name must be a finished checkpoint too (checked before anything is built)."""
    resume = args.resume_from_checkpoint
    if resume in (True, "true", "True", "last"):
        resume = last_complete_checkpoint(args.output_dir)
        if resume is None:
            raise ConfigError(f"resume_from_checkpoint: no finished checkpoint in {args.output_dir!r}.")
        logger.info("resuming from %s", resume)
    elif resume and not is_complete_checkpoint(resume):
        what = "does not exist" if not os.path.exists(resume) else "is not a finished checkpoint (no trainer_state.json)"
        latest = last_complete_checkpoint(args.output_dir)
        hint = f"; the last finished one is {latest!r}" if latest else ""
        raise ConfigError(f"resume_from_checkpoint: {resume!r} {what}{hint}; or use true for the last finished one.")
    return resume or None


def already_finished(resume: str | None, args) -> bool:
    """Resuming a checkpoint written at max_steps (or later) has nothing left to train: the
    Trainer would run one more step and overwrite the final model."""
    if resume is None or args.max_steps <= 0:
        return False
    step = checkpoint_step(resume)
    if step < args.max_steps:
        return False
    if args.process_index == 0:
        logger.warning(
            "nothing to train: %s is at step %d of max_steps=%d, so this run already finished; its model and "
            "trainer_state.json in %s are left as they are (raise max_steps to train further).",
            resume, step, args.max_steps, os.path.abspath(args.output_dir),
        )  # fmt: skip
    return True


def import_world_group_binders() -> None:
    """Import, before the process group exists, the modules that bind `group.WORLD` as a
    default argument at import time (deepspeed.comm's TorchBackend.barrier; torch.distributed.nn's
    collectives). Imported after init_process_group (accelerate's unwrap_model imports DeepSpeed's
    engine whenever DeepSpeed is installed) they hold the default group past
    destroy_process_group: its gloo threads then ran into interpreter teardown, where a rank now
    and then aborted after a successful run ("terminate called without an active exception").
    Both are imported during a run anyway; this only moves them before the group is created."""
    import torch.distributed.nn  # noqa: F401
    from accelerate.utils import is_deepspeed_available

    if is_deepspeed_available():
        import deepspeed.comm  # noqa: F401


def main(argv: list[str]) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import_world_group_binders()  # before parse_run_config: TrainingArguments creates the process group
    run = parse_run_config(argv)
    args, data_args = run.training_args, run.data_args
    resume = resolve_resume(args)
    if already_finished(resume, args):
        return {}
    check_hub_access(run.data_args)  # before any tokenizer or dataset is fetched
    transformers.utils.logging.set_verbosity_warning()
    set_seed(args.seed)

    tokenizer = load_tokenizer(data_args.tokenizer_name, vocab_size=data_args.tokenizer_vocab_size or run.model_config.vocab_size)
    # The base vocabulary must fit the embedding; added special tokens beyond it (t5-base's
    # 100 sentinels over a 32000-row model, as in the original recipe) never occur in text.
    if tokenizer.vocab_size > run.model_config.vocab_size:
        raise ConfigError(
            f"tokenizer_name: the tokenizer's vocabulary has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {run.model_config.vocab_size}; raise vocab_size in the model_config or pick another tokenizer."
        )
    # Generation and the saved config should speak the tokenizer's special ids.
    run.model_config.eos_token_id = tokenizer.eos_token_id
    run.model_config.bos_token_id = tokenizer.bos_token_id
    run.model_config.pad_token_id = tokenizer.pad_token_id

    # Rank 0 tokenises and fills the datasets cache first; the other ranks then read it.
    with args.main_process_first(desc="tokenizing and packing"):
        try:
            train_dataset, eval_dataset = build_datasets(data_args, tokenizer, seed=args.seed)
        except ValueError as err:  # what the data holds (a missing column, too little text): one line
            raise ConfigError(str(err)) from None
    # Saved with the model: tools that read the tokenizer (lm-eval, serving) see the
    # trained block, not the "unlimited" sentinel. Set only now: packing tokenizes whole
    # documents, which a limit would flag with a warning for each long one.
    tokenizer.model_max_length = data_args.max_length
    model = AutoModelForCausalLM.from_config(run.model_config)
    config = run.model_config
    weight_2by4 = (
        f"{config.weight_2by4_scope}/{config.weight_sparse_method} from step {config.weight_2by4_start_step}, "
        f"dense tail {config.sparse_dense_finetune_steps}"
        if config.weight_2by4
        else "off"
    )
    logger.info(
        "model: sparse_llama squ_relu=%s activation_2by4=%s weight_2by4=%s loro_scope=%s, %.2fM parameters; world_size=%d",
        config.squ_relu,
        config.activation_2by4,
        weight_2by4,
        config.loro_scope,
        sum(p.numel() for p in model.parameters()) / 1e6,
        args.world_size,
    )

    optimizers = (None, None)
    guard = NumericsGuardCallback(run.script_args.nonfinite_policy)
    preemption = PreemptionCallback()
    extra_callbacks = [guard, preemption]
    if run.script_args.optimizer == "loro_adamw":
        optimizers = build_loro_optimizer_and_scheduler(model, args, run.script_args)
        extra_callbacks.append(LoroCallback())
    lm_eval = None
    if run.eval_args.lm_eval_tasks:
        lm_eval = LmEvalCallback(
            run.eval_args.lm_eval_tasks, include_path=run.eval_args.lm_eval_include_path,
            limit=run.eval_args.lm_eval_limit, steps=run.eval_args.lm_eval_steps,
            max_length=data_args.max_length, tokenizer=tokenizer,
        )  # fmt: skip
        extra_callbacks.append(lm_eval)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=build_compute_metrics(),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=[
            hf_sparse.SparsityCallback(
                activation_metrics=run.script_args.wandb_sparsityrelu,
                weight_metrics=run.script_args.weight_sparsity_metrics,
                flip_rate=run.script_args.flip_rate,
            ),
            EvalPerplexityCallback(),
            ModelCardCallback(dataset_name=data_args.dataset_name),
            *extra_callbacks,
        ],
        optimizers=optimizers,
    )
    if resume and trainer.is_world_process_zero():
        # The Trainer resumes silently with a new max_steps, schedule or batch size.
        warn_on_resume_changes(resume, args, run.script_args)
    train_result = trainer.train(resume_from_checkpoint=resume)
    if preemption.exit_code is not None:
        # A checkpoint of the last step is written; nothing else is, so the run does not
        # look finished (no final model, no trainer_state.json in output_dir).
        raise Preempted(preemption, args, argv)
    if guard.failure:
        trainer.save_state()  # keep the log history for the post-mortem; no model is saved
        raise NonFiniteError(guard.failure)
    metrics = dict(train_result.metrics)
    switch_step = switch_step_reached(model.config, trainer.state.global_step)
    if switch_step is not None:  # when 2:4 activations started: the fixed warm-up or the auto switch
        metrics[SWITCH_STEP_KEY] = switch_step
    if eval_dataset is not None:
        # Reuse the Trainer's own evaluation of the last step: a second one would log a
        # duplicate row (and a second TensorBoard events file).
        final_eval = final_step_eval(trainer.state, args)
        metrics.update(final_eval if final_eval is not None else trainer.evaluate())
    if lm_eval is not None:
        metrics.update(lm_eval.evaluate_at_end(trainer))
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)

    # The Trainer turns the KV cache off for training; the saved model is for inference,
    # and its generation_config already says use_cache=true.
    trainer.model.config.use_cache = True
    save_final_model(trainer, args.output_dir)
    # trainer_state.json (full log_history) is written whatever save_strategy is.
    trainer.save_state()
    if trainer.is_world_process_zero():
        write_model_card(args.output_dir, model.config, trainer.state.log_history, args, data_args.dataset_name)
    if args.push_to_hub and trainer.is_world_process_zero():
        # Trainer.push_to_hub would write its generic card over ours: upload the folder as is.
        from huggingface_hub import upload_folder

        upload_folder(repo_id=trainer.hub_model_id, folder_path=args.output_dir, token=args.hub_token,
                      commit_message="End of training", ignore_patterns=["checkpoint-*", "*.tmp", "runs/*"])
    if trainer.is_world_process_zero():
        logger.info("model, tokenizer and config saved to %s", os.path.abspath(args.output_dir))
        logger.info("metrics: %s", os.path.abspath(os.path.join(args.output_dir, "all_results.json")))
        logger.info("log history: %s", os.path.abspath(os.path.join(args.output_dir, "trainer_state.json")))
        try:
            report = write_report(args.output_dir)
            logger.info("sparsity plots: %s, %s", report["heatmap"], report["curves"])
        except NotARunError as err:
            logger.info("no sparsity report: %s", err)
    return metrics


class Preempted(Exception):
    """SIGTERM or Ctrl-C stopped the run after a checkpoint; carries the exit code and the
    one line that says how to resume."""

    def __init__(self, preemption: PreemptionCallback, args, argv: list[str]):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{preemption.stopped_at}")
        argv = _without_resume_flag(list(argv)) + ["--resume_from_checkpoint", "true"]
        invoked = os.path.basename(sys.argv[0])
        if invoked == "hf-sparse-train":
            prog = [invoked]
        else:  # the script as it was run, or train_hf.py when main() was called from Python
            prog = ["python", sys.argv[0] if invoked == "train_hf.py" else "train_hf.py"]
        command = " ".join(shlex.quote(a) for a in [*prog, *argv])
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            command += " (with the same launcher: torchrun / accelerate launch ...)"
        name = signal.Signals(preemption.signal_received).name
        super().__init__(
            f"stopped by {name} after step {preemption.stopped_at}; {checkpoint} is complete. Resume with: {command}"
        )
        self.exit_code = preemption.exit_code


def _without_resume_flag(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == "--resume_from_checkpoint":
            skip = True
            continue
        if not token.startswith("--resume_from_checkpoint="):
            out.append(token)
    return out


def _wait_for_all_ranks() -> None:
    # After a successful run only (a rank that failed never arrives): rank 0 may still be
    # writing the final checkpoint when the others finish, and a rank that tore the group
    # down meanwhile aborted at exit once ("terminate called without an active exception",
    # a full-suite run on 2 loaded vCPUs, 2026-12-02).
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _close_process_group() -> None:
    # Leaving a gloo/NCCL group open at interpreter exit can abort the process
    # ("terminate called without an active exception") after a successful run.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cli() -> None:
    """`python train_hf.py CONFIG.json ...` and the `hf-sparse-train` console script."""
    argv = sys.argv[1:]
    if wants_help(argv):
        prog = os.path.basename(sys.argv[0]) or "train_hf.py"
        print(format_help(prog=prog), end="")  # the CLI's job: usage and every key, to stdout, exit 0
        return
    try:
        main(argv)
        _wait_for_all_ranks()
    except (ConfigError, NonFiniteError) as err:
        if isinstance(err, LaunchError) and os.environ.get("RANK", "0") != "0":
            sys.exit(1)  # the same verdict in every rank: rank 0 says it once
        sys.exit(f"train_hf.py: error: {err}")
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"train_hf.py: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        # A second Ctrl-C (or one before training started): stop now, without a traceback.
        print("train_hf.py: interrupted (Ctrl-C); resume from the last finished checkpoint with "
              "--resume_from_checkpoint true", file=sys.stderr)  # fmt: skip
        sys.exit(130)
    finally:
        _close_process_group()


if __name__ == "__main__":
    cli()
