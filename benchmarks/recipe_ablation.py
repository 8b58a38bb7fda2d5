"""Paper-style ablation of the 2:4 recipe on the embedded default corpus.

Trains the same small ReLU² model several ways — dense, the 2:4 recipe (split-GEMM
backward, token permutation, dense warm-up), `naive` backward, no permutation, and 2:4
weights (S-STE on the MLP; with a dense tail; with 2:4 activations too) — and prints final
eval loss, mean ReLU² sparsity and the last flip rate, like Table 1 of Haziza et al. (2025).

    python benchmarks/recipe_ablation.py [--max_steps 300] [--out outputs/ablation]
    python benchmarks/recipe_ablation.py --variants "dense relu2;weight 2:4 (MLP, S-STE)"
    python benchmarks/recipe_ablation.py --long [--batch_size 8]   # issue 20's grid, 2 seeds
    python benchmarks/recipe_ablation.py --dense-tail [--batch_size 8]   # issue 28's rows, 2 seeds
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
        "activation_2by4": False,
        "weight_2by4": True,
        "flip_rate": True,
        "sparse_dense_finetune_steps": 50,
    },
    "weight 2:4 + dense tail, masked decay": {
        "activation_2by4": False,
        "weight_2by4": True,
        "flip_rate": True,
        "sparse_dense_finetune_steps": 50,
        "weight_masked_decay": 0.05,
    },
    "weight + activation 2:4": {"activation_2by4": True, "weight_2by4": True, "flip_rate": True},
}
# --long: the ablation that is meant to separate the parts (issue 20): >= 1000 steps, 2 seeds
# per row, the auto switch, soft-threshold, activation L1 and the masked-decay x tail grid.
_WEIGHT = {"activation_2by4": False, "weight_2by4": True, "flip_rate": True}
LONG_VARIANTS = {
    "dense relu2": {"activation_2by4": False},
    "2:4 recipe (fixed warm-up)": {"activation_2by4": True},
    "2:4 recipe, auto switch": {"activation_2by4": True, "activation_auto_switch": True},
    "2:4, naive backward": {"activation_2by4": True, "activation_backward": "naive"},
    "2:4, no permutation": {"activation_2by4": True, "permute_2by4": False},
    "2:4, soft-threshold": {"activation_2by4": True, "activation_sparse_method": "soft_threshold"},
    "2:4 recipe + L1 0.01": {"activation_2by4": True, "activation_l1": 0.01},
    "2:4 recipe + L1 0.1": {"activation_2by4": True, "activation_l1": 0.1},
    **{
        f"weight 2:4, decay {decay}{', dense tail' if tail else ''}": {
            **_WEIGHT,
            "weight_masked_decay": decay,
            "sparse_dense_finetune_steps": tail,
        }
        for decay in (0.0, 0.05, 0.2)
        for tail in (0, 100)
    },
    "weight + activation 2:4": {"activation_2by4": True, "weight_2by4": True, "flip_rate": True},
}
# --dense-tail: 2:4 activations throughout against 2:4 with an activation dense tail (a
# fraction of max_steps, turned into activation_dense_tail_steps), long-grid settings, with
# what 4:8 and 8:16 would drop logged beside 2:4 (issue 28).
TAIL_FRACTION = "dense_tail_fraction"
TAIL_VARIANTS = {
    "2:4 throughout": {"activation_2by4": True},
    "2:4, dense tail 10%": {"activation_2by4": True, TAIL_FRACTION: 0.1},
    "2:4, dense tail 20%": {"activation_2by4": True, TAIL_FRACTION: 0.2},
    "dense relu2": {"activation_2by4": False},
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
    parser.add_argument("--max_steps", type=int, default=None, help="default 300; 1000 with --long")
    parser.add_argument("--warmup", type=int, default=100, help="activation_dense_warmup_steps")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "outputs", "ablation"))
    parser.add_argument("--variants", default=None, help="names separated by ';'; the first is the baseline")
    parser.add_argument(
        "--emulated-cusparselt", action="store_true",
        help="run the cuSPARSELt path on CPU through the test emulator (bf16): the FP8 rows",
    )  # fmt: skip
    parser.add_argument(
        "--long",
        action="store_true",
        help="the long grid (LONG_VARIANTS): default 1000 steps, seeds 42,43, mean and spread per row",
    )
    parser.add_argument(
        "--dense-tail", action="store_true",
        help="2:4 throughout vs a 10%% / 20%% activation dense tail (TAIL_VARIANTS), as --long: 1000 steps, 2 seeds",
    )  # fmt: skip
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default 42; 42,43 with --long)")
    parser.add_argument("--batch_size", type=int, default=None, help="per_device_train_batch_size override")
    args = parser.parse_args()
    long_settings = args.long or args.dense_tail
    if args.max_steps is None:
        args.max_steps = 1000 if long_settings else 300
    seeds = [int(x) for x in (args.seeds or ("42,43" if long_settings else "42")).split(",")]
    variants = (EMULATED_VARIANTS if args.emulated_cusparselt else TAIL_VARIANTS if args.dense_tail
                else LONG_VARIANTS if args.long else VARIANTS)  # fmt: skip
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
        runs = []
        for seed in seeds:
            suffix = f"_seed{seed}" if len(seeds) > 1 else ""
            run_dir = os.path.join(args.out, "".join(c if c.isalnum() else "_" for c in name) + suffix)
            argv = [
                args.config,
                "--output_dir",
                run_dir,
                "--overwrite_output_dir",
                "true",
                "--max_steps",
                str(args.max_steps),
                "--activation_dense_warmup_steps",
                str(args.warmup),
                "--eval_strategy",
                "no",
                "--save_strategy",
                "no",
                "--report_to",
                "[]",
                "--disable_tqdm",
                "true",
                "--max_eval_samples",
                "256",
                "--seed",
                str(seed),
            ]
            if args.batch_size:
                argv += ["--per_device_train_batch_size", str(args.batch_size)]
            for key, value in variants[name].items():
                if key == TAIL_FRACTION:
                    key, value = "activation_dense_tail_steps", round(value * args.max_steps)
                argv += [f"--{key}", json.dumps(value)]
            start = time.perf_counter()
            metrics = train_hf.main(argv)
            runs.append(
                {
                    "eval_loss": metrics["eval_loss"],
                    "sparsity": last_logged(run_dir, "sparsity_relu/mean_across_layers"),
                    "drop_24": last_logged(run_dir, "sparsity_24/mean_across_layers"),
                    # what 4:8 / 8:16 would drop on the same forwards (issue 28), last logged
                    "drop_48": last_logged(run_dir, "sparsity_nm/4:8/mean_across_layers"),
                    "drop_816": last_logged(run_dir, "sparsity_nm/8:16/mean_across_layers"),
                    "tail": metrics.get("activation_dense_tail_step"),
                    "flips": last_logged(run_dir, "flip_rate/mean"),
                    "switch": metrics.get("activation_switch_step"),
                    "seconds": time.perf_counter() - start,
                }
            )
        results.append((name, runs))
        with open(os.path.join(args.out, "results.json"), "w") as handle:  # partial results survive a stop
            json.dump({"max_steps": args.max_steps, "seeds": seeds, "rows": results}, handle, indent=1)

    print_table(results, args, seeds)


def _mean(values):
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def print_table(results, args, seeds) -> None:
    dense_loss = _mean([r["eval_loss"] for r in results[0][1]])
    print(
        f"\nmachine: {describe_machine()}, {args.max_steps} steps, warm-up {args.warmup}, seeds {seeds}, "
        f"config {os.path.relpath(args.config, REPO_ROOT)}"
    )
    # The N:M columns and the tail's step where the rows have them (issue 28's set).
    nm = any(r.get("drop_48") == r.get("drop_48") for _, runs in results for r in runs)
    extra = " 4:8 drop | 8:16 drop | dense again from step |" if nm else ""
    print(
        "| variant | eval loss (mean) | spread | vs first row | mean ReLU² sparsity | 2:4 drop |"
        + extra
        + " 2:4 from step | last flip rate | wall s |"
    )
    print("| --- " * (9 + 3 * nm) + "|")
    for name, runs in results:
        losses = [r["eval_loss"] for r in runs]
        loss = _mean(losses)
        spread = max(losses) - min(losses)
        drop, flips = _mean([r["drop_24"] for r in runs]), _mean([r["flips"] for r in runs])
        switches = sorted({r["switch"] for r in runs if r["switch"] is not None})
        cells = ""
        if nm:
            tails = sorted({r["tail"] for r in runs if r.get("tail") is not None})
            cells = "".join(
                f" {_cell(_mean([r.get(k, float('nan')) for r in runs]))} |" for k in ("drop_48", "drop_816")
            )
            cells += f" {', '.join(map(str, tails)) or '–'} |"
        print(
            f"| {name} | {loss:.4f} | {spread:.4f} | {100 * (loss / dense_loss - 1):+.2f}% | "
            f"{_mean([r['sparsity'] for r in runs]):.3f} | {_cell(drop)} |{cells} "
            f"{', '.join(map(str, switches)) or '–'} | {'–' if flips != flips else f'{flips:.2e}'} | "
            f"{_mean([r['seconds'] for r in runs]):.0f} |"
        )


def _cell(value: float) -> str:
    return "–" if value != value else f"{value:.4f}"


if __name__ == "__main__":
    main()
