"""The JSON file that keeps the per-shape 2:4 GEMM verdicts (``gemm_tuning``) between runs.

One file, ``$HF_HOME/hf_sparse/cusparselt_gemms.json`` unless ``HF_SPARSE_GEMM_TABLE``
names another, holds ``{"format": 1, "tables": {table key: {shape key: entry}}}``: a table
key names a GPU, a torch version and a cuSPARSELt version, an entry is one verdict's
fields (:data:`ENTRY_FIELDS`).

Every run on the machine shares the file, and a person or another version may have
written it, so nothing in it is trusted before it is checked; a bad file must never stop
training:

- an entry whose fields or types are not exactly this version's is ignored (its shape is
  tuned anew when met), and so is a table or a ``tables`` that is not a JSON object; one
  warning per file says how many and why;
- a file of another format (a later version's, or not a table at all) is never
  overwritten: the verdicts of the run stay in memory, said once;
- a file that is not JSON (a torn hand-edit) is replaced by a new table, said once.

Writes replace the file atomically, and the file is created as a plain ``open`` would
(0666 minus the umask: 0644 under umask 022, as checkpoints are), not owner-only the way
``tempfile.mkstemp`` makes it, so that everyone who shares the cache can read it.

Shipped as HF remote code: standard library (and huggingface_hub, a transformers
dependency, for the default location).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

from .env_knobs import env_value

logger = logging.getLogger(__name__)

TABLE_PATH_ENV = "HF_SPARSE_GEMM_TABLE"
TABLE_FORMAT = 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value) -> bool:
    # NaN marks a time that was not measured (a dense verdict); JSON keeps it as NaN.
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isnan(value) or 0 <= value < math.inf


# Every field an entry has, with the check its value must pass. split_k, split_k_mode and
# provisional came later: an entry written before them is read with their defaults (the
# library's default split-k, final), which is how it was verified and timed.
ENTRY_FIELDS: dict[str, Callable[[Any], bool]] = {
    "alg_id": lambda v: _is_int(v) and v >= -1,  # -1: no correct alg id, a dense verdict
    "sparse_s": _is_seconds,
    "compress_s": _is_seconds,
    "dense_s": _is_seconds,
    "reason": lambda v: isinstance(v, str),
    # A saved verdict is a measured one; HF_SPARSE_2TO4_GEMMS overrides are never saved,
    # so a "forced" entry is a hand edit that would skip the comparison.
    "forced": lambda v: v is None,
    "split_k": lambda v: _is_int(v) and v >= 1,
    "split_k_mode": lambda v: _is_int(v) and v in (-1, 0, 1),  # library default, one kernel, two kernels
    # Verdicts cut short by the tuning budget are never saved; one marked so is not final.
    "provisional": lambda v: v is False,
}
REQUIRED_FIELDS = ("alg_id", "sparse_s", "compress_s", "dense_s", "reason")


def entry_problem(entry) -> str:
    """Why ``entry`` is not a verdict this version can use ("" when it is one)."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not an object"
    missing = [name for name in REQUIRED_FIELDS if name not in entry]
    if missing:
        return f"missing {', '.join(missing)}"
    unknown = sorted(set(entry) - set(ENTRY_FIELDS))
    if unknown:
        return f"unknown field {', '.join(map(str, unknown))}"
    for name, value in entry.items():
        if not ENTRY_FIELDS[name](value):
            return f"{name}={value!r}"
    return ""


@dataclass
class TableFile:
    """What :func:`read_table` found. ``tables`` holds only the entries that passed."""

    status: str  # "missing" | "ours" | "unreadable" (not JSON) | "foreign" (another format)
    tables: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)  # "table key / shape key: why" per dropped item
    detail: str = ""  # why the file is unreadable or foreign


_said: set = set()  # (path, what) pairs already warned about in this process


def _say_once(path: str, what: str, message: str, *args) -> None:
    if (path, what) not in _said:
        _said.add((path, what))
        logger.warning(message, *args)


def table_path() -> str:
    explicit = env_value(TABLE_PATH_ENV)
    if explicit:
        return explicit
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "hf_sparse", "cusparselt_gemms.json")


def _parse(data) -> TableFile:
    if not isinstance(data, dict):
        return TableFile("foreign", detail=f"a JSON {type(data).__name__}, not a table")
    if data.get("format") != TABLE_FORMAT:
        return TableFile("foreign", detail=f"format {data.get('format')!r}; this version writes {TABLE_FORMAT}")
    found = TableFile("ours")
    tables = data.get("tables")
    if not isinstance(tables, dict):
        found.ignored.append(f"'tables' is a {type(tables).__name__}, not an object")
        return found
    for table_key, entries in tables.items():
        if not isinstance(entries, dict):
            found.ignored.append(f"{table_key}: a {type(entries).__name__}, not an object")
            continue
        for shape_key, entry in entries.items():
            problem = entry_problem(entry)
            if problem:
                found.ignored.append(f"{table_key} / {shape_key}: {problem}")
            else:
                found.tables.setdefault(table_key, {})[shape_key] = entry
    return found


def read_table(path: str) -> TableFile:
    """The file at ``path``, checked; problems are warned about once per file and process."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return TableFile("missing")
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        _say_once(path, "unreadable", "2:4 GEMM table %s unreadable (%s); tuning anew", path, err)
        return TableFile("unreadable", detail=str(err))
    found = _parse(data)
    if found.status == "foreign":
        _say_once(
            path, "foreign",
            "2:4 GEMM table %s is %s: kept as it is and not read; this run's GEMM verdicts stay in memory",
            path, found.detail,
        )  # fmt: skip
    elif found.ignored:
        count = len(found.ignored)
        _say_once(
            path, "ignored",
            "2:4 GEMM table %s: ignored %d entr%s this version cannot use (%s%s); those shapes are tuned anew",
            path, count, "y" if count == 1 else "ies", found.ignored[0], ", ..." if count > 1 else "",
        )  # fmt: skip
    return found


def save_entries(path: str, table_key: str, entries: dict) -> bool:
    """Merge ``entries`` (shape key -> entry) into ``table_key``'s table in the file, keeping
    the other valid entries (other GPUs, versions, processes). False when not written: a
    file of another format, or an OS error (said in the log)."""
    current = read_table(path)
    if current.status == "foreign":
        return False
    tables = current.tables
    tables.setdefault(table_key, {}).update(entries)
    try:
        _write_atomically(path, {"format": TABLE_FORMAT, "tables": tables})
    except OSError as err:  # a read-only home: the verdicts still hold for this process
        logger.warning("2:4 GEMM table not saved to %s (%s)", path, err)
        return False
    return True


def _write_atomically(path: str, data: dict) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide, as for any file a run writes; O_EXCL never
    # reuses another writer's temporary file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
