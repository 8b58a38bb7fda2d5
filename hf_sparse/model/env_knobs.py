"""The ``HF_SPARSE_*`` environment switches: each declared once here, all read by one parser.

Each :class:`Knob` names its kind and default. A knob that changes *which code computes the
forward* (``selects_code``) is recorded with a run: ``train_hf`` writes the ones that are set
into the model's ``config.json`` (``hf_sparse_environment``) and its card, so a checkpoint
says how it was computed. The others are tuning and paths.

Values are read at each call (the tests and launchers set them per process): reading one is
a dict lookup and a parse. Shipped as HF remote code: imports only the standard library.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Knob:
    name: str
    kind: str  # "flag" | "int" | "float" | "choice" | "path"
    default: object
    help: str
    choices: tuple = ()
    selects_code: bool = False  # changes which code computes the forward: recorded with a run
    # An unparsable value: warn once and use the default (True), or raise naming the valid ones.
    lenient: bool = False


_KNOBS = (
    Knob("HF_SPARSE_DISABLE_2TO4_KERNEL", "flag", False,
         "plain torch.mm GEMMs instead of cuSPARSELt for the 2:4 FFN (same numbers, no speed-up)", selects_code=True),
    Knob("HF_SPARSE_2TO4_GEMMS", "choice", "auto",
         "each 2:4 GEMM shape's sparse-or-dense verdict: tuned (auto), always sparse, always dense",
         choices=("auto", "sparse", "dense"), selects_code=True),
    Knob("HF_SPARSE_CSLT_ALG_ID", "int", 0, "the cuSPARSELt alg id each GEMM shape tries first", lenient=True),
    Knob("HF_SPARSE_TUNE_SECONDS", "float", 60.0, "seconds of 2:4 GEMM tuning per process, all shapes together"),
    Knob("HF_SPARSE_GEMM_TABLE", "path", None, "the file the 2:4 GEMM verdicts are kept in"),
    Knob("HF_SPARSE_DISABLE_COMPILE", "flag", False, "run the 2:4 FFN's elementwise stages eagerly everywhere",
         selects_code=True),
    Knob("HF_SPARSE_COMPILE_STAGES", "choice", "auto",
         "compile the 2:4 FFN's elementwise stages: always (1), never (0), on CUDA only (auto)",
         choices=("auto", "1", "0", "true", "false", "yes", "no", "on", "off", "always", "never"), selects_code=True,
         lenient=True),
    Knob("HF_SPARSE_CACHE", "path", None, "the cache folder of trained tokenizers and tokenized data"),
)  # fmt: skip
KNOBS: dict[str, Knob] = {knob.name: knob for knob in _KNOBS}
_warned: set = set()


def _invalid(knob: Knob, raw: str, valid: str):
    if knob.lenient:
        if (knob.name, raw) not in _warned:
            _warned.add((knob.name, raw))
            logger.warning("Ignoring %s=%r (%s); using %r", knob.name, raw, valid, knob.default)
        return knob.default
    raise ValueError(f"{knob.name}={raw!r} is not valid; {valid}.")


def env_value(name: str):
    """The parsed value of knob ``name`` in this process's environment (its default when
    unset). An invalid value raises one error naming the knob and what is valid (a lenient
    knob warns once and takes its default instead)."""
    knob = KNOBS[name]
    raw = os.environ.get(name)
    if raw is None or (not raw.strip() and knob.kind != "flag"):
        return knob.default
    value = raw.strip()
    if knob.kind == "flag":
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        return _invalid(knob, raw, f"use one of {', '.join(_TRUE + _FALSE[1:])}")
    if knob.kind == "int":
        try:
            return int(value)
        except ValueError:
            return _invalid(knob, raw, "not an integer")
    if knob.kind == "float":
        try:
            return float(value)
        except ValueError:
            return _invalid(knob, raw, "not a number of seconds")
    if knob.kind == "choice":
        if value.lower() in knob.choices:
            return value.lower()
        return _invalid(knob, raw, f"choose one of {', '.join(map(repr, knob.choices))}")
    return raw  # a path, as given


def check_environment() -> None:
    """Parse every knob set in this process's environment now: a run refuses a bad value
    before anything is built (the model would otherwise meet it at its first forward)."""
    for name in KNOBS:
        env_value(name)


def code_selecting_settings() -> dict[str, str]:
    """The knobs that change which code computes the forward and are set in this process
    (name -> value as given), to be recorded with a run."""
    return {name: os.environ[name] for name, knob in KNOBS.items() if knob.selects_code and os.environ.get(name)}


__all__ = ["KNOBS", "Knob", "env_value", "check_environment", "code_selecting_settings"]
