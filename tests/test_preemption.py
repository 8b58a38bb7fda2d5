"""PreemptionCallback on its own: what a signal does to the Trainer's control flags (the
end-to-end runs, one and two processes, are in test_resume.py and test_distributed.py)."""

import signal

from transformers import TrainerControl, TrainerState

from hf_sparse.training import preemption
from hf_sparse.training.preemption import PreemptionCallback


def test_a_signal_means_save_after_this_step_and_stop():
    callback = PreemptionCallback()
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control)
    try:
        state.global_step = 3
        callback.on_step_end(None, state, control)
        assert not control.should_save and not control.should_training_stop and callback.exit_code is None
        signal.raise_signal(signal.SIGTERM)  # handled: recorded, nothing else happens yet
        state.global_step = 4
        callback.on_step_end(None, state, control)
        assert control.should_save and control.should_training_stop
        assert (callback.stopped_at, callback.exit_code) == (4, 143)
    finally:
        callback.on_train_end(None, state, control)
        callback._restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_handlers_are_restored_after_a_run_that_was_not_signalled():
    callback = PreemptionCallback()
    callback.on_train_begin(None, TrainerState(), TrainerControl())
    assert signal.getsignal(signal.SIGTERM) == callback._handle
    callback.on_train_end(None, TrainerState(), TrainerControl())
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_ctrl_c_once_stops_gently_twice_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(preemption.os, "_exit", exits.append)  # the second Ctrl-C ends the process
    callback = PreemptionCallback()
    callback.on_train_begin(None, TrainerState(), TrainerControl())
    try:
        signal.raise_signal(signal.SIGINT)
        assert callback.exit_code == 130 and exits == []
        signal.raise_signal(signal.SIGINT)
        assert exits == [130]
    finally:
        callback.on_train_end(None, TrainerState(), TrainerControl())
        callback._restore()
