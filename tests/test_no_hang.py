"""The suite cannot hang: a per-test limit for everything, and launched processes (with
whatever they start) bounded by tests/processes.py, so a hung child fails its test with the
children's output and stacks."""

import os
import sys
import textwrap
import time

import pytest
from _pytest.outcomes import Failed

from tests import processes


def test_every_test_has_a_time_limit(pytestconfig):
    assert pytestconfig.pluginmanager.hasplugin("timeout")  # pytest-timeout, from requirements.txt
    assert float(pytestconfig.getini("timeout")) == 300
    assert float(pytestconfig.getini("faulthandler_timeout")) < 300  # stacks before the limit


def test_a_test_over_the_limit_fails_with_its_stack(tmp_path):
    """The project's pytest.ini with a 3 s limit, on a test that sleeps for a minute."""
    (tmp_path / "test_sleeps.py").write_text(
        textwrap.dedent("""
        import time

        def test_sleeps_too_long():
            time.sleep(60)

        def test_after_it_runs():
            pass
    """)
    )
    ini = os.path.join(processes.REPO_ROOT, "pytest.ini")
    started = time.monotonic()
    proc = processes.run([sys.executable, "-m", "pytest", "-c", ini, "--rootdir", str(tmp_path), "-o", "timeout=3",
                          "-o", "faulthandler_timeout=0", "-p", "no:cacheprovider", str(tmp_path / "test_sleeps.py")],
                         cwd=tmp_path, timeout=120)  # fmt: skip
    assert time.monotonic() - started < 60
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Timeout (>3.0s) from pytest-timeout" in proc.stdout and "time.sleep(60)" in proc.stdout, proc.stdout[-3000:]
    assert "1 failed, 1 passed" in proc.stdout  # the suite went on


def test_a_hung_process_tree_fails_the_test_with_the_stacks(tmp_path):
    """A child that starts a grandchild in a session of its own (as torchrun starts its
    workers) which holds the output pipe and never ends: the test fails at the deadline,
    both are killed, and the failure shows their Python stacks."""
    script = textwrap.dedent("""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time\\ndef stuck_forever():\\n    time.sleep(600)\\nstuck_forever()"],
                         start_new_session=True)
        print("started", flush=True)
        time.sleep(600)
    """)
    started = time.monotonic()
    with pytest.raises(Failed) as failed:
        processes.run([sys.executable, "-c", script], timeout=3)
    assert time.monotonic() - started < 30
    message = str(failed.value)
    assert "still running after 3 s" in message and "started" in message
    assert "stuck_forever" in message  # the grandchild's stack, from faulthandler
    tree = [int(pid) for pid in message.split("processes below it: [", 1)[1].split("]", 1)[0].split(",") if pid.strip()]
    assert tree and not [pid for pid in tree if processes.is_running(pid)]
