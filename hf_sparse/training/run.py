"""One train_hf.py run from start to exit: build, train, finish, and every way out.

    train_hf.cli()  ->  run_to_outcome(): main() = build -> train -> finish  ->  release_process_groups()  ->  exit code

Every exit path ends the same way. main() raises (a bad config, a stop signal, the non-finite
guard, a failing callback or lm-eval) or returns; `run_to_outcome` turns that into an
`Outcome` (exit code and one line) and drops the exception, whose traceback holds main()'s
frames and through them the Trainer and the DDP-wrapped model. `release_process_groups`
then collects what is left of the run and only then destroys the process groups. The order
matters: DDP's Reducer holds the gloo group, and a Reducer freed *after* the group left the
registry destroys the group itself, joining the gloo threads while holding the GIL, while
a gloo thread still freeing its last collective waits for the GIL (a deadlock seen in 19 of
57 DDP preemptions, when `sys.exit` inside `except Preempted` carried the run into
interpreter teardown). The registry's own reference is released without the GIL.

Exit codes (each rank its own):
    0    finished, or nothing left to train (also when a signal came during the final save)
    1    error: bad input (one line, `train_hf.py: error: ...`), the non-finite guard, a crash
    143 / 138 / 130   stopped by SIGTERM / SIGUSR1 / Ctrl-C (128 + the signal number), after a
         complete checkpoint of the step (or before training started, with nothing to save);
         `output_dir/preempted.json` then says which checkpoint and how to resume.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import shlex
import shutil
import signal
import sys
import traceback

import transformers
from transformers import AutoModelForCausalLM, Trainer, default_data_collator, set_seed

from ..model.env_knobs import code_selecting_settings
from ..report import NotARunError, write_report
from .. import metric_keys as keys
from .callbacks.auto_switch import switch_reason, switch_step_reached
from .callbacks.core import EvalPerplexityCallback, ModelCardCallback, SparsityCallback, add_callbacks
from .callbacks.checkpoints import (
    apply_umask_permissions,
    checkpoint_step,
    is_complete_checkpoint,
    last_complete_checkpoint,
    write_model_card,
)
from .data.data import build_datasets
from .evaluation import build_compute_metrics, preprocess_logits_for_metrics
from .config.launch_checks import check_hub_access
from .callbacks.lm_eval import LmEvalCallback
from .loro import LoroCallback, build_loro_optimizer_and_scheduler
from .callbacks.numerics import NonFiniteError, NumericsGuardCallback
from .callbacks.preemption import (
    EXIT_CODES,
    PreemptionCallback,
    StopBeforeTraining,
    StopSignals,
    clear_preemption_marker,
    write_preemption_marker,
)
from .config.resume_check import final_step_eval, warn_on_resume_changes
from .config.resume_target import check_resume_target, nothing_to_train_message
from .config.run_args import ConfigError, LaunchError
from .config.run_config import parse_run_config
from .config.run_record import RunRecordCallback, resolved_run_config
from .data.tokenizer import load_tokenizer

logger = logging.getLogger("train_hf")

PROG = "train_hf.py"
AUTO_RESUME = "auto"


# ----- resume


def resolve_resume(args) -> str | None:
    """The checkpoint to resume from, checked before anything is built.

    `true`/"last": the last *finished* checkpoint of output_dir (an error if there is none);
    "auto": that checkpoint when there is one, else a new run (what a requeued job wants);
    a folder: it must be a finished checkpoint."""
    resume = args.resume_from_checkpoint
    if resume == AUTO_RESUME:
        finished = finished_run_step(args.output_dir)
        if finished is not None and (args.max_steps <= 0 or finished >= args.max_steps):
            return None  # a finished run: already_finished() says so
        resume = last_complete_checkpoint(args.output_dir)
        if args.process_index == 0 and finished is None:  # (a finished run without checkpoint: an error follows)
            if resume is None:
                logger.info(
                    "resume_from_checkpoint=auto: no finished checkpoint in %s; starting a new run", args.output_dir
                )
            else:
                logger.info("resume_from_checkpoint=auto: resuming from %s", resume)
        return resume
    if resume in (True, "true", "True", "last"):
        resume = last_complete_checkpoint(args.output_dir)
        if resume is None:
            raise ConfigError(f"resume_from_checkpoint: no finished checkpoint in {args.output_dir!r}.")
        logger.info("resuming from %s", resume)
    elif resume and not is_complete_checkpoint(resume):
        what = (
            "does not exist" if not os.path.exists(resume) else "is not a finished checkpoint (no trainer_state.json)"
        )
        latest = last_complete_checkpoint(args.output_dir)
        hint = f"; the last finished one is {latest!r}" if latest else ""
        raise ConfigError(f"resume_from_checkpoint: {resume!r} {what}{hint}; or use true for the last finished one.")
    return resume or None


def finished_run_step(output_dir: str) -> int | None:
    """The step of the finished run in output_dir (its final config.json, written last, and
    trainer_state.json), or None. A run the non-finite guard stopped has no final model."""
    try:
        if not os.path.isfile(os.path.join(output_dir, "config.json")):
            return None
        return checkpoint_step(output_dir)
    except (OSError, ValueError):
        return None


def already_finished(resume: str | None, args) -> bool:
    """Resuming a checkpoint written at max_steps (or later: max_steps was lowered) has
    nothing left to train: the Trainer would run one more step and overwrite the final model.
    With resume_from_checkpoint "auto" a finished run in output_dir counts too: a requeued
    job that already finished must not train again."""
    if args.resume_from_checkpoint == AUTO_RESUME and resume is None:
        step = finished_run_step(args.output_dir)
        if step is not None and args.max_steps > 0 and step < args.max_steps:
            # (with a checkpoint, resolve_resume picked it: resume would not be None)
            raise ConfigError(
                f"resume_from_checkpoint=auto: {args.output_dir!r} holds a run that finished at step {step} and no "
                f"checkpoint to continue it to max_steps={args.max_steps}; train a new run (another output_dir, or "
                f"overwrite_output_dir=true), or keep max_steps={step}."
            )
        if step is not None:
            if args.process_index == 0:
                logger.warning(
                    "nothing to train: %s holds a run that finished at step %d (max_steps=%d); it is left as it is.",
                    os.path.abspath(args.output_dir), step, args.max_steps,
                )  # fmt: skip
            return True
    if resume is None or args.max_steps <= 0:
        return False
    step = checkpoint_step(resume)
    if step < args.max_steps:
        return False
    if args.process_index == 0:
        logger.warning("%s", nothing_to_train_message(resume, step, args.max_steps, args.output_dir))
    return True


# ----- the final model


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
    apply_umask_permissions(staging)  # safetensors writes model.safetensors 0600
    names = sorted(os.listdir(staging), key=lambda name: name == "config.json")
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    shutil.rmtree(staging, ignore_errors=True)


# ----- build, train, finish


@dataclasses.dataclass
class RunStatus:
    """What main() learned that the exit path needs (filled as it goes)."""

    output_dir: str | None = None
    rank0: bool = dataclasses.field(default_factory=lambda: os.environ.get("RANK", "0") == "0")
    trainer: Trainer | None = None  # for free_run(), whichever way main() ends


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


def _load_tokenizer(run):
    data_args, model_config = run.data_args, run.model_config
    tokenizer = load_tokenizer(
        data_args.tokenizer_name, vocab_size=data_args.tokenizer_vocab_size or model_config.vocab_size
    )
    # The base vocabulary must fit the embedding; added special tokens beyond it (t5-base's
    # 100 sentinels over a 32000-row model, as in the original recipe) never occur in text.
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"tokenizer_name: the tokenizer's vocabulary has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {model_config.vocab_size}; raise vocab_size in the model_config or pick another tokenizer."
        )
    # Generation and the saved config should speak the tokenizer's special ids.
    model_config.eos_token_id = tokenizer.eos_token_id
    model_config.bos_token_id = tokenizer.bos_token_id
    model_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _log_model(config, model, world_size: int) -> None:
    weight_2by4 = (
        f"{config.weight_2by4_scope}/{config.weight_sparse_method} from step {config.weight_2by4_start_step}, "
        f"dense tail {config.sparse_dense_finetune_steps}"
        if config.weight_2by4
        else "off"
    )
    logger.info(
        "model: sparse_llama squ_relu=%s activation_2by4=%s weight_2by4=%s loro_scope=%s, %.2fM parameters; world_size=%d",
        config.squ_relu, config.activation_2by4, weight_2by4, config.loro_scope,
        sum(p.numel() for p in model.parameters()) / 1e6, world_size,
    )  # fmt: skip


@dataclasses.dataclass
class Parts:
    """The callbacks main() reads after training."""

    model: object  # the model as built (the Trainer may hold it wrapped)
    guard: NumericsGuardCallback
    preemption: PreemptionCallback
    lm_eval: LmEvalCallback | None


def build_trainer(run, signals: StopSignals | None) -> tuple[Trainer, Parts]:
    """Tokenizer, data, model, callbacks and the Trainer of a parsed run."""
    args, data_args, script_args = run.training_args, run.data_args, run.script_args
    tokenizer = _load_tokenizer(run)
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
    _log_model(run.model_config, model, args.world_size)
    record_environment(model.config)

    parts = Parts(model, NumericsGuardCallback(script_args.nonfinite_policy), PreemptionCallback(signals), None)
    optimizers, extra_callbacks = (None, None), [parts.guard, parts.preemption]
    if script_args.optimizer == "loro_adamw":
        optimizers = build_loro_optimizer_and_scheduler(model, args, script_args)
        extra_callbacks.append(LoroCallback())
    if run.eval_args.lm_eval_tasks:
        parts.lm_eval = LmEvalCallback(
            run.eval_args.lm_eval_tasks, include_path=run.eval_args.lm_eval_include_path,
            limit=run.eval_args.lm_eval_limit, steps=run.eval_args.lm_eval_steps,
            max_length=data_args.max_length, tokenizer=tokenizer,
            should_stop=(lambda: signals.received is not None) if signals is not None else None,
        )  # fmt: skip
        extra_callbacks.append(parts.lm_eval)
    sparsity = SparsityCallback(
        activation_metrics=script_args.wandb_sparsityrelu, weight_metrics=script_args.weight_sparsity_metrics,
        flip_rate=script_args.flip_rate, sequence_length=data_args.max_length,
        nm_metrics=script_args.nm_sparsity_metrics,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        data_collator=default_data_collator, compute_metrics=build_compute_metrics(),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics, optimizers=optimizers,
    )  # fmt: skip
    # The log-row callbacks go ahead of the reporting integrations (report_to), the others
    # after the Trainer's own, in this order (the numerics guard before the preemption stop).
    # RunRecordCallback last: it sees the save decisions of the callbacks before it.
    add_callbacks(trainer, sparsity, EvalPerplexityCallback(), ModelCardCallback(dataset_name=data_args.dataset_name),
                  *extra_callbacks, RunRecordCallback(resolved_run_config(run)))  # fmt: skip
    return trainer, parts


def record_environment(config) -> None:
    """Keep the HF_SPARSE_* switches that change which code computes the forward (set in this
    process) in the model's config, so config.json and the card say how it was trained."""
    settings = code_selecting_settings()
    if settings:
        config.hf_sparse_environment = settings


