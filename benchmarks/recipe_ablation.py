"""Paper-style ablation of the 2:4 recipe on the embedded default corpus.

Trains the same small ReLU² model several ways — dense, the 2:4 recipe (split-GEMM
backward, token permutation, dense warm-up), `naive` backward, no permutation, and 2:4
weights (S-STE on the MLP; with a dense tail; with 2:4 activations too) — and prints final
eval loss, mean ReLU² sparsity and the last flip rate, like Table 1 of Haziza et al. (2025).

    python benchmarks/recipe_ablation.py [--max_steps 300] [--out outputs/ablation]
    python benchmarks/recipe_ablation.py --variants "dense relu2;weight 2:4 (MLP, S-STE)"
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
    "weight 2:4 (MLP, S-STE)": {"activation_2by4": False, "weight_2by4": True, "flip_rate": True},
    "weight 2:4 + dense tail": {
        "activation_2by4": False, "weight_2by4": True, "flip_rate": True, "sparse_dense_finetune_steps": 50,
    },
    "weight 2:4 + dense tail, masked decay": {
        "activation_2by4": False, "weight_2by4": True, "flip_rate": True, "sparse_dense_finetune_steps": 50,
        "weight_masked_decay": 0.05,
    },
    "weight + activation 2:4": {"activation_2by4": True, "weight_2by4": True, "flip_rate": True},
}
# --emulated-cusparselt: the cuSPARSELt path on CPU (tests/cslt_emulator.py, bf16 autocast),
# the bf16 2:4 recipe against its FP8 mode (activation_2by4_fp8, real float8_e4m3fn rounding).
EMULATED_VARIANTS = {
    "2:4 recipe, bf16, emulated cuSPARSELt": {"activation_2by4": True, "bf16": True},
    "2:4 recipe, FP8, emulated cuSPARSELt": {"activation_2by4": True, "activation_2by4_fp8": True, "bf16": True},
}



def last_logged(run_dir: str, key: str) -> float:
    """The last value of `key` in the run's log history (NaN when never logged)."""
    with open(os.path.join(run_dir, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    rows = [r for r in history if key in r]
    return rows[-1][key] if rows else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "quickstart.json"))
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100, help="activation_dense_warmup_steps")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "outputs", "ablation"))
    parser.add_argument("--variants", default=None, help="names separated by ';'; the first is the baseline")
    parser.add_argument(
        "--emulated-cusparselt", action="store_true",
        help="run the cuSPARSELt path on CPU through the test emulator (bf16): the FP8 rows",
    )  # fmt: skip
    args = parser.parse_args()
    variants = EMULATED_VARIANTS if args.emulated_cusparselt else VARIANTS
    names = [n.strip() for n in (args.variants or ";".join(variants)).split(";") if n.strip()]
    unknown = [n for n in names if n not in variants]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(variants)}")
    logging.basicConfig(level=logging.WARNING)
    if args.emulated_cusparselt:
        import pytest

        from tests.cslt_emulator import install

        install(pytest.MonkeyPatch())  # every aligned FFN GEMM through the emulator, to the end

    results = []
    for name in names:
        overrides = variants[name]
        run_dir = os.path.join(args.out, "".join(c if c.isalnum() else "_" for c in name))
        argv = [args.config, "--output_dir", run_dir, "--overwrite_output_dir", "true",
                "--max_steps", str(args.max_steps), "--activation_dense_warmup_steps", str(args.warmup),
                "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "[]",
                "--disable_tqdm", "true", "--max_eval_samples", "256"]
        for key, value in overrides.items():
            argv += [f"--{key}", json.dumps(value)]
        start = time.perf_counter()
        metrics = train_hf.main(argv)
        sparsity = last_logged(run_dir, "sparsity_relu/mean_across_layers")
        flips = last_logged(run_dir, "flip_rate/mean")
        results.append((name, metrics["eval_loss"], sparsity, flips, time.perf_counter() - start))

    dense_loss = results[0][1]
    print(f"\nmachine: {describe_machine()}, {args.max_steps} steps, "
          f"warm-up {args.warmup}, config {os.path.relpath(args.config, REPO_ROOT)}")
    print("| variant | eval loss | vs first row | mean ReLU² sparsity | last flip rate | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, loss, sparsity, flips, seconds in results:
        flip_text = "–" if flips != flips else f"{flips:.2e}"
        print(
            f"| {name} | {loss:.4f} | {100 * (loss / dense_loss - 1):+.2f}% | {sparsity:.3f} | {flip_text} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
