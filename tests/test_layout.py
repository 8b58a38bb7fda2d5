"""The package layout's rules: the shipped model folder imports only torch, transformers and
itself; every module stays one concern (<= 600 lines); the README's architecture tree is
the code's; the public names survive the move; a checkpoint written before it still loads."""

import ast
import glob
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

import hf_sparse
from hf_sparse import SparseLlamaForCausalLM, set_training_step
from tests.conftest import REPO_ROOT, tiny_config

PACKAGE = os.path.join(REPO_ROOT, "hf_sparse")
MODEL_DIR = os.path.join(PACKAGE, "model")
FIXTURE = os.path.join(REPO_ROOT, "tests", "fixtures", "pre_layout_checkpoint")
# Remote code runs where only torch and transformers are installed (huggingface_hub comes
# with transformers); the standard library is always there.
ALLOWED_ROOTS = {"torch", "transformers", "huggingface_hub"}
MAX_MODULE_LINES = 600


def forbidden_imports(source: str, folder_modules: set[str]) -> list[str]:
    """The imports of `source` that a flat remote-code copy could not satisfy."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad += [
                a.name for a in node.names if a.name.split(".")[0] not in ALLOWED_ROOTS | set(sys.stdlib_module_names)
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                root = node.module.split(".")[0]
                if root not in ALLOWED_ROOTS | set(sys.stdlib_module_names):
                    bad.append(node.module)
            elif node.level > 1 or node.module is None or node.module not in folder_modules:
                # `from .. import x`, `from . import x` and subpackages do not survive the flat copy.
                bad.append("." * node.level + (node.module or ""))
    return bad


def model_modules() -> set[str]:
    return {name[:-3] for name in os.listdir(MODEL_DIR) if name.endswith(".py") and name != "__init__.py"}


def test_the_import_check_catches_what_breaks_remote_code():
    source = (
        "import datasets\nfrom hf_sparse.training import data\nfrom ..training import callbacks\n"
        "from . import sparse_ffn\nfrom .no_such_module import x\nimport torch\nfrom .kernels import sparse24_mm\n"
        "def f():\n    import wandb\n"
    )
    assert forbidden_imports(source, {"kernels"}) == [
        "datasets", "hf_sparse.training", "..training", ".", ".no_such_module", "wandb",
    ]  # fmt: skip


@pytest.mark.parametrize("module", sorted(model_modules()))
def test_model_folder_imports_only_torch_transformers_and_itself(module):
    with open(os.path.join(MODEL_DIR, module + ".py"), encoding="utf-8") as handle:
        assert forbidden_imports(handle.read(), model_modules()) == []


def test_a_saved_checkpoint_carries_exactly_the_model_folder(tmp_path):
    """transformers copies the modeling file and, recursively, its relative imports: every
    model module must be reachable from it (none orphaned), and nothing else comes along."""
    SparseLlamaForCausalLM(tiny_config()).save_pretrained(tmp_path)
    shipped = {name[:-3] for name in os.listdir(tmp_path) if name.endswith(".py")}
    assert shipped == model_modules()


def test_no_module_does_five_jobs():
    long = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as handle:
                    count = sum(1 for _ in handle)
                if count > MAX_MODULE_LINES:
                    long[os.path.relpath(path, REPO_ROOT)] = count
    assert long == {}


def test_no_module_walks_the_call_stack():
    """Code finds what it works with from what it is given, not from its callers' frames
    (the callbacks' place in the Trainer included: hf_sparse/training/callbacks/core.py)."""
    sources = glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
    assert len(sources) > 20
    walking = {}
    for path in sources:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        walking.update(
            {os.path.relpath(path, REPO_ROOT): w for w in ("_getframe", "currentframe", "f_back") if w in text}
        )
    assert walking == {}


def readme_tree() -> set[str]:
    """Paths (relative to hf_sparse/) named in the README's architecture tree."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("## Architecture") :]
    block = section[section.index("```\n") + 4 :]
    block = block[: block.index("```")]
    paths, stack = set(), []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match or match.group(2) == "hf_sparse/":
            continue
        depth = len(match.group(1)) // 2 - 1
        if depth < 0:
            continue  # top-level entries beside the package (train_hf.py, configs/, ...)
        name = match.group(2)
        stack = stack[:depth] + [name.rstrip("/")]
        paths.add("/".join(stack))
    return paths


def test_readme_architecture_tree_matches_the_code():
    code = set()
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(folder, PACKAGE)
        if rel != ".":
            code.add(rel.replace(os.sep, "/"))
        if rel.startswith(os.path.join("training", "metrics")):
            dirs[:] = []
            continue  # the metric's own files: the tree names its folder
        code |= {os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/") for f in files if f.endswith(".py")}
    # Subpackage __init__ files carry only a docstring; the tree names the folders.
    code -= set(DOCSTRING_ONLY_INITS)
    assert readme_tree() == code


DOCSTRING_ONLY_INITS = [
    "model/__init__.py",
    "training/__init__.py",
    "training/config/__init__.py",
    "training/data/__init__.py",
    "training/callbacks/__init__.py",
]


@pytest.mark.parametrize("init", DOCSTRING_ONLY_INITS)
def test_subpackage_inits_hold_only_a_docstring_saying_what_the_room_holds(init):
    with open(os.path.join(PACKAGE, init), encoding="utf-8") as handle:
        body = ast.parse(handle.read()).body
    assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value.value, str)


def rooms_import_graph() -> dict[str, set[str]]:
    """Which room imports which (function-level imports included): a room is a folder of
    hf_sparse/training/ (config, data, callbacks), another top-level folder (model,
    eval_tasks) or a single module (training/run.py, report.py, ...)."""
    modules = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "metrics")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                modules[module] = path

    def room(module):
        parts = module.split(".")[1:]
        if parts[:1] == ["training"] and parts[1:2] and parts[1] in ("config", "data", "callbacks"):
            return "training." + parts[1]
        return parts[0] if parts[:1] in (["model"], ["eval_tasks"]) else ".".join(parts) or "hf_sparse"

    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                # `from package import module` imports the module (the package's __init__ runs
                # for any of its modules anyway); `from module import name`, the module.
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target in modules and room(target) != room(module):
                    graph.setdefault(room(module), set()).add(room(target))
    return graph


def test_the_rooms_import_one_way():
    graph = rooms_import_graph()
    assert graph["training.run"] >= {"training.config", "training.data", "training.callbacks", "model"}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in graph.get(start, ()))

    assert [room for room in graph if reaches(room, room)] == []  # no cycle
    # The lm-eval integration imports no callback (the callback imports it), and the offline
    # tasks import nothing from training/ (the corpus they are built from is hf_sparse/embedded_corpus.py).
    assert "training.callbacks" not in graph["training.lm_eval_integration"]
    assert not any(room.startswith("training") for room in graph["eval_tasks"])


def test_public_names_survive_the_move():
    from hf_sparse.model import ffn_stages, gemm_backends, kernels
    from hf_sparse.training.data import tokenizer
    from hf_sparse.training.preemption import PreemptionCallback  # the path the README names

    assert PreemptionCallback.__module__ == "hf_sparse.training.callbacks.preemption"

    for name in (
        "SparseLlamaConfig",
        "SparseLlamaForCausalLM",
        "SparsityCallback",
        "sparsity_metrics",
        "set_training_step",
    ):
        assert hasattr(hf_sparse, name)
    for op in ("relu2_2to4_ffn_fwd", "relu2_2to4_ffn_bwd", "sparse24_mm"):
        assert hasattr(torch.ops.hf_sparse, op)
    assert (ffn_stages.DISABLE_COMPILE_ENV, ffn_stages.COMPILE_STAGES_ENV) == (
        "HF_SPARSE_DISABLE_COMPILE", "HF_SPARSE_COMPILE_STAGES",
    )  # fmt: skip
    assert (gemm_backends.DISABLE_ENV, kernels.ALG_ID_ENV) == ("HF_SPARSE_DISABLE_2TO4_KERNEL", "HF_SPARSE_CSLT_ALG_ID")
    assert "HF_SPARSE_CACHE" in open(tokenizer.__file__, encoding="utf-8").read()


def test_checkpoint_written_before_the_layout_change_loads_and_computes_the_same():
    """tests/fixtures/pre_layout_checkpoint was saved by the flat hf_sparse/ of commit 648b80c
    (low-rank attention, 2:4 weights with their scales, 2:4 activations), with its logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(FIXTURE).eval()
    assert isinstance(model, SparseLlamaForCausalLM)
    set_training_step(model, None)
    expected = load_file(os.path.join(FIXTURE, "expected_logits.safetensors"))
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)