def finish(trainer: Trainer, run, parts: Parts, train_result) -> dict:
    """Final metrics, the final model, its card and report: the run's last writes."""
    args = run.training_args
    metrics = dict(train_result.metrics)
    switch_step = switch_step_reached(parts.model.config, trainer.state.global_step)
    config = parts.model.config
    if switch_step is not None:  # when 2:4 activations started: the fixed warm-up or the auto switch
        metrics[keys.SWITCH_STEP] = switch_step
        reason = switch_reason(config, trainer.state.log_history)
        if reason is not None:  # the auto switch's: "threshold" or "cap"
            metrics[keys.SWITCH_REASON] = reason
    if config.activation_dense_tail_step is not None:  # from when the FFN ran dense again
        metrics[keys.DENSE_TAIL_STEP] = config.activation_dense_tail_step
    if trainer.eval_dataset is not None:
        # Reuse the Trainer's own evaluation of the last step: a second one would log a
        # duplicate row (and a second TensorBoard events file).
        final_eval = final_step_eval(trainer.state, args)
        metrics.update(final_eval if final_eval is not None else trainer.evaluate())
    if parts.lm_eval is not None:
        metrics.update(parts.lm_eval.evaluate_at_end(trainer))
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)

    # The Trainer turns the KV cache off for training; the saved model is for inference,
    # and its generation_config already says use_cache=true.
    trainer.model.config.use_cache = True
    save_final_model(trainer, args.output_dir)
    # trainer_state.json (full log_history) is written whatever save_strategy is.
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return metrics
    write_model_card(args.output_dir, parts.model.config, trainer.state.log_history, args, run.data_args.dataset_name)
    if args.push_to_hub:
        # Trainer.push_to_hub would write its generic card over ours: upload the folder as is.
        from huggingface_hub import upload_folder

        upload_folder(
            repo_id=trainer.hub_model_id,
            folder_path=args.output_dir,
            token=args.hub_token,
            commit_message="End of training",
            ignore_patterns=["checkpoint-*", "*.tmp", "runs/*"],
        )
    logger.info("model, tokenizer and config saved to %s", os.path.abspath(args.output_dir))
    logger.info("metrics: %s", os.path.abspath(os.path.join(args.output_dir, "all_results.json")))
    logger.info("log history: %s", os.path.abspath(os.path.join(args.output_dir, "trainer_state.json")))
    try:
        report = write_report(args.output_dir)
        logger.info("sparsity plots: %s, %s", report["heatmap"], report["curves"])
    except NotARunError as err:
        logger.info("no sparsity report: %s", err)
    return metrics


