"""`pip install .` gives an importable package, the console scripts and `python -m
hf_sparse.report` from any folder (built offline, against the installed setuptools)."""

import os
import shutil
import sys

from tests.conftest import REPO_ROOT
from tests import processes  # noqa: E402


def test_pip_install_gives_package_scripts_and_module_entry_points(tmp_path):
    # Build from a copy: pip builds a local folder in place and would leave build/ behind.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "train_hf.py"):
        shutil.copy(os.path.join(REPO_ROOT, name), source / name)
    shutil.copytree(
        os.path.join(REPO_ROOT, "hf_sparse"), source / "hf_sparse", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = tmp_path / "site"
    build = processes.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)], timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    installed = {p.name for p in target.iterdir()}
    assert {"hf_sparse", "train_hf.py", "bin"} <= installed
    # One version, written once (hf_sparse/__init__.py), is the installed distribution's.
    import hf_sparse

    assert f"hf_sparse-{hf_sparse.__version__}.dist-info" in installed, sorted(installed)
    assert (target / "hf_sparse" / "training" / "metrics" / "next_token_accuracy" / "next_token_accuracy.py").exists()
    # The training rooms are subpackages: each must be listed in pyproject's packages.
    for room in ("config", "data", "callbacks"):
        assert (target / "hf_sparse" / "training" / room / "__init__.py").exists(), room
    assert {"hf-sparse-train", "hf-sparse-report", "hf-sparse-export", "hf-sparse-eval"} <= {
        p.name for p in (target / "bin").iterdir()
    }
    # The offline lm-eval tasks travel with the package: YAMLs, data, and the loader they name.
    tasks = target / "hf_sparse" / "eval_tasks"
    assert {
        "hf_sparse_nextline.yaml",
        "hf_sparse_heldout.yaml",
        "nextline.jsonl",
        "heldout.jsonl",
        "local_data.py",
    } <= {p.name for p in tasks.iterdir()}

    # The console script calls train_hf.cli (whose error path tests/test_train_hf.py covers).
    assert "from train_hf import cli" in (target / "bin" / "hf-sparse-train").read_text()

    # From an unrelated folder, with only the installed copy on the path (not the repo): one
    # interpreter (importing transformers costs seconds) imports both and runs the report CLI.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import runpy, sys, hf_sparse, train_hf\n"
        "print(hf_sparse.__file__); print(train_hf.__file__)\n"
        "sys.argv = ['report', 'no_run']\n"
        "runpy.run_module('hf_sparse.report', run_name='__main__')\n"
    )
    run = processes.run(
        [sys.executable, "-c", probe],
        cwd=elsewhere,
        env=dict(os.environ, PYTHONPATH=str(target)),
        timeout=120,
    )
    assert run.returncode == 2 and "is not a directory" in run.stderr, run.stderr[-2000:]
    assert all(line.startswith(str(target)) for line in run.stdout.splitlines()[-2:]), run.stdout
