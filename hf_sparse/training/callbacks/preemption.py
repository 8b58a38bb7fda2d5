"""Preemption-safe training: SIGTERM (what SLURM and Kubernetes send before they kill a job),
SIGUSR1 (what SLURM's `--signal=USR1@SECONDS` sends ahead of the time limit) and the first
Ctrl-C finish the optimizer step under way, write a complete checkpoint and stop; a second
Ctrl-C stops the process at once (exit 130, one line, no checkpoint).

Every rank must stop after the same step, or the checkpoint's collectives would hang: a
signal reaches the ranks at different moments (or only one of them), so at each step end
the ranks agree with one all-reduce of a one-element flag over a CPU (gloo) group, which
keeps the GPU stream free of syncs. Single-process runs read the flag directly.

`StopSignals` owns the handlers. train_hf.py installs one for the whole run (before the
tokenizer and the data are built, when a signal stops the run at once: nothing to save
yet) and hands it to `PreemptionCallback`; in your own script the callback installs its
own for the duration of `trainer.train()`. After a stop, `output_dir/preempted.json` (the
*marker*) tells a requeue script what happened: see `write_preemption_marker`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# 128 + the signal number, as shells report a process a signal ended: 143, 138, 130.
EXIT_CODES = {signum: 128 + int(signum) for signum in STOP_SIGNALS}
MARKER_NAME = "preempted.json"
_SECOND_CTRL_C = (
    b"second Ctrl-C: stopped at once, without a checkpoint of this step; resume from the last finished "
    b"checkpoint with --resume_from_checkpoint true\n"
)


class StopBeforeTraining(BaseException):
    """A stop signal arrived before training started: there is nothing to checkpoint yet.
    A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Handlers for SIGTERM, SIGUSR1 and SIGINT, and the first of them that arrived.

    The first signal is recorded (`received`); while `raise_now` is set it also raises
    `StopBeforeTraining` where the program is (train_hf.py sets it while building, before
    the Trainer takes over). A second Ctrl-C ends the process at once, exit 130. Further
    SIGTERM/SIGUSR1 are ignored: the stop is under way.
    """

    def __init__(self):
        self.received: int | None = None
        self.raise_now = False
        # What a second Ctrl-C prints before it ends the process: once the checkpoint is
        # written, the line that reports it (train_hf.py sets it) or nothing.
        self.farewell: bytes = _SECOND_CTRL_C
        self._previous: dict = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal's own rule
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int | None:
        return EXIT_CODES.get(self.received) if self.received is not None else None

    def _handle(self, signum, _frame):
        if self.received is not None:
            if signum == signal.SIGINT:
                # A second Ctrl-C: the user wants out now, checkpoint or not. Exit right here: a
                # KeyboardInterrupt raised into whatever runs (a C++ backward, a library's own
                # handler) can surface as stray tracebacks before it reaches the script.
                if self.farewell:
                    os.write(2, self.farewell)
                os._exit(EXIT_CODES[signal.SIGINT])
            return
        self.received = signum
        if self.raise_now:
            raise StopBeforeTraining(signum)
        logger.warning(
            "%s received: finishing this optimizer step, then writing a checkpoint and stopping%s",
            signal.Signals(signum).name, " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
        )  # fmt: skip


class PreemptionCallback(TrainerCallback):
    """Turns SIGTERM, SIGUSR1 and the first SIGINT into "save a checkpoint after this step
    and stop", on every rank after the same step.

    `signals`: the `StopSignals` of the whole program (train_hf.py passes its own); without
    it the callback installs handlers at train begin and, unless a signal arrived, restores
    the previous ones at train end. After ``trainer.train()`` returns, ``signal_received``
    names the signal (None when the run was not interrupted), ``stopped_at`` the step whose
    checkpoint was written and ``exit_code`` the code to exit with.
    """

    def __init__(self, signals: StopSignals | None = None):
        self._owns_signals = signals is None
        self.signals = signals if signals is not None else StopSignals()
        self.stopped_at: int | None = None
        self._group = None

    @property
    def signal_received(self) -> int | None:
        return self.signals.received

    @property
    def exit_code(self) -> int | None:
        return self.signals.exit_code

    # ----- agreement across ranks

    def _any_rank_signalled(self) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signals.received is not None
        if self._group is None:
            # A CPU group of its own: the flag never touches the GPU stream (no device sync).
            self._group = dist.new_group(backend="gloo")
        received = self.signals.received
        flag = torch.tensor([0 if received is None else int(received)], dtype=torch.int64)
        # MAX: one signalled rank is enough to stop them all (MIN would stop none of them).
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        agreed = int(flag.item())  # one host read per optimizer step, of a CPU tensor
        if agreed and self.signals.received is None:
            self.signals.received = agreed  # another rank was signalled: stop with it
        return bool(agreed)

    # ----- Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        self.stopped_at = None
        if self._owns_signals:
            self.signals.received = None
            self.signals.farewell = _SECOND_CTRL_C
            self.signals.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_signalled():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        # The gloo group goes with the run: nothing may hold a process group into interpreter
        # teardown (see hf_sparse/training/run.py).
        self._group = None
        if self.signals.received is not None:
            # The process is on its way out (train_hf.py exits 143/138/130), and a Ctrl-C
            # pressed meanwhile must end it quietly, not as a KeyboardInterrupt raised into
            # the interpreter's shutdown: after a signal the handlers stay. The checkpoint is
            # complete, so "stopped without a checkpoint" would be wrong now.
            self.signals.farewell = b""
        elif self._owns_signals:
            self.signals.restore()


# ----- the marker a requeue script reads


def marker_path(output_dir: str) -> str:
    return os.path.join(output_dir, MARKER_NAME)


def write_preemption_marker(output_dir: str, signum: int, step: int | None, checkpoint: str | None,
                            resume_command: str) -> str:  # fmt: skip
    """`output_dir/preempted.json`: the run was stopped by a signal, and how to go on.

    {"signal": "SIGTERM", "exit_code": 143, "step": 7, "checkpoint": "/abs/run/checkpoint-7",
     "resume_command": "...", "time": "2026-12-06T15:00:00Z"} (step and checkpoint null when it
    stopped before training started). Written atomically after the checkpoint is complete;
    removed when a later attempt starts, so it always describes the last attempt."""
    os.makedirs(output_dir, exist_ok=True)
    record = {
        "signal": signal.Signals(signum).name,
        "exit_code": EXIT_CODES.get(signum, 128 + int(signum)),
        "step": step,
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
        "resume_command": resume_command,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = marker_path(output_dir)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    os.replace(path + ".tmp", path)
    return path


def read_preemption_marker(output_dir: str) -> dict | None:
    try:
        with open(marker_path(output_dir), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def clear_preemption_marker(output_dir: str) -> None:
    try:
        os.remove(marker_path(output_dir))
    except FileNotFoundError:
        pass


__all__ = [
    "EXIT_CODES", "MARKER_NAME", "PreemptionCallback", "StopBeforeTraining", "StopSignals",
    "clear_preemption_marker", "read_preemption_marker", "write_preemption_marker",
]  # fmt: skip
