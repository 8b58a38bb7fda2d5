"""Preempt two-process DDP runs again and again and record how every rank ends.

    python benchmarks/preemption_stress.py --runs 20 --launcher torchrun --target launcher
    python benchmarks/preemption_stress.py --runs 20 --launcher accelerate --target rank1

Each run trains the tiny model (configs/llama_tiny.json, 32-token blocks, a few KB of local
text) on 2 CPU processes, waits for 2 logged steps, sends SIGTERM to the launcher
(`torchrun` / `accelerate launch --config_file configs/accelerate/ddp.yaml`, which pass it
on to the ranks) or to one rank, then watches both ranks: how long after the signal each
one exited, whether the launcher had to SIGKILL it (torch elastic does that 30 s after it
forwards a signal, or after another rank failed), each rank's own exit code and whether
anything still held a process group at its exit (both recorded in the rank by
tests/dist_exit_probe.py, which runs train_hf.py's command line), and whether exactly one
complete checkpoint and the preemption marker were written.
A run whose ranks are still alive `--hang_after` seconds after the signal is a hang: its
native stacks are dumped with py-spy (when installed) and the whole tree is killed.
Prints one row per run and a summary; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks.machine import describe_machine  # noqa: E402
from tests.processes import descendants, environment_of, is_running  # noqa: E402

PROBE = os.path.join(REPO_ROOT, "tests", "dist_exit_probe.py")


def _data_file(folder: str) -> str:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = random.Random(0)
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as handle:
        handle.write("\n".join(json.dumps({"text": " ".join(rng.choices(words, k=60))}) for _ in range(200)))
    return path


def _run_json(folder: str) -> str:
    config = {
        "model_config": os.path.join(REPO_ROOT, "configs", "llama_tiny.json"), "squ_relu": "relu2",
        "train_files": [_data_file(folder)], "validation_split_percentage": 0, "max_length": 32,
        "output_dir": os.path.join(folder, "run"), "max_steps": 100000, "per_device_train_batch_size": 4,
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "steps", "save_steps": 100000,
        "report_to": [], "disable_tqdm": True,
    }  # fmt: skip
    path = os.path.join(folder, "run.json")
    with open(path, "w") as handle:
        json.dump(config, handle)
    return path


def _ranks(launcher_pid: int, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for pid in descendants(launcher_pid):
            rank = environment_of(pid).get("RANK")
            # the rank's python, not a helper process it started (those inherit RANK too)
            if rank is not None and rank not in ranks:
                ranks[rank] = pid
        if len(ranks) == 2:
            return ranks
        time.sleep(0.05)
    raise RuntimeError("the two ranks did not start")


def _kill_tree(pid: int) -> None:
    for each in [pid, *descendants(pid)]:
        try:
            os.kill(each, signal.SIGKILL)
        except OSError:
            pass


def one_run(launcher: str, target: str, hang_after: float, keep: str | None = None) -> dict:
    folder = tempfile.mkdtemp(prefix="preempt_")
    config = _run_json(folder)
    # train_hf.py's own command line, run by the exit probe, which records each rank's exit
    # code and what outlived train_hf in it (see tests/dist_exit_probe.py).
    script = [PROBE, folder, config]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(REPO_ROOT, "configs", "accelerate", "ddp.yaml"), "--num_processes", "2",
               "--main_process_port", "0", *script]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    row = {"launcher": launcher, "target": target}
    try:
        deadline = time.monotonic() + 180
        while sum("'loss'" in line for line in list(lines)) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the run did not reach step 2:\n" + "".join(lines[-30:]))
            time.sleep(0.02)
        ranks = _ranks(proc.pid)
        victim = proc.pid if target == "launcher" else ranks[target[-1]]
        signalled = time.monotonic()
        os.kill(victim, signal.SIGTERM)
        exited: dict[str, float] = {}
        while len(exited) < 2 and time.monotonic() - signalled < hang_after:
            for rank, pid in ranks.items():
                if rank not in exited and not is_running(pid):
                    exited[rank] = round(time.monotonic() - signalled, 2)
            time.sleep(0.01)
        row["rank_exit_s"] = {rank: exited.get(rank) for rank in sorted(ranks)}
        row["hang"] = len(exited) < 2
        if row["hang"]:
            row["stacks"] = _dump_stacks([pid for rank, pid in ranks.items() if rank not in exited])
            _kill_tree(proc.pid)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        text = "".join(lines)
        row["launcher_rc"] = proc.returncode
        records = _probe_records(folder)
        # No record: the rank did not get to the end of train_hf (killed by a signal).
        row["rank_rc"] = {rank: record["exit_code"] if record else "killed" for rank, record in records.items()}
        row["left_holding_a_group"] = {
            rank: bool(record and (any(record["holders"].values()) or any("gloo" in t for t in record["threads"])))
            for rank, record in records.items()
        }
        row["sigkilled_by_launcher"] = "forcefully exiting" in text
        row.update(_outputs(os.path.join(folder, "run"), text))
        row["traceback_lines"] = sum(1 for line in text.splitlines() if line.startswith("Traceback"))
    except Exception as err:  # a run that did not get to the signal: record it, clean up
        row["error"] = str(err)[-2000:]
        _kill_tree(proc.pid)
    finally:
        if keep:
            shutil.copytree(folder, os.path.join(keep, os.path.basename(folder)), dirs_exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    return row


def _probe_records(folder: str) -> dict:
    records = {}
    for rank in ("0", "1"):
        try:
            with open(os.path.join(folder, f"exit_rank{rank}.json")) as handle:
                records[rank] = json.load(handle)
        except (OSError, json.JSONDecodeError):
            records[rank] = None
    return records


def _outputs(run_dir: str, text: str) -> dict:
    from hf_sparse.training.callbacks.checkpoints import is_complete_checkpoint

    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    checkpoints = sorted(n for n in names if n.startswith("checkpoint-"))
    complete = [n for n in checkpoints if is_complete_checkpoint(os.path.join(run_dir, n))]
    return {
        "checkpoints": checkpoints,
        "complete_checkpoints": complete,
        "marker": os.path.isfile(os.path.join(run_dir, "preempted.json")),
        "resume_line": text.count("Resume with:"),
    }


def _dump_stacks(pids: list[int]) -> dict:
    stacks = {}
    if shutil.which("py-spy") is None:
        return stacks
    for pid in pids:
        out = subprocess.run(["py-spy", "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        stacks[str(pid)] = (out.stdout + out.stderr)[-6000:]
    return stacks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--launcher", choices=("torchrun", "accelerate"), default="torchrun")
    parser.add_argument("--target", choices=("launcher", "rank0", "rank1"), default="launcher")
    parser.add_argument(
        "--hang_after",
        type=float,
        default=60.0,
        help="seconds after the signal at which a rank still alive counts as hung",
    )
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--keep", help="copy each run's folder here (debugging)")
    args = parser.parse_args(argv)
    print(describe_machine(), flush=True)
    rows = []
    for index in range(args.runs):
        row = one_run(args.launcher, args.target, args.hang_after, args.keep)
        rows.append(row)
        brief = {k: v for k, v in row.items() if k not in ("stacks",)}
        print(index, json.dumps(brief), flush=True)
        if row.get("stacks"):
            for pid, stack in row["stacks"].items():
                print(f"--- native stack of hung pid {pid}\n{stack}", flush=True)
    done = [r for r in rows if "error" not in r]
    slowest = max((t for r in done for t in r["rank_exit_s"].values() if t is not None), default=None)
    print(
        f"{args.launcher} / SIGTERM to {args.target}: {len(rows)} runs, {len(rows) - len(done)} did not start, "
        f"{sum(r['hang'] for r in done)} hung, {sum(r['sigkilled_by_launcher'] for r in done)} SIGKILLed by the "
        f"launcher, slowest rank exit {slowest} s after the signal, "
        f"{sum(len(r['complete_checkpoints']) == 1 and len(r['checkpoints']) == 1 for r in done)} with exactly one "
        f"complete checkpoint, launcher exit codes {sorted({r['launcher_rc'] for r in done})}, "
        f"rank exit codes {sorted({str(c) for r in done for c in r['rank_rc'].values()})}, "
        f"{sum(any(r['left_holding_a_group'].values()) for r in done)} with a group held at exit",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
