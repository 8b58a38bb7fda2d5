"""Where the Trainer runs the project's callbacks: ahead of the reporting integrations however
a script attaches them, placed by train_hf without looking anything up, a loud error when an
integration gets ahead during training, and the evaluation decision taken as
DefaultFlowCallback takes it."""

import glob
import itertools
import os

import pytest
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import DefaultFlowCallback

import hf_sparse
import hf_sparse.training.callbacks.core as callbacks_module
from hf_sparse import SparseLlamaForCausalLM, SparsityCallback
from hf_sparse.training.callbacks.core import _REPORTING_CALLBACK_TYPES, _FirstCallback, evaluation_due
from hf_sparse.training.callbacks.numerics import NumericsGuardCallback
from tests.conftest import tiny_config, tiny_training_args
from tests.test_telemetry import RandomTokens, _expected_keys


# --- the evaluation decision ---------------------------------------------------------------


def test_evaluation_due_decides_as_default_flow_callback():
    """Compared with DefaultFlowCallback itself over a grid of arguments and states: a
    transformers release that changes its rule fails here."""
    flow, compared, due = DefaultFlowCallback(), 0, 0
    for strategy, delay in itertools.product(("no", "steps", "epoch"), (0, 2, 3.5)):
        args = TrainingArguments(output_dir="unused", eval_strategy=strategy, eval_steps=2, eval_delay=delay,
                                 report_to=[], save_strategy="no")  # fmt: skip
        grid = itertools.product((1, 2, 3), range(8), (5, 6), (0.5, 1.0, 2.0, 4.0))
        for eval_steps, step, max_steps, epoch in grid:
            state = TrainerState(global_step=step, max_steps=max_steps, eval_steps=eval_steps, logging_steps=1,
                                 save_steps=0, epoch=epoch)  # fmt: skip
            for event in ("on_step_end", "on_epoch_end"):
                expected = getattr(flow, event)(args, state, TrainerControl()).should_evaluate
                assert evaluation_due(event, args, state) == expected, (strategy, delay, eval_steps, step, max_steps,
                                                                        epoch, event)  # fmt: skip
                compared, due = compared + 1, due + expected
    assert compared == 9 * 3 * 8 * 2 * 4 * 2 and 0 < due < compared  # both answers met


# --- a user script, every way of attaching --------------------------------------------------


class UserCallback(TrainerCallback):
    """A callback of the user's own, in the list beside ours."""


def _attach(how, build):
    """A Trainer whose callbacks were attached the way `how` names, as a script would."""
    guard = NumericsGuardCallback("skip")  # its numerics/skipped_steps goes through a companion
    if how == "constructor, ours first":
        return build([SparsityCallback(), guard, UserCallback()])
    if how == "constructor, ours last":
        return build([UserCallback(), guard, SparsityCallback()])
    if how == "add_callback after construction":
        trainer = build([UserCallback()])
        trainer.add_callback(SparsityCallback())
        trainer.add_callback(guard)
        return trainer
    if how == "add_callback with the class":
        trainer = build(None)
        trainer.add_callback(guard)
        trainer.add_callback(SparsityCallback)
        return trainer
    if how == "inserted at index 0":
        trainer = build([guard])
        trainer.callback_handler.callbacks.insert(0, SparsityCallback())
        return trainer
    if how == "hf_sparse.add_callbacks":
        trainer = build([UserCallback()])
        hf_sparse.add_callbacks(trainer, guard, SparsityCallback())
        return trainer
    if how == "integration added after ours":
        trainer = build([SparsityCallback(), guard], report_to=["wandb"])
        trainer.add_callback(TensorBoardCallback())
        return trainer
    raise AssertionError(how)


ORDERS = ("constructor, ours first", "constructor, ours last", "add_callback after construction",
          "add_callback with the class", "inserted at index 0", "hf_sparse.add_callbacks",
          "integration added after ours")  # fmt: skip