def main(argv: list[str], signals: StopSignals | None = None, status: RunStatus | None = None) -> dict:
    """Parse, build, train and finish one run; returns the final metrics ({} when there was
    nothing to train). Raises ConfigError, Preempted, StopBeforeTraining (with `signals`)
    or NonFiniteError; cli() turns them into exit codes."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    status = status or RunStatus()
    import_world_group_binders()  # before parse_run_config: TrainingArguments creates the process group
    run = parse_run_config(argv)
    args = run.training_args
    status.output_dir, status.rank0 = args.output_dir, args.process_index == 0
    if status.rank0:
        # The marker describes the last attempt: this one starts now.
        clear_preemption_marker(args.output_dir)
    resume = resolve_resume(args)
    # Before "nothing to train": a checkpoint that cannot be resumed is an error either way.
    check_resume_target(resume, run.model_config)
    if already_finished(resume, args):
        return {}
    check_hub_access(run.data_args)  # before any tokenizer or dataset is fetched
    transformers.utils.logging.set_verbosity_warning()
    set_seed(args.seed)
    trainer, parts = build_trainer(run, signals)
    status.trainer = trainer
    if resume and trainer.is_world_process_zero():
        # The Trainer resumes silently with a new max_steps, schedule or batch size.
        warn_on_resume_changes(resume, args, run.script_args)
    if signals is not None:
        # From here a signal stops the run after the step under way, with a checkpoint.
        signals.raise_now = False
    train_result = trainer.train(resume_from_checkpoint=resume)
    if parts.preemption.stopped_at is not None:
        # A checkpoint of the last step is written; nothing else is, so the run does not
        # look finished (no final model, no trainer_state.json in output_dir).
        raise Preempted(parts.preemption, args, argv)
    if parts.guard.failure:
        trainer.save_state()  # keep the log history for the post-mortem; no model is saved
        raise NonFiniteError(parts.guard.failure)
    return finish(trainer, run, parts, train_result)


# ----- the ways out


def resume_command(argv: list[str], resume: str | None = "true") -> str:
    """The command line that continues this run (`resume`=None: the same command)."""
    if resume is not None:
        argv = _without_resume_flag(list(argv)) + ["--resume_from_checkpoint", resume]
    invoked = os.path.basename(sys.argv[0])
    if invoked == "hf-sparse-train":
        prog = [invoked]
    else:  # the script as it was run, or train_hf.py when main() was called from Python
        prog = ["python", sys.argv[0] if invoked == PROG else PROG]
    command = " ".join(shlex.quote(a) for a in [*prog, *argv])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        command += " (with the same launcher: torchrun / accelerate launch ...)"
    return command


class Preempted(Exception):
    """SIGTERM, SIGUSR1 or Ctrl-C stopped the run after a checkpoint; carries the exit code,
    the checkpoint and the one line that says how to resume."""

    def __init__(self, preemption: PreemptionCallback, args, argv: list[str]):
        self.signum = preemption.signal_received
        self.step = preemption.stopped_at
        self.checkpoint = os.path.join(args.output_dir, f"checkpoint-{self.step}")
        self.command = resume_command(argv)
        name = signal.Signals(self.signum).name
        super().__init__(
            f"stopped by {name} after step {self.step}; {self.checkpoint} is complete. Resume with: {self.command}"
        )
        self.exit_code = EXIT_CODES[self.signum]


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


@dataclasses.dataclass
class Outcome:
    """How the process ends: its exit code and the line it prints (None: nothing)."""

    code: int
    message: str | None = None
    every_rank: bool = False  # else rank 0 alone says it


def _barrier() -> None:
    """All ranks reach the exit after the same step (success or preemption): rank 0 may
    still be writing the final model or the marker when the others get there."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def free_run(status: RunStatus) -> None:
    """Release the engine the Trainer's accelerator prepared. DeepSpeed's engine is kept
    alive by the gradient hooks it registers on the parameters (a cycle through autograd's
    C++ nodes, which no garbage collection sees), and with it its process groups: the
    engine's destroy(), which accelerate's free_memory() calls, removes them (ZeRO-1/2;
    ZeRO-3's partitioning state outlives it, see README "Distributed engines")."""
    trainer, status.trainer = status.trainer, None
    if trainer is None:
        return
    try:
        trainer.accelerator.free_memory()
    except Exception as err:  # the exit path must go on: say it, keep the exit code
        logger.warning("could not release the trained engine before exit: %s", err)


