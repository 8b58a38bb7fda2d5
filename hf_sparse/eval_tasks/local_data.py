"""Loader named by the shipped task YAMLs (`custom_dataset: !function local_data.load`).

lm-eval resolves `dataset_kwargs.data_files` against the current folder, so a relative
path in a YAML breaks as soon as lm-eval runs elsewhere; this loader reads the JSON-lines
file next to itself instead, from any folder. lm-eval imports it by file path, so it
imports only the standard library and `datasets`.
"""

import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def load(data_file: str, **_ignored):
    """{"test": Dataset} of the rows of `data_file` (a name in this folder). lm-eval
    passes the task's metadata along as keyword arguments; they are not needed here."""
    import datasets

    with open(os.path.join(_HERE, data_file), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