def test_metrics_land_in_the_loss_row_however_the_script_attaches_the_callbacks(tmp_path, monkeypatch):
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.wandb_offline import wait_for_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "hf_sparse_tests")
    if wandb.run is not None:
        wandb.finish()
    config = tiny_config(squ_relu="relu2")
    keys = _expected_keys(config) + ["numerics/skipped_steps"]
    looked_up = []
    holding = callbacks_module._handlers_holding
    monkeypatch.setattr(callbacks_module, "_handlers_holding", lambda cb: looked_up.append(cb) or holding(cb))

    for how in ORDERS:
        out = tmp_path / how.replace(" ", "_").replace(",", "")

        def build(callbacks, report_to=("wandb", "tensorboard"), out=out):
            args = tiny_training_args(out, max_steps=3, per_device_train_batch_size=2, logging_steps=3,
                                      logging_first_step=True, report_to=list(report_to))  # fmt: skip
            return Trainer(model=SparseLlamaForCausalLM(config), args=args, train_dataset=RandomTokens(16),
                           callbacks=callbacks)  # fmt: skip

        looked_up.clear()
        trainer = _attach(how, build)
        trainer.train()
        order = trainer.callback_handler.callbacks
        first_reporter = next(i for i, cb in enumerate(order) if isinstance(cb, _REPORTING_CALLBACK_TYPES))
        ours = [i for i, cb in enumerate(order) if isinstance(cb, _FirstCallback)]
        assert len(ours) == 2 and max(ours) < first_reporter, (how, [type(cb).__name__ for cb in order])
        # Found once per Trainer at most, and not at all when hf_sparse placed them.
        assert len(looked_up) <= 1 and (how != "hf_sparse.add_callbacks" or not looked_up), (how, looked_up)

        rows = [row for row in trainer.state.log_history if "loss" in row]
        assert [row["step"] for row in rows] == [1, 3], how
        for row in rows:
            assert not [k for k in keys if k not in row], how
        events = glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True)
        assert len(events) == 1, (how, events)
        board = EventAccumulator(os.path.dirname(events[0]))
        board.Reload()
        for key in ["loss"] + keys:
            assert [e.step for e in board.Scalars(f"train/{key}")] == [1, 3], (how, key)

    # One wandb run took every Trainer's rows, in order: two loss rows each.
    run_dir = os.path.dirname(wandb.run.dir)
    wandb.finish()
    rows = wait_for_rows(run_dir, lambda r: "train/loss" in r, expected=2 * len(ORDERS))
    assert [r["train/global_step"] for r in rows] == [1, 3] * len(ORDERS)
    for how, row in zip(sorted(ORDERS * 2, key=ORDERS.index), rows):
        assert not [k for k in keys if f"train/{k}" not in row], how


# --- what cannot be repaired ----------------------------------------------------------------


class MoveTensorBoardFirst(TrainerCallback):
    """A script that puts TensorBoard at the front after training began."""

    def __init__(self):
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        handler = self.trainer.callback_handler
        board = next(cb for cb in handler.callbacks if isinstance(cb, TensorBoardCallback))
        handler.callbacks = [board] + [cb for cb in handler.callbacks if cb is not board]


def test_an_integration_moved_ahead_during_training_fails_loudly(tmp_path):
    mover = MoveTensorBoardFirst()
    trainer = Trainer(model=SparseLlamaForCausalLM(tiny_config()), train_dataset=RandomTokens(16),
                      args=tiny_training_args(tmp_path, max_steps=2, report_to=["tensorboard"]),
                      callbacks=[SparsityCallback(), mover])  # fmt: skip
    mover.trainer = trainer
    with pytest.raises(RuntimeError) as error:
        trainer.train()
    message = str(error.value)
    assert "SparsityCallback runs after the reporting integration TensorBoardCallback" in message
    assert "before the reporting integrations" in message and "hf_sparse.add_callbacks(trainer" in message
    assert trainer.state.global_step == 1  # at the first logging step


# --- train_hf ---------------------------------------------------------------------------------


def test_train_hf_places_its_callbacks_without_looking_them_up(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hf_sparse.training.run import build_trainer
    from hf_sparse.training.config.run_config import parse_run_config
    from tests.test_train_hf import _write_config

    def no_look_up(callback):
        raise AssertionError(f"{type(callback).__name__} looked for its handler")

    monkeypatch.setattr(callbacks_module, "_handlers_holding", no_look_up)
    run = parse_run_config([_write_config(tmp_path, report_to=["tensorboard"], optimizer="loro_adamw", loro_scope="all",
                                          loro_attn_rank=8, loro_mlp_rank=8, eval_strategy="no", save_strategy="no")])  # fmt: skip
    trainer, _ = build_trainer(run, None)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names[:4] == ["SparsityCallback", "EvalPerplexityCallback", "LoroCallback", "DefaultFlowCallback"], names
    assert names.index("NumericsGuardCallback") < names.index("PreemptionCallback")
    trainer.train()
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("_SkippedStepsLog") < names.index("TensorBoardCallback"), names
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [2, 4]
    events = glob.glob(str(tmp_path / "run" / "**" / "events.out.tfevents.*"), recursive=True)
    board = EventAccumulator(os.path.dirname(events[0]))
    board.Reload()
    for key in ("loss", "sparsity_relu/layer_1", "loro/exact_steps"):
        assert [e.step for e in board.Scalars(f"train/{key}")] == [2, 4], key