def run_to_outcome(argv: list[str], signals: StopSignals) -> Outcome:
    """main() and its exceptions as an Outcome. The exception objects (and with them the
    frames that hold the run) are gone when this returns, and the run's engine released."""
    status = RunStatus()
    try:
        return _outcome_of_main(argv, signals, status)
    finally:
        free_run(status)


def _outcome_of_main(argv: list[str], signals: StopSignals, status: RunStatus) -> Outcome:
    try:
        try:
            main(argv, signals, status)
        finally:
            signals.raise_now = False
        _barrier()
        if signals.received is not None:
            logger.warning(
                "%s arrived during the final save; the run finished it first.", signal.Signals(signals.received).name
            )
        return Outcome(0)
    except Preempted as stop:
        if status.rank0:
            signals.farewell = f"{PROG}: {stop}\n".encode()  # what a second Ctrl-C from here on prints
            write_preemption_marker(status.output_dir, stop.signum, stop.step, stop.checkpoint, stop.command)
        _barrier()
        return Outcome(stop.exit_code, f"{PROG}: {stop}")
    except StopBeforeTraining as stop:
        command = resume_command(argv, resume=None)
        if status.rank0 and status.output_dir:
            write_preemption_marker(status.output_dir, stop.signum, None, None, command)
        name = signal.Signals(stop.signum).name
        return Outcome(EXIT_CODES[stop.signum],
                       f"{PROG}: stopped by {name} before training started; no checkpoint was written. "
                       f"Start again with: {command}")  # fmt: skip
    except LaunchError as err:
        # The same verdict in every rank: rank 0 says it once.
        return Outcome(1, f"{PROG}: error: {err}")
    except (ConfigError, NonFiniteError) as err:
        return Outcome(1, f"{PROG}: error: {err}", every_rank=True)
    except KeyboardInterrupt:
        # A Ctrl-C before the handlers were in place.
        return Outcome(130, f"{PROG}: interrupted (Ctrl-C); resume from the last finished checkpoint with "
                            "--resume_from_checkpoint true", every_rank=True)  # fmt: skip
    except Exception:  # a callback, lm-eval, a library: the traceback, then the same clean exit
        return Outcome(1, traceback.format_exc().rstrip(), every_rank=True)


def release_process_groups() -> None:
    """Collect what is left of the run, then destroy the process groups (see the module
    docstring for why in this order)."""
    gc.collect()  # the Trainer and its callbacks form reference cycles; they hold the DDP Reducer
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        # DeepSpeed keeps references of its own to the groups it made (deepspeed.utils.groups);
        # its destroy_process_group destroys them all through torch and drops those too.
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
