"""Run train_hf.py's command line under torchrun, then record what outlives it in this rank.

    python -m torch.distributed.run ... tests/dist_exit_probe.py OUT_DIR CONFIG.json [--key value ...]

After train_hf has closed its process group no gloo thread (pt_gloo_runloop, gloo_tcp_loop)
may still run: one that does belongs to a group something still holds, and lives on into
interpreter teardown, where it aborted a rank now and then after a successful run
("terminate called without an active exception"). Also records the steps this rank's
`activation_auto_switch` set. Writes OUT_DIR/exit_rank<RANK>.json."""

import glob
import json
import os
import runpy
import sys
import types

TRAIN_HF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_hf.py")


def live_thread_names() -> list[str]:
    names = []
    for comm in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(comm) as handle:
                names.append(handle.read().strip())
        except OSError:  # the thread ended while we looked
            pass
    return sorted(names)


def functions_holding_a_group() -> list[str]:
    """Functions whose default arguments hold a process group (bound at import time)."""
    import gc
    import warnings

    from torch._C._distributed_c10d import ProcessGroup

    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated module proxies warns
        objects = [obj for obj in gc.get_objects() if isinstance(obj, types.FunctionType)]
    for obj in objects:
        defaults = list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
        if any(isinstance(value, ProcessGroup) for value in defaults):
            found.append(f"{obj.__module__}.{obj.__qualname__}")
    return sorted(found)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    sys.argv = [TRAIN_HF, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(TRAIN_HF)  # as `python train_hf.py` would have it
    # Also record what this rank's auto switch decided, to compare the ranks.
    from hf_sparse.training import auto_switch

    switch_steps = []
    record_switch = auto_switch.set_switch_step

    def set_switch_step(model, step):
        switch_steps.append(step)
        record_switch(model, step)

    auto_switch.set_switch_step = set_switch_step
    try:
        runpy.run_path(TRAIN_HF, run_name="__main__")
    finally:
        # Threads first: the gc walk below must not change what teardown would have met.
        record = {"threads": live_thread_names(), "group_defaults": functions_holding_a_group(),
                  "switch_steps": switch_steps}
        with open(os.path.join(out_dir, f"exit_rank{os.environ.get('RANK', '0')}.json"), "w") as handle:
            json.dump(record, handle)
