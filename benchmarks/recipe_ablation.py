"""Paper-style ablation of the 2:4 recipe on the embedded default corpus.

Trains the same small ReLU² model four ways — dense, the 2:4 recipe (split-GEMM backward,
token permutation, dense warm-up), `naive` backward, and no permutation — and prints final
eval loss and mean ReLU² sparsity, like Table 1 of Haziza et al. (2025).

    python benchmarks/recipe_ablation.py [--max_steps 300] [--out outputs/ablation]
"""

import argparse
import json
import logging
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import train_hf  # noqa: E402
from machine import describe_machine  # noqa: E402  (benchmarks/machine.py)

VARIANTS = {
    "dense relu2": {"activation_2by4": False},
    "2:4 recipe": {"activation_2by4": True},
    "2:4, naive backward": {"activation_2by4": True, "activation_backward": "naive"},
    "2:4, no permutation": {"activation_2by4": True, "permute_2by4": False},
}



def mean_sparsity(run_dir: str) -> float:
    with open(os.path.join(run_dir, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    rows = [r for r in history if "sparsity_relu/mean_across_layers" in r]
    return rows[-1]["sparsity_relu/mean_across_layers"] if rows else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "quickstart.json"))
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100, help="activation_dense_warmup_steps")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "outputs", "ablation"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results = []
    for name, overrides in VARIANTS.items():
        run_dir = os.path.join(args.out, name.replace(" ", "_").replace(":", "").replace(",", ""))
        argv = [args.config, "--output_dir", run_dir, "--overwrite_output_dir", "true",
                "--max_steps", str(args.max_steps), "--activation_dense_warmup_steps", str(args.warmup),
                "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "[]",
                "--disable_tqdm", "true", "--max_eval_samples", "256"]
        for key, value in overrides.items():
            argv += [f"--{key}", json.dumps(value)]
        start = time.perf_counter()
        metrics = train_hf.main(argv)
        results.append((name, metrics["eval_loss"], mean_sparsity(run_dir), time.perf_counter() - start))

    dense_loss = results[0][1]
    print(f"\nmachine: {describe_machine()}, {args.max_steps} steps, "
          f"warm-up {args.warmup}, config {os.path.relpath(args.config, REPO_ROOT)}")
    print(f"| variant | eval loss | vs dense | mean ReLU² sparsity | wall s |")
    print(f"| --- | --- | --- | --- | --- |")
    for name, loss, sparsity, seconds in results:
        print(f"| {name} | {loss:.4f} | {100 * (loss / dense_loss - 1):+.2f}% | {sparsity:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
