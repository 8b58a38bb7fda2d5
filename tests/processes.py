"""Processes launched by tests, always with a deadline: a hung child becomes a failed test
that shows the children's output and Python stacks, never a stalled suite.

`subprocess.run(..., timeout=...)` is not enough for launchers: on expiry it kills only the
direct child and then waits for the pipes to close, which torchrun's workers (started in
sessions of their own) keep open forever. Here the output is read by threads, and on
expiry every descendant gets SIGABRT first (the children run with PYTHONFAULTHANDLER=1, so
each dumps every thread's Python stack into the captured output), then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL = 12000  # characters of output a failure shows


# torchrun with two local processes; append the script and its arguments.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first (from /proc: no psutil needed)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as handle:
                children = [int(p) for p in handle.read().split()]
        except OSError:
            continue
        found += children
        todo += children
    return found


def environment_of(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            items = handle.read().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; its parent just has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Launched:
    """A process (and whatever it starts) whose output is collected as it comes.

    Use as a context manager: leaving it kills whatever is still running below it."""

    def __init__(self, cmd, *, cwd=REPO_ROOT, env=None, merge_output=True, stdin=None, **popen_kwargs):
        env = dict(os.environ if env is None else env)
        env.setdefault("PYTHONFAULTHANDLER", "1")  # stacks on SIGABRT, for the expiry report
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.cmd = [str(part) for part in cmd]
        self.proc = subprocess.Popen(
            self.cmd, cwd=cwd, env=env, text=True, start_new_session=True, stdin=stdin,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_output else subprocess.PIPE, **popen_kwargs,
        )  # fmt: skip
        self._out, self._err = [], []
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self._out), daemon=True)]
        if not merge_output:
            self._readers.append(threading.Thread(target=self._read, args=(self.proc.stderr, self._err), daemon=True))
        for reader in self._readers:
            reader.start()
        self._known: set[int] = set()

    @staticmethod
    def _read(stream, sink):
        for line in stream:
            sink.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def tree(self) -> list[int]:
        """This process's descendants now, and every one seen before that still runs (a
        worker whose launcher died is no longer below it)."""
        self._known |= set(descendants(self.pid))
        return [pid for pid in self._known if is_running(pid)]

    def ranks(self, world_size: int = 2, timeout: float = 120) -> dict[str, int]:
        """{RANK: pid} of the launched workers (the outermost process carrying each RANK)."""
        deadline = time.monotonic() + timeout
        while True:
            found = {}
            for pid in descendants(self.pid):  # parents before their children
                rank = environment_of(pid).get("RANK")
                if rank is not None and rank not in found:
                    found[rank] = pid
            self._known |= set(found.values())
            if len(found) >= world_size:
                return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.fail(f"found ranks {sorted(found)} of {world_size}")
            time.sleep(0.05)

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        """Until `predicate(output so far)` holds; fails (killing the tree) on expiry or if
        the process ends first."""
        deadline = time.monotonic() + timeout
        while not predicate(self.output):
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the last lines may still be in the pipe
                if predicate(self.output):
                    return
                self.fail(f"ended (exit {self.proc.returncode}) before {what}")
            if time.monotonic() > deadline:
                self.fail(f"no {what} within {timeout:.0f} s")
            time.sleep(0.02)

    def wait(self, timeout: float) -> int:
        """The exit code; on expiry the whole tree is killed and the test fails with its output."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"still running after {timeout:.0f} s")
        for reader in self._readers:
            reader.join(timeout=30)  # a worker that outlived the launcher may hold the pipe: bounded
        return code

    def wait_tree(self, timeout: float, what: str = "its processes") -> None:
        """Until no process of the tree runs (a launcher can exit before its workers)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None or self.tree():
            if time.monotonic() > deadline:
                self.fail(f"{what} still running after {timeout:.0f} s: {sorted(self.tree())}")
            time.sleep(0.05)

    def kill_tree(self, dump_stacks: bool = False) -> None:
        victims = [*self.tree(), self.pid]
        if dump_stacks:
            for pid in victims:
                _signal(pid, signal.SIGABRT)  # faulthandler writes every thread's stack, then the process dies
            time.sleep(1)
        for pid in [*self.tree(), self.pid]:
            _signal(pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for reader in self._readers:
            reader.join(timeout=10)

    def fail(self, why: str):
        alive = sorted(self.tree())
        self.kill_tree(dump_stacks=True)
        # faulthandler ends each dump with a list of loaded extension modules: noise here.
        output = "\n".join(
            line for line in self.output.splitlines() if not line.startswith(("Extension modules:", ", "))
        )
        pytest.fail(
            f"{' '.join(self.cmd[:6])} ...: {why}; killed it (and {len(alive)} processes below it: {alive}). "
            f"Output (last {TAIL} characters; Python stacks of the killed processes at the end):\n{output[-TAIL:]}",
            pytrace=False,
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None or self.tree():
            self.kill_tree()
        return False


def _signal(pid: int, signum) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass


def run(cmd, *, timeout: float, cwd=REPO_ROOT, env=None, merge_output=False, input=None) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` with a deadline that holds for
    the whole process tree; on expiry the test fails with the output and the stacks."""
    with Launched(cmd, cwd=cwd, env=env, merge_output=merge_output,
                  stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL) as launched:  # fmt: skip
        if input is not None:
            launched.proc.stdin.write(input)
            launched.proc.stdin.close()
        code = launched.wait(timeout)
        launched.wait_tree(30, "processes the command left behind")
        return subprocess.CompletedProcess(launched.cmd, code, launched.stdout, launched.stderr)
