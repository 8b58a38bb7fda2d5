"""Preemption-safe training: SIGTERM (what SLURM and Kubernetes send before they kill a job)
and the first Ctrl-C finish the optimizer step under way, write a complete checkpoint and
stop; a second Ctrl-C stops the process at once (exit 130, one line, no checkpoint).

Every rank must stop after the same step, or the checkpoint's collectives would hang: a
signal reaches the ranks at different moments (or only one of them), so at each step end
the ranks agree with one all-reduce of a one-element flag over a CPU (gloo) group, which
keeps the GPU stream free of syncs. Single-process runs read the flag directly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal number, as shells report
_SECOND_CTRL_C = (
    b"second Ctrl-C: stopped at once, without a checkpoint of this step; resume from the last finished "
    b"checkpoint with --resume_from_checkpoint true\n"
)


class PreemptionCallback(TrainerCallback):
    """Turns SIGTERM / the first SIGINT into "save a checkpoint after this step and stop".

    After ``trainer.train()`` returns, ``signal_received`` names the signal (None when the
    run was not interrupted) and ``stopped_at`` the step whose checkpoint was written.
    """

    def __init__(self):
        self.signal_received: int | None = None
        self.stopped_at: int | None = None
        self._previous = {}
        self._group = None
        self._train_ended = False

    # ----- signal handling (main thread only; elsewhere the run just cannot be preempted)

    def _handle(self, signum, _frame):
        if self.signal_received is not None and signum == signal.SIGINT:
            # A second Ctrl-C: the user wants out now, checkpoint or not. Exit right here: a
            # KeyboardInterrupt raised into whatever runs (a C++ backward, a library's own
            # handler) can surface as stray tracebacks before it reaches the script.
            if not self._train_ended:  # after it, the checkpoint is written and said: end quietly
                os.write(2, _SECOND_CTRL_C)
            os._exit(EXIT_CODES[signal.SIGINT])
        if self.signal_received is None:
            self.signal_received = signum
            logger.warning(
                "%s received: finishing this optimizer step, then writing a checkpoint and stopping%s",
                signal.Signals(signum).name, " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
            )  # fmt: skip

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    # ----- agreement across ranks

    def _any_rank_signalled(self) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signal_received is not None
        if self._group is None:
            # A CPU group of its own: the flag never touches the GPU stream (no device sync).
            self._group = dist.new_group(backend="gloo")
        flag = torch.tensor([0 if self.signal_received is None else int(self.signal_received)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.signal_received is None:
            self.signal_received = int(flag.item())  # another rank was signalled: stop with it
        return bool(flag.item())

    # ----- Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        self.signal_received = None
        self.stopped_at = None
        self._train_ended = False
        self._install()

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_signalled():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self._train_ended = True
        if self.signal_received is None:
            self._restore()
        # After a signal the handlers stay: the process is on its way out (train_hf.py exits
        # 143/130), and a Ctrl-C pressed meanwhile must end it quietly, not as a
        # KeyboardInterrupt raised into the interpreter's shutdown. This callback is for
        # scripts; train_hf.py adds it, SparsityCallback does not.

    @property
    def exit_code(self) -> int | None:
        return EXIT_CODES.get(self.signal_received) if self.signal_received is not None else None
