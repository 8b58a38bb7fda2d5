"""Shared fixtures: offline by construction, tiny models that run on CPU in seconds."""

import os
import sys
import tempfile

# Tests must never reach the hub; set before transformers/datasets are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One embedded-tokenizer cache per test session, never the user's.
os.environ.setdefault("HF_SPARSE_CACHE", os.path.join(tempfile.gettempdir(), "hf_sparse_test_cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


# First lines of a subprocess script that must run without hf_sparse: it is hidden even
# where it is installed (pip install .), so the checkpoint's own files are all there is.
WITHOUT_HF_SPARSE = (
    "import sys\n"
    "sys.modules['hf_sparse'] = None  # import hf_sparse now raises ImportError\n"
    "try:\n"
    "    import hf_sparse\n"
    "    raise AssertionError('hf_sparse must not be importable here')\n"
    "except ImportError:\n"
    "    pass\n"
)


def tiny_config(**overrides):
    """A 2-layer, hidden-32 sparse_llama config (LlamaModelTester-sized)."""
    from hf_sparse import SparseLlamaConfig

    values = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        squ_relu="relu2",
    )
    values.update(overrides)
    return SparseLlamaConfig(**values)


def tiny_training_args(output_dir, **overrides):
    """TrainingArguments of the tiny CPU Trainer runs: log every step, seeded, no reporting."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


# Tensor methods that wait for the device. Wrapping the methods (not a TorchFunctionMode)
# also sees what a custom op's or autograd Function's backward calls.
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


def callback_training_step(callback, args, state, control, model, ids) -> None:
    """One training step as the Trainer drives a callback around it (no optimizer step)."""
    callback.on_step_begin(args, state, control, model=model)
    model(ids, labels=ids).loss.backward()
    callback.on_step_end(args, state, control, model=model)


def host_sync_calls(monkeypatch, fn) -> list:
    """Names of the syncing Tensor methods that ``fn()`` calls, in order."""
    calls = []
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    try:
        fn()
        step_calls = list(calls)
        torch.ones(1).item()  # proves the wrappers were live
    finally:
        monkeypatch.undo()
    assert calls[len(step_calls) :] == ["item"]
    return step_calls


def run_train_hf_script(monkeypatch, *argv):
    """train_hf.py's `__main__` with `argv`, in this process (no interpreter start per run);
    returns the SystemExit code (None: it returned). The stop-signal handlers train_hf
    installs for its process are put back afterwards."""
    import runpy
    import signal

    train_hf_path = os.path.join(REPO_ROOT, "train_hf.py")
    monkeypatch.setattr(sys, "argv", [train_hf_path, *map(str, argv)])
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        runpy.run_path(train_hf_path, run_name="__main__")
    except SystemExit as exit_info:
        return exit_info.code
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return None


def assert_one_line_error(code, capsys, pattern):
    """Exit code 1 and, as the last line on stderr, one `train_hf.py: error: ...` line."""
    import re

    assert code == 1, code
    err = capsys.readouterr().err
    text = err.strip().splitlines()[-1] if err.strip() else ""
    assert text.startswith("train_hf.py: error: "), err[-3000:]
    assert re.search(pattern, text), text
    assert "Traceback" not in err


def assert_readable_by_another_user(*paths):
    """Each file is readable the way a serving container under another uid would read it.

    Its mode grants group and others read wherever the umask does. As root, a forked child
    also reads it for real as uid/gid 65534 (nobody): it enters the file's folder first, so
    the folders above it (pytest's tmp_path is private) are not what is tested, but the
    file and its own folder are."""
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    wanted = 0o444 & ~mask
    for path in map(str, paths):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & wanted == wanted, f"{path} has mode {oct(mode)} under umask {oct(mask)}"
        if os.geteuid() != 0 or not wanted & 0o004:
            continue
        pid = os.fork()
        if pid == 0:  # the child only reads and exits: no Python-level cleanup
            ok = False
            try:
                os.chdir(os.path.dirname(path))
                os.setgid(65534)
                os.setuid(65534)
                with open(os.path.basename(path), "rb") as handle:
                    ok = bool(handle.read(1)) or os.path.getsize(os.path.basename(path)) == 0
            finally:
                os._exit(0 if ok else 1)
        assert os.waitpid(pid, 0)[1] == 0, f"{path} is not readable by uid 65534"


def help_as_invoked(monkeypatch, capture, main, console_script: str, module: str) -> dict:
    """A tool's --help invoked as its console script and as `python -m module`: {the name
    the usage line should show: what it printed}, each after checking it exited 0."""
    printed = {}
    for argv0, prog in ((f"/usr/local/bin/{console_script}", console_script),
                        (f"/site/{module.replace('.', '/')}.py", f"python -m {module}")):  # fmt: skip
        monkeypatch.setattr(sys, "argv", [argv0, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        printed[prog] = capture.readouterr().out
    return printed


@pytest.fixture
def make_tiny_config():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when none is available")
