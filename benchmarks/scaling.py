"""Training throughput in tokens/s: 1 vs 2 processes on CPU, and one GPU with/without 2:4.

`cpu` mode runs `train_hf.py` itself (tiny model, embedded default corpus) as one process
and as two `torchrun` processes (gloo DDP), each process pinned to one thread so two
processes use the two cores a single process would leave half idle; tokens/s is the
Trainer's own `train_samples_per_second` x `max_length` (global over processes).

`gpu` mode needs only torch, transformers and `hf_sparse` model code (the GPU image has no
`datasets`): the 130m ReLU² model on random tokens in bf16, a plain AdamW loop, dense vs
the 2:4 recipe past its warm-up. `--device cpu` runs the same loop on CPU as a smoke test.

    python benchmarks/scaling.py cpu [--steps 20] [--global_batch 64] [--max_length 128]
    python benchmarks/scaling.py gpu [--steps 20] [--batch 32]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from machine import describe_machine  # benchmarks/machine.py

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


def _train_hf_tokens_per_second(workdir: str, processes: int, args) -> float:
    config = {
        "model_config": os.path.join(REPO_ROOT, "configs", "llama_tiny.json"),
        "squ_relu": "relu2",
        "activation_2by4": args.two_by_four,
        "activation_dense_warmup_steps": 0,
        "max_length": args.max_length,
        "output_dir": os.path.join(workdir, f"run{processes}"),
        "max_steps": args.steps,
        # Same global batch either way: each of N processes takes 1/N of it.
        "per_device_train_batch_size": args.global_batch // processes,
        "logging_steps": args.steps,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
    }
    path = os.path.join(workdir, f"run{processes}.json")
    with open(path, "w") as handle:
        json.dump(config, handle)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launcher = (
        [sys.executable]
        if processes == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    )
    subprocess.run(
        launcher + [os.path.join(REPO_ROOT, "train_hf.py"), path],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with open(os.path.join(config["output_dir"], "all_results.json")) as handle:
        results = json.load(handle)
    return results["train_samples_per_second"] * args.max_length


def run_cpu(args) -> None:
    print(f"machine: {describe_machine('cpu')}; torch {torch.__version__}")
    print(
        f"train_hf.py, configs/llama_tiny.json relu2{' +2:4' if args.two_by_four else ''}, "
        f"{args.steps} steps, global batch {args.global_batch} x {args.max_length} tokens, 1 thread/process"
    )
    workdir = tempfile.mkdtemp(prefix="hf_sparse_scaling_")
    try:
        rates = {n: [] for n in (1, 2)}
        for _ in range(args.repeats):  # interleaved so load drift hits both
            for processes in (1, 2):
                rates[processes].append(_train_hf_tokens_per_second(workdir, processes, args))
                shutil.rmtree(os.path.join(workdir, f"run{processes}"), ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best = {n: max(values) for n, values in rates.items()}
    for n in (1, 2):
        print(
            f"  {n} process{'es' if n > 1 else '  '}: {best[n]:10.0f} tokens/s  (runs: "
            f"{', '.join(f'{v:.0f}' for v in rates[n])})"
        )
    print(f"  2-process speed-up: {best[2] / best[1]:.2f}x")


def run_gpu(args) -> None:
    from hf_sparse import SparseLlamaConfig, SparseLlamaForCausalLM, set_training_step

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"machine: {describe_machine(device)}; torch {torch.__version__}; {dtype}")
    with open(os.path.join(REPO_ROOT, "configs", args.model)) as handle:
        sizes = json.load(handle)
    sizes.pop("model_type", None)
    if args.layers:
        sizes["num_hidden_layers"] = args.layers
    print(
        f"{args.model} relu2 ({sizes['num_hidden_layers']} layers), batch {args.batch} x {args.seq}, "
        f"{args.steps} timed steps, AdamW"
    )
    results = {}
    for label, two_by_four in (("dense relu2", False), ("2:4 recipe", True)):
        torch.manual_seed(0)
        config = SparseLlamaConfig(
            **{**sizes, "squ_relu": "relu2", "activation_2by4": two_by_four, "activation_dense_warmup_steps": 0}
        )
        model = SparseLlamaForCausalLM(config).to(device=device, dtype=dtype).train()
        set_training_step(model, 1)  # past the warm-up: the sparse path runs
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

        def step():
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        results[label] = args.batch * args.seq / seconds
        print(f"  {label:12s}: {results[label]:10.0f} tokens/s  ({seconds * 1e3:.1f} ms/step)")
        model = optimizer = None  # freed before the next variant is built
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"  2:4 / dense: {results['2:4 recipe'] / results['dense relu2']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    cpu = sub.add_parser("cpu", help="1 vs 2 processes of train_hf.py on CPU")
    cpu.add_argument("--steps", type=int, default=20)
    cpu.add_argument("--global_batch", type=int, default=64)
    cpu.add_argument("--max_length", type=int, default=128)
    cpu.add_argument("--repeats", type=int, default=2)
    cpu.add_argument("--two_by_four", action="store_true")
    gpu = sub.add_parser("gpu", help="one device: dense relu2 vs the 2:4 recipe")
    gpu.add_argument("--device", default="cuda")
    gpu.add_argument("--model", default="llama_130m.json")
    gpu.add_argument("--layers", type=int, default=0, help="override the layer count (0: the config's)")
    gpu.add_argument("--batch", type=int, default=32)
    gpu.add_argument("--seq", type=int, default=256)
    gpu.add_argument("--steps", type=int, default=20)
    gpu.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    run_cpu(args) if args.mode == "cpu" else run_gpu(args)


if __name__ == "__main__":
    main()
