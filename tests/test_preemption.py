"""PreemptionCallback and StopSignals on their own: what a signal does to the Trainer's
control flags, before and during training (the end-to-end runs, one and two processes, are
in test_resume.py, test_signals.py and test_distributed.py)."""

import json
import signal

import pytest
from transformers import TrainerControl, TrainerState

from hf_sparse.training.callbacks import preemption
from hf_sparse.training.callbacks.preemption import (
    PreemptionCallback,
    StopBeforeTraining,
    StopSignals,
    clear_preemption_marker,
    read_preemption_marker,
    write_preemption_marker,
)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (signal.SIGINT, 130)])
def test_a_signal_means_save_after_this_step_and_stop(signum, code):
    callback = PreemptionCallback()
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control)
    try:
        state.global_step = 3
        callback.on_step_end(None, state, control)
        assert not control.should_save and not control.should_training_stop and callback.exit_code is None
        signal.raise_signal(signum)  # handled: recorded, nothing else happens yet
        state.global_step = 4
        callback.on_step_end(None, state, control)
        assert control.should_save and control.should_training_stop
        assert (callback.stopped_at, callback.exit_code, callback.signal_received) == (4, code, signum)
    finally:
        callback.on_train_end(None, state, control)
        callback.signals.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_handlers_are_restored_after_a_run_that_was_not_signalled():
    callback = PreemptionCallback()
    callback.on_train_begin(None, TrainerState(), TrainerControl())
    assert signal.getsignal(signal.SIGTERM) == callback.signals._handle
    assert signal.getsignal(signal.SIGUSR1) == callback.signals._handle
    callback.on_train_end(None, TrainerState(), TrainerControl())
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_ctrl_c_once_stops_gently_twice_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(preemption.os, "_exit", exits.append)  # the second Ctrl-C ends the process
    callback = PreemptionCallback()
    callback.on_train_begin(None, TrainerState(), TrainerControl())
    try:
        signal.raise_signal(signal.SIGINT)
        assert callback.exit_code == 130 and exits == []
        signal.raise_signal(signal.SIGTERM)  # the stop is under way: nothing more
        assert callback.exit_code == 130 and exits == []
        signal.raise_signal(signal.SIGINT)
        assert exits == [130]
    finally:
        callback.on_train_end(None, TrainerState(), TrainerControl())
        callback.signals.restore()


def test_before_training_a_signal_stops_where_the_program_is():
    """train_hf.py's setup phase: nothing to checkpoint, so the signal raises at once, as a
    BaseException that no library's `except Exception` can swallow."""
    signals = StopSignals().install()
    signals.raise_now = True
    try:
        with pytest.raises(StopBeforeTraining) as raised:
            try:
                signal.raise_signal(signal.SIGTERM)
            except Exception:  # what a library might do around our code
                pytest.fail("swallowed")
        assert raised.value.signum == signal.SIGTERM and signals.exit_code == 143
    finally:
        signals.restore()


def test_a_shared_signal_record_carries_into_the_callback():
    """A signal during setup's last moments (after raise_now was cleared) stops the run at
    the first step end; the callback of a shared record installs and restores nothing."""
    signals = StopSignals().install()
    try:
        callback = PreemptionCallback(signals)
        signal.raise_signal(signal.SIGUSR1)
        state, control = TrainerState(), TrainerControl()
        callback.on_train_begin(None, state, control)
        state.global_step = 1
        callback.on_step_end(None, state, control)
        assert control.should_save and callback.stopped_at == 1 and callback.exit_code == 138
        callback.on_train_end(None, state, control)
        assert signal.getsignal(signal.SIGTERM) == signals._handle and signals.farewell == b""
    finally:
        signals.restore()


def test_the_marker_is_written_atomically_read_and_cleared(tmp_path):
    out = tmp_path / "run"
    path = write_preemption_marker(str(out), signal.SIGTERM, 7, str(out / "checkpoint-7"), "python train_hf.py r.json")
    record = json.loads(open(path).read())
    assert record["signal"] == "SIGTERM" and record["exit_code"] == 143 and record["step"] == 7
    assert record["checkpoint"] == str(out / "checkpoint-7") and record["resume_command"].startswith("python")
    assert read_preemption_marker(str(out)) == record
    assert sorted(p.name for p in out.iterdir()) == ["preempted.json"]  # no .tmp left
    clear_preemption_marker(str(out))
    clear_preemption_marker(str(out))  # twice: nothing to remove is fine
    assert read_preemption_marker(str(out)) is None
