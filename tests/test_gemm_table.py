"""The JSON table of 2:4 GEMM verdicts (hf_sparse/model/gemm_table.py) against files a person
or another version wrote: nothing in it may crash a run, a file of an unknown format is
never overwritten, and the file is created readable by others, like a checkpoint."""

import dataclasses
import json
import logging
import os

import pytest
import torch

from hf_sparse.model import gemm_backends, gemm_table, gemm_tuning
from hf_sparse.model.gemm_tuning import CsltConfig, GemmShape
from tests.cslt_emulator import emulated_cusparselt_cuda_rules  # noqa: F401  (fixture)
from tests.test_gemm_tuning import SHAPE, choice_for, timer  # noqa: F401  (fixture)

OTHER_SHAPE = GemmShape(32, 64, 16, "col", True, "bfloat16")
OTHER_GPU = "NVIDIA A100-SXM4-80GB | torch 2.13.0 | cuSPARSELt 602"
GOOD = {"alg_id": 3, "sparse_s": 0.5, "compress_s": 0.1, "dense_s": 1.0, "reason": "8 of 8 candidates timed",
        "forced": None, "split_k": 1, "split_k_mode": -1, "provisional": False}  # fmt: skip


def write_table(data) -> str:
    path = gemm_tuning.table_path()
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    return path


def ours(tables_for_this_gpu) -> dict:
    """A format-1 file: ``tables_for_this_gpu`` under this machine's key, beside a valid
    table of another GPU that must survive every rewrite."""
    key = gemm_backends.automatic_gemm_backend("cpu").tuner.table_key("cpu")
    return {"format": gemm_table.TABLE_FORMAT, "tables": {key: tables_for_this_gpu, OTHER_GPU: {SHAPE.key(): GOOD}}}


def warnings_about(caplog, text) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


def test_the_entry_schema_is_the_verdict_dataclass():
    assert set(gemm_table.ENTRY_FIELDS) == {f.name for f in dataclasses.fields(gemm_tuning.GemmChoice)}
    assert gemm_table.entry_problem(GOOD) == ""
    assert gemm_table.entry_problem(dataclasses.asdict(gemm_tuning.GemmChoice(-1, *[float("nan")] * 3, "none"))) == ""


BAD = {
    "tables is a list": lambda: {"format": 1, "tables": []},
    "a table is a list": lambda: ours([GOOD]),
    "alg_id is a string": lambda: ours({SHAPE.key(): {**GOOD, "alg_id": "3"}}),
    "alg_id is a bool": lambda: ours({SHAPE.key(): {**GOOD, "alg_id": True}}),
    "a time is a string": lambda: ours({SHAPE.key(): {**GOOD, "dense_s": "1.0"}}),
    "a negative time": lambda: ours({SHAPE.key(): {**GOOD, "sparse_s": -1.0}}),
    "forced sparse": lambda: ours({SHAPE.key(): {**GOOD, "forced": True}}),
    "split_k 0": lambda: ours({SHAPE.key(): {**GOOD, "split_k": 0}}),
    "an unknown split-k mode": lambda: ours({SHAPE.key(): {**GOOD, "split_k_mode": 7}}),
    "an unknown field": lambda: ours({SHAPE.key(): {**GOOD, "tile_id": 2}}),
    "a missing field": lambda: ours({SHAPE.key(): {k: v for k, v in GOOD.items() if k != "dense_s"}}),
    "an entry that is a list": lambda: ours({SHAPE.key(): list(GOOD.values())}),
}


@pytest.mark.parametrize("content", BAD)
def test_a_bad_entry_is_ignored_with_one_warning_and_never_crashes(
    emulated_cusparselt_cuda_rules, timer, caplog, content
):
    """A hand-edited table once crashed the training step (a list where a table belongs:
    AttributeError; an alg_id "3": TypeError in the GEMM call). Now what does not check
    out is ignored (the shape is tuned anew), said once, and dropped when the file is
    rewritten; valid entries beside it stay."""
    path = write_table(BAD[content]())
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        choice = choice_for(SHAPE, "cpu")
        choice_for(OTHER_SHAPE, "cpu")
        # The op's own call on that shape (what a training step does) runs the verdict.
        a, b = gemm_tuning._random_operands(SHAPE, "cpu", torch.Generator().manual_seed(0))
        gemm_backends.automatic_gemm_backend("cpu").mm(a, b)
    assert choice.config == CsltConfig(2) and CsltConfig(2) in timer.sparse_timed()  # tuned anew
    assert warnings_about(caplog, "ignored") == 1 and warnings_about(caplog, "2:4 GEMM table") == 1
    with open(path, encoding="utf-8") as handle:
        rewritten = json.load(handle)
    mine = rewritten["tables"][gemm_backends.automatic_gemm_backend("cpu").tuner.table_key("cpu")]
    assert set(mine) == {SHAPE.key(), OTHER_SHAPE.key()}
    assert all(gemm_table.entry_problem(entry) == "" for entry in mine.values())
    if content != "tables is a list":
        assert rewritten["tables"][OTHER_GPU] == {SHAPE.key(): GOOD}


def test_an_entry_written_before_split_k_reads_as_final(emulated_cusparselt_cuda_rules, timer, caplog):
    old = {k: v for k, v in GOOD.items() if k not in ("split_k", "split_k_mode", "provisional")}
    write_table(ours({SHAPE.key(): old}))
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        choice = choice_for(SHAPE, "cpu")
    assert choice.config == CsltConfig(3) and not choice.provisional
    assert timer.calls == [] and caplog.records == []


FOREIGN = {
    "a later format": {"format": 2, "tables": {"anything": {"goes": [1, 2]}}},
    "no format": {"tables": {}},
    "not an object": [1, 2, 3],
}


@pytest.mark.parametrize("content", FOREIGN)
def test_a_table_of_an_unknown_format_is_kept_and_verdicts_stay_in_memory(
    emulated_cusparselt_cuda_rules, timer, caplog, content
):
    path = write_table(FOREIGN[content])
    with open(path, "rb") as handle:
        before = handle.read()
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        first = choice_for(SHAPE, "cpu")
        choice_for(OTHER_SHAPE, "cpu")
    with open(path, "rb") as handle:
        assert handle.read() == before  # not overwritten
    assert warnings_about(caplog, "kept as it is") == 1 and len(caplog.records) == 1
    timer.calls.clear()
    assert choice_for(SHAPE, "cpu") is first and timer.calls == []  # held in memory


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_the_table_file_is_created_like_a_checkpoint(emulated_cusparselt_cuda_rules, timer, umask, mode):
    """0666 minus the umask (readable by others under the usual 022), not mkstemp's 0600;
    written through a temporary file that does not stay behind."""
    previous = os.umask(umask)
    try:
        choice_for(SHAPE, "cpu")
    finally:
        os.umask(previous)
    path = gemm_tuning.table_path()
    assert os.stat(path).st_mode & 0o777 == mode
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]
