"""The run JSON's model keys are generated from `SparseLlamaConfig`: every field the config adds
to Llama is a run key (or set by the run), with the config's type, default and docstring entry;
the choice tuples are the implementing modules' own."""

import dataclasses
import re
import typing

import pytest
from transformers import LlamaConfig

import hf_sparse.model.configuration_sparse_llama as configuration
from hf_sparse.model import lowrank, select_2to4, sparse_ffn, weight_sparse
from hf_sparse.model.configuration_sparse_llama import SparseLlamaConfig
from hf_sparse.training.config import run_args
from hf_sparse.training.config.run_args import (
    MODEL_ARGUMENT_CLASSES,
    MODEL_FIELDS_SET_BY_THE_RUN,
    MODEL_KEY_SECTIONS,
    config_field_docs,
)
from hf_sparse.training.config.run_config import parse_run_config
from tests.test_train_hf import _write_config

SPARSE_FIELDS = [f for f in dataclasses.fields(SparseLlamaConfig) if f.name not in LlamaConfig.__dataclass_fields__]


def _run_key_fields():
    return {f.name: f for cls in MODEL_ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.name != "model_config"}


def test_every_field_the_config_adds_is_one_run_key_or_set_by_the_run():
    sectioned = [key for _, _, keys in MODEL_KEY_SECTIONS for key in keys]
    assert len(sectioned) == len(set(sectioned)), "a key in two --help sections"
    assert sorted(sectioned + list(MODEL_FIELDS_SET_BY_THE_RUN)) == sorted(f.name for f in SPARSE_FIELDS)
    assert set(_run_key_fields()) == set(sectioned)


def test_every_added_field_is_documented_with_its_real_default():
    docs = config_field_docs()
    heads = dict(re.findall(r"^    (\w+) \((`[^\n]*)\):$", SparseLlamaConfig.__doc__, re.M))
    for f in SPARSE_FIELDS:
        assert docs.get(f.name), f"{f.name} has no docstring entry"
        stated = re.search(r"defaults to `?([^`]+?)`?$", heads[f.name])
        if f.default is None:
            assert stated is None, f"{f.name}: the docstring states a default, the field has none"
            continue
        assert stated is not None, f"{f.name}: the docstring does not state the default {f.default!r}"
        assert stated.group(1) == (f'"{f.default}"' if isinstance(f.default, str) else str(f.default)), f.name


def test_run_keys_carry_the_config_field_type_and_docstring():
    docs = config_field_docs()
    for name, f in _run_key_fields().items():
        assert f.default is None  # absent: keeps the model JSON's value
        assert f.metadata["help"] == docs[name]
        assert "`" not in f.metadata["help"]
        # HfArgumentParser narrows `X | None` field types to X in place once it has parsed.
        run_types = set(typing.get_args(f.type) or (f.type,)) - {type(None)}
        config_type = SparseLlamaConfig.__annotations__[name]
        assert run_types and run_types <= set(typing.get_args(config_type) or (config_type,)), name


def test_a_documented_field_reaches_the_run_json_and_help_from_the_config_alone(monkeypatch):
    # A new field declared only on the config class (annotation, default, docstring entry)
    # becomes a run key with that help, once it is named in a --help section.
    doc = (
        SparseLlamaConfig.__doc__.rstrip()
        + "\n    new_knob (`int`, *optional*, defaults to 3):\n        What it does.\n"
    )
    monkeypatch.setattr(SparseLlamaConfig, "__doc__", doc)
    monkeypatch.setitem(SparseLlamaConfig.__annotations__, "new_knob", int)
    generated = run_args._model_argument_class("LowRankArguments", "Low rank.", ("loro_scope", "new_knob"))
    fields = {f.name: f for f in dataclasses.fields(generated)}
    assert fields["new_knob"].metadata["help"] == "What it does." and fields["new_knob"].type == int | None


@pytest.mark.parametrize(
    "config_choices, implementation_choices",
    [
        (configuration.SPARSE_METHODS, select_2to4.SPARSE_METHODS),
        (configuration.BACKWARD_MODES, sparse_ffn.BACKWARD_MODES),
        (configuration.WEIGHT_SPARSE_METHODS, weight_sparse.WEIGHT_SPARSE_METHODS),
    ],
)
def test_choice_tuples_are_the_implementing_modules(config_choices, implementation_choices):
    assert config_choices is implementation_choices
    for choice in config_choices:
        assert choice in str(SparseLlamaConfig.__doc__)


def test_loro_init_is_validated_by_the_factor_initialiser():
    for good in ("xavier", "auto", "kaiming", "orth", "randn_0.01"):
        SparseLlamaConfig(loro_init=good)
        lowrank.parse_low_rank_init(good)
    for bad in ("randn_", "randn_x", "orthogonal"):
        with pytest.raises(ValueError, match="loro_init") as config_error:
            SparseLlamaConfig(loro_init=bad)
        with pytest.raises(ValueError, match="loro_init") as initialiser_error:
            lowrank.parse_low_rank_init(bad)
        assert str(config_error.value) == str(initialiser_error.value)


def test_run_json_model_keys_reach_the_config(tmp_path):
    run = parse_run_config(
        [_write_config(tmp_path, activation_auto_switch_max_drop=1, loro_init="orth", weight_masked_decay=0)]
    )
    assert run.model_config.activation_auto_switch_max_drop == 1.0 and run.model_config.loro_init == "orth"
    with pytest.raises(ValueError, match="activation_dense_warmup_steps"):
        parse_run_config([_write_config(tmp_path, activation_dense_warmup_steps="ten")])
