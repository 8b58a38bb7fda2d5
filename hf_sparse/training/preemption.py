"""The import path the README named before the training harness was split into rooms:
`hf_sparse.training.preemption` (`PreemptionCallback` and the module's other public names)
keeps working. The code is `hf_sparse/training/callbacks/preemption.py`."""

from .callbacks.preemption import *  # noqa: F403
from .callbacks.preemption import __all__  # noqa: F401
