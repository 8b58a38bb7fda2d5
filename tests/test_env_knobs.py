"""The HF_SPARSE_* switches (hf_sparse/model/env_knobs.py): each declared once, every one read
through one parser, bad values said in one line naming the switch, and the switches that
change which code computes the forward recorded in config.json and the card."""

import logging
import os
import re

import pytest

from hf_sparse.model import env_knobs
from hf_sparse.model.env_knobs import KNOBS, code_selecting_settings, env_value
from tests.conftest import REPO_ROOT, tiny_config


def test_each_kind_parses_and_defaults(monkeypatch):
    for name in KNOBS:
        monkeypatch.delenv(name, raising=False)
        assert env_value(name) == KNOBS[name].default
    monkeypatch.setenv("HF_SPARSE_DISABLE_2TO4_KERNEL", " Yes ")
    monkeypatch.setenv("HF_SPARSE_CSLT_ALG_ID", "5")
    monkeypatch.setenv("HF_SPARSE_TUNE_SECONDS", "2.5")
    monkeypatch.setenv("HF_SPARSE_2TO4_GEMMS", "DENSE")
    monkeypatch.setenv("HF_SPARSE_GEMM_TABLE", "/tmp/t.json")
    assert env_value("HF_SPARSE_DISABLE_2TO4_KERNEL") is True
    assert env_value("HF_SPARSE_CSLT_ALG_ID") == 5 and env_value("HF_SPARSE_TUNE_SECONDS") == 2.5
    assert env_value("HF_SPARSE_2TO4_GEMMS") == "dense" and env_value("HF_SPARSE_GEMM_TABLE") == "/tmp/t.json"
    monkeypatch.setenv("HF_SPARSE_DISABLE_2TO4_KERNEL", "0")
    assert env_value("HF_SPARSE_DISABLE_2TO4_KERNEL") is False


def test_bad_values_name_the_switch_and_what_is_valid(monkeypatch, caplog):
    monkeypatch.setenv("HF_SPARSE_2TO4_GEMMS", "fastest")
    with pytest.raises(
        ValueError, match=r"HF_SPARSE_2TO4_GEMMS='fastest' is not valid; choose one of 'auto', 'sparse'"
    ):
        env_value("HF_SPARSE_2TO4_GEMMS")
    monkeypatch.setenv("HF_SPARSE_TUNE_SECONDS", "soon")
    with pytest.raises(ValueError, match=r"HF_SPARSE_TUNE_SECONDS='soon' is not valid; not a number of seconds"):
        env_value("HF_SPARSE_TUNE_SECONDS")
    monkeypatch.setenv("HF_SPARSE_DISABLE_COMPILE", "maybe")
    with pytest.raises(ValueError, match=r"HF_SPARSE_DISABLE_COMPILE='maybe' is not valid; use one of 1, true"):
        env_value("HF_SPARSE_DISABLE_COMPILE")
    # A lenient switch (a tuning hint) warns once and takes its default.
    monkeypatch.setattr(env_knobs, "_warned", set())
    monkeypatch.setenv("HF_SPARSE_CSLT_ALG_ID", "fast")
    with caplog.at_level(logging.WARNING, logger="hf_sparse"):
        assert env_value("HF_SPARSE_CSLT_ALG_ID") == 0 and env_value("HF_SPARSE_CSLT_ALG_ID") == 0
    assert sum("HF_SPARSE_CSLT_ALG_ID='fast'" in r.getMessage() for r in caplog.records) == 1


def test_no_switch_is_read_outside_the_parser():
    """Every HF_SPARSE_* variable the package reads goes through env_value (one parser), and
    every one it names is declared."""
    package = os.path.join(REPO_ROOT, "hf_sparse")
    named, direct = set(), []
    for folder, _, files in os.walk(package):
        for file in files:
            if not file.endswith(".py") or file == "env_knobs.py":
                continue
            text = open(os.path.join(folder, file), encoding="utf-8").read()
            named |= set(re.findall(r"\"(HF_SPARSE_[A-Z0-9_]+)\"", text))
            for line in text.splitlines():
                if "os.environ" in line and ("HF_SPARSE" in line or re.search(r"\b[A-Z_]+_ENV\b", line)):
                    direct.append(f"{file}: {line.strip()}")
    assert direct == []
    assert named <= set(KNOBS), named - set(KNOBS)


def test_code_selecting_switches_are_recorded_in_config_json_and_the_card(monkeypatch, tmp_path):
    from hf_sparse import SparseLlamaConfig
    from hf_sparse.training.callbacks.checkpoints import model_card
    from hf_sparse.training.run import record_environment

    for name in KNOBS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_SPARSE_DISABLE_COMPILE", "1")
    monkeypatch.setenv("HF_SPARSE_TUNE_SECONDS", "5")  # tuning: not recorded
    assert code_selecting_settings() == {"HF_SPARSE_DISABLE_COMPILE": "1"}
    config = tiny_config(activation_2by4=True)
    record_environment(config)
    config.save_pretrained(tmp_path)
    loaded = SparseLlamaConfig.from_pretrained(tmp_path)
    assert loaded.hf_sparse_environment == {"HF_SPARSE_DISABLE_COMPILE": "1"}
    assert "- trained with `HF_SPARSE_DISABLE_COMPILE=1`" in model_card(loaded, [])
    # Nothing set: nothing recorded.
    monkeypatch.delenv("HF_SPARSE_DISABLE_COMPILE")
    plain = tiny_config()
    record_environment(plain)
    assert not hasattr(plain, "hf_sparse_environment") and "- trained with `" not in model_card(plain, [])


def test_a_saved_config_with_the_record_is_still_a_model_json(monkeypatch, tmp_path):
    """A trained checkpoint's config.json used as the next run's model_config: the record
    describes the old run, so it is dropped (the new run records its own), never an error."""
    from hf_sparse.training.run import record_environment
    from hf_sparse.training.config.run_config import load_model_config

    monkeypatch.setenv("HF_SPARSE_DISABLE_2TO4_KERNEL", "1")
    config = tiny_config()
    record_environment(config)
    config.save_pretrained(tmp_path)
    loaded = load_model_config(str(tmp_path / "config.json"), {})
    assert not hasattr(loaded, "hf_sparse_environment")


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("HF_SPARSE_2TO4_GEMMS", "fastest", r"HF_SPARSE_2TO4_GEMMS='fastest' is not valid; choose one of 'auto'"),
        ("HF_SPARSE_DISABLE_2TO4_KERNEL", "maybe", r"HF_SPARSE_DISABLE_2TO4_KERNEL='maybe' is not valid; use one of"),
        ("HF_SPARSE_TUNE_SECONDS", "a minute", r"HF_SPARSE_TUNE_SECONDS='a minute' is not valid"),
    ],
)
def test_train_hf_refuses_a_bad_switch_before_anything_is_built(tmp_path, monkeypatch, capsys, name, value, message):
    """A bad value is one line naming the switch at parse time (not a traceback at the first
    forward, after the data and the model were built)."""
    from tests.conftest import assert_one_line_error, run_train_hf_script
    from tests.test_train_hf import _write_config

    monkeypatch.setenv(name, value)
    code = run_train_hf_script(monkeypatch, _write_config(tmp_path))
    assert_one_line_error(code, capsys, message)
    assert not (tmp_path / "run").exists()
