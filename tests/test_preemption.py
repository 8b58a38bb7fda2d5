"""PreemptionCallback on its own: what a signal does to the Trainer's control flags (the
end-to-end runs, one and two processes, are in test_resume.py and test_distributed.py)."""

import signal

import pytest
from transformers import TrainerControl, TrainerState

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
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the previous handler is back


def test_ctrl_c_once_stops_gently_twice_at_once():
    callback = PreemptionCallback()
    callback.on_train_begin(None, TrainerState(), TrainerControl())
    try:
        signal.raise_signal(signal.SIGINT)
        assert callback.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        callback.on_train_end(None, TrainerState(), TrainerControl())