def _code_strings(path: str) -> list[str]:
    """The string constants of a module's code (f-string parts included), docstrings left out."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_metric_names_are_spelled_only_in_metric_keys():
    """Telemetry, callbacks, auto switch, report and model card take the logged names from
    hf_sparse/metric_keys.py; none spells a metric family or key itself."""
    from hf_sparse import metric_keys

    names = {v for k, v in vars(metric_keys).items() if k.isupper() and isinstance(v, str)}
    names.discard(metric_keys.MEAN_ACROSS_LAYERS)
    # Bare words that also name other things: the flip_rate run key, the lm_eval package, the
    # config fields the switch and tail steps are saved in. Their metric forms (with a "/")
    # still count.
    also_other_things = {metric_keys.FLIP_RATE, metric_keys.LM_EVAL, metric_keys.SWITCH_STEP,
                         metric_keys.DENSE_TAIL_STEP}  # fmt: skip
    sources = glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
    spelled = {}
    for path in sources:
        if path.endswith("metric_keys.py"):
            continue
        found = sorted(
            {
                s
                for s in _code_strings(path)
                for name in names
                if (s == name and name not in also_other_things) or s.startswith(name + "/")
            }
        )
        if found:
            spelled[os.path.relpath(path, REPO_ROOT)] = found
    assert spelled == {}


# Functions allowed past the limit below: the 2:4 op's public entry and its backward body,
# kept whole because each is one traced region whose steps share many locals (splitting them
# would pass a dozen tensors between helpers under torch.compile).
LONG_FUNCTIONS_KEPT_WHOLE = {("model/sparse_ffn.py", "relu2_2to4_ffn"), ("model/sparse_ffn.py", "_ffn_backward_impl")}
MAX_FUNCTION_LINES = 80


def test_no_function_runs_past_80_lines_of_code():
    """Docstrings aside; the long functions of issue 27 were split where a name explains a part."""
    long = []
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True) + [
        os.path.join(REPO_ROOT, "train_hf.py")
    ]:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        rel = os.path.relpath(path, PACKAGE).replace(os.sep, "/")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            if ast.get_docstring(node, clean=False) is not None:
                lines -= node.body[0].end_lineno - node.body[0].lineno + 1
            if lines > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS_KEPT_WHOLE:
                long.append((rel, node.name, lines))
    assert long == []
