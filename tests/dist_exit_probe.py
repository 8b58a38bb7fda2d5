"""Run train_hf.py's command line under a launcher, then record what outlives it in this rank.

    python -m torch.distributed.run ... tests/dist_exit_probe.py OUT_DIR CONFIG.json [--key value ...]

However train_hf ends (success, preemption, an error), once it has closed its process group
nothing may still hold a group: no gloo thread (pt_gloo_runloop, gloo_tcp_loop) alive, no
function default, live object or DDP Reducer holding a ProcessGroup, no Trainer or DDP
module alive. Anything that does reaches interpreter teardown, where a DDP Reducer joins the
gloo threads while holding the GIL (a deadlock at exit) and a surviving gloo thread aborted
ranks now and then ("terminate called without an active exception").
Also records this rank's exit code (train_hf's SystemExit), the seconds from its first stop
signal to that exit, and the steps its `activation_auto_switch` set.
Writes OUT_DIR/exit_rank<RANK>.json, then exits with train_hf's code.

EXIT_PROBE_RAISE_IN=module:attribute[.attribute] makes that callable raise RuntimeError (an
exit path to test: a failing callback, a failing lm-eval), on every rank; with
EXIT_PROBE_RAISE_AFTER=N its first N calls run as usual.
"""

import glob
import json
import os
import runpy
import signal
import sys
import time
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


def _holds_group(value, group_type) -> bool:
    if isinstance(value, group_type):
        return True
    # Plain containers only: lazy mappings (transformers' auto classes) import on access.
    if type(value) in (list, tuple, set, frozenset):
        return any(isinstance(item, group_type) for item in value)
    if type(value) is dict:
        return any(isinstance(item, group_type) for item in value.values())
    return False


def group_holders() -> dict[str, list[str]]:
    """What still references a process group, or would: function defaults bound at import
    time, module globals and instance attributes (directly or in a list/dict), DDP Reducers,
    and the objects of a run (Trainer, DDP module, Accelerator) that should have been
    collected."""
    import gc
    import warnings

    from torch._C._distributed_c10d import ProcessGroup, Reducer

    found = {"function_defaults": [], "attributes": [], "run_objects": [], "registry": []}
    run_types = {"Trainer", "DistributedDataParallel", "Accelerator", "DeepSpeedEngine", "FullyShardedDataParallel"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated module proxies warns
        objects = gc.get_objects()
        tracked = {id(obj) for obj in objects}
        objects += [m for m in list(sys.modules.values()) if m is not None and id(m) not in tracked]
        for obj in objects:
            if isinstance(obj, types.FunctionType):
                defaults = list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
                if any(isinstance(value, ProcessGroup) for value in defaults):
                    found["function_defaults"].append(f"{obj.__module__}.{obj.__qualname__}")
                continue
            if isinstance(obj, Reducer):
                found["run_objects"].append("Reducer")
                continue
            if type(obj).__name__ in run_types:
                found["run_objects"].append(type(obj).__name__)
            try:  # some classes refuse attribute access on themselves (pydantic's BaseModel)
                attributes = getattr(obj, "__dict__", None)
                if type(attributes) is not dict:
                    continue
                held = [name for name, value in attributes.items() if _holds_group(value, ProcessGroup)]
            except Exception:
                continue
            owner = (
                obj.__name__
                if isinstance(obj, types.ModuleType)
                else f"{type(obj).__module__}.{type(obj).__qualname__}"
            )
            found["attributes"] += [f"{owner}.{name}" for name in held]
    import torch.distributed.distributed_c10d as c10d

    found["registry"] = [str(pg) for pg in c10d._world.pg_map]
    return {key: sorted(set(value)) for key, value in found.items()}


if __name__ == "__main__":
    out_dir = sys.argv[1]
    sys.argv = [TRAIN_HF, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(TRAIN_HF)  # as `python train_hf.py` would have it
    # Record what this rank's auto switch decided, to compare the ranks, and when the first
    # stop signal arrived (train_hf's own handlers take over when it starts; they are wrapped
    # below at install time, so the probe adds no handler of its own).
    from hf_sparse.training.callbacks import auto_switch, preemption

    switch_steps, first_signal = [], []
    record_switch = auto_switch.set_switch_step

    def set_switch_step(model, step):
        switch_steps.append(step)
        record_switch(model, step)

    auto_switch.set_switch_step = set_switch_step
    original_handle = preemption.StopSignals._handle

    def timed_handle(self, signum, frame):
        first_signal.append((signal.Signals(signum).name, time.monotonic()))
        return original_handle(self, signum, frame)

    preemption.StopSignals._handle = timed_handle
    if os.environ.get("EXIT_PROBE_RAISE_IN"):
        import importlib

        module_name, _, path = os.environ["EXIT_PROBE_RAISE_IN"].partition(":")
        *owners, name = path.split(".")
        owner = importlib.import_module(module_name)
        for attribute in owners:
            owner = getattr(owner, attribute)

        original, calls = getattr(owner, name), []

        def injected(*args, **kwargs):
            calls.append(1)
            if len(calls) > int(os.environ.get("EXIT_PROBE_RAISE_AFTER", "0")):
                raise RuntimeError(f"injected by the exit probe into {path}")
            return original(*args, **kwargs)

        setattr(owner, name, injected)
    exit_code = None
    try:
        runpy.run_path(TRAIN_HF, run_name="__main__")
        exit_code = 0
    except SystemExit as stop:
        exit_code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        raise
    finally:
        ended = time.monotonic()
        # Threads first: the gc walk below must not change what teardown would have met.
        record = {
            "threads": live_thread_names(),
            "holders": group_holders(),
            "switch_steps": switch_steps,
            "exit_code": exit_code,
            "signal": first_signal[0][0] if first_signal else None,
            "seconds_after_signal": round(ended - first_signal[0][1], 3) if first_signal else None,
        }
        with open(os.path.join(out_dir, f"exit_rank{os.environ.get('RANK', '0')}.json"), "w") as out:
            json.dump(record, out)
