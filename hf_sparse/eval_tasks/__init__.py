"""Offline lm-evaluation-harness tasks over held-out text of the embedded corpus: task
YAMLs, their data (generated once by `python -m hf_sparse.eval_tasks.build_data`, stored
here) and the loader the YAMLs name. Pass this folder as lm-eval's `include_path`
(`TASKS_DIR`); the in-loop evaluation and `hf-sparse-eval` always do.
"""

import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
# The shipped task names (and the tag that runs them all).
LOCAL_TASKS = ("hf_sparse_nextline", "hf_sparse_heldout")
LOCAL_TAG = "hf_sparse_local"
