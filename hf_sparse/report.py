"""Plots and a text summary of a run's sparsity, from `trainer_state.json` alone.

    python -m hf_sparse.report RUN_DIR

Writes `RUN_DIR/sparsity_relu_heatmap.png` (layer x step) and
`RUN_DIR/sparsity_over_steps.png` (mean ReLU² sparsity and 2:4 drop rate) when the run
logged activation sparsity, `RUN_DIR/flip_rate.png` (mean and max 2:4 weight-mask flip
rate) when it logged flip rates, and logs a short summary. No wandb needed.
"""

import argparse
import json
import logging
import os
import re
import sys

from . import metric_keys as keys

logger = logging.getLogger(__name__)

HEATMAP_NAME = "sparsity_relu_heatmap.png"
CURVES_NAME = "sparsity_over_steps.png"
FLIP_RATE_NAME = "flip_rate.png"
_LAYER_KEY = re.compile(rf"^{re.escape(keys.ACTIVATION_ZEROS)}/layer_(\d+)$")
# sparsity_nm/<N>:<M>/mean_across_layers -> the pattern "<N>:<M>"
_NM_MEAN_KEY = re.compile(rf"^{re.escape(keys.NM_DROP)}/(\d+:\d+)/{keys.MEAN_ACROSS_LAYERS}$")
# The heatmap has at most this many step columns (longer runs are averaged into bins), so
# its size does not grow with the number of log rows.
MAX_HEATMAP_COLUMNS = 300
HEATMAP_SIZE = (10.0, 4.5)  # inches, at 100 dpi


class NotARunError(ValueError):
    """RUN_DIR has no usable trainer_state.json."""


def load_log_history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "trainer_state.json")
    if not os.path.isdir(run_dir):
        raise NotARunError(f"{run_dir!r} is not a directory.")
    if not os.path.isfile(path):
        raise NotARunError(
            f"{run_dir!r} is not a training run: it has no trainer_state.json "
            "(train_hf.py writes one at the end of every run; checkpoint-* folders have one too)."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except json.JSONDecodeError as err:
        raise NotARunError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}).") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise NotARunError(f"{path} has no log_history list.")
    return history


def sparsity_series(history: list[dict]) -> dict:
    """Steps, the per-layer ReLU² sparsity matrix and the mean curves, from training rows."""
    rows = [row for row in history if any(_LAYER_KEY.match(k) for k in row)]
    layers = sorted({int(m.group(1)) for row in rows for k in row if (m := _LAYER_KEY.match(k))})
    found = {m.group(1) for row in rows for k in row if (m := _NM_MEAN_KEY.match(k))}
    patterns = sorted(found, key=lambda pattern: int(pattern.split(":")[1]))  # 4:8 before 8:16
    nan = float("nan")
    return {
        "steps": [row.get("step") for row in rows],
        "layers": layers,
        "per_layer": [[row.get(keys.layer_key(keys.ACTIVATION_ZEROS, i), nan) for row in rows] for i in layers],
        "mean": [row.get(keys.mean_key(keys.ACTIVATION_ZEROS), nan) for row in rows],
        "drop_24": [row.get(keys.mean_key(keys.DROP_24), nan) for row in rows],
        "has_24": any(keys.mean_key(keys.DROP_24) in row for row in rows),
        # What activation_auto_switch reads (pooled over layers and ranks), where logged.
        "pooled_drop": [row.get(keys.AUTO_SWITCH_DROP, nan) for row in rows],
        "has_pooled": any(keys.AUTO_SWITCH_DROP in row for row in rows),
        # The N:M patterns' would-drop means (sparsity_nm/<N>:<M>/...), by pattern.
        "drop_nm": {
            pattern: [row.get(keys.mean_key(f"{keys.NM_DROP}/{pattern}"), nan) for row in rows] for pattern in patterns
        },  # fmt: skip
        # Why the auto switch switched ("threshold" / "cap"), from the row that logged it.
        "switch_reason": next((row[keys.SWITCH_REASON] for row in history if keys.SWITCH_REASON in row), None),
    }


def flip_rate_series(history: list[dict]) -> dict:
    """Steps and the mean / max / total flip-rate curves, from training rows that have them."""
    rows = [row for row in history if keys.FLIP_RATE_MEAN in row]
    nan = float("nan")
    return {
        "steps": [row.get("step") for row in rows],
        "mean": [row[keys.FLIP_RATE_MEAN] for row in rows],
        "max": [row.get(keys.FLIP_RATE_MAX, nan) for row in rows],
        "total": [row.get(keys.FLIP_RATE_TOTAL, nan) for row in rows],
    }


def write_report(run_dir: str) -> dict:
    """Write the PNGs the run's metrics allow and return {"heatmap", "curves", "flip_rate",
    "summary"} (a path is None when its metrics were not logged)."""
    history = load_log_history(run_dir)
    series = sparsity_series(history)
    flips = flip_rate_series(history)
    if not series["steps"] and not flips["steps"]:
        if not any("loss" in row for row in history):
            # Nothing was logged during training at all: the metrics settings are not the cause.
            raise NotARunError(
                f"{run_dir!r} reached no training logging step (max_steps below logging_steps?), so no "
                "sparsity metrics were logged; lower logging_steps or train longer."
            )
        raise NotARunError(
            f"{run_dir!r} has no sparsity metrics in its log history; train with wandb_sparsityrelu=true "
            "(SparsityCallback with activation metrics) on a relu/relu2 model, or flip_rate=true with weight_2by4."
        )
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    summary = [f"run: {os.path.abspath(run_dir)}"]
    heatmap = curves = flip_png = None
    if series["steps"]:
        phases = {"switch": _dense_to_sparse_step(run_dir), "tail": _dense_tail_step(run_dir)}
        heatmap, curves = _plot_activation_sparsity(plt, run_dir, series, summary, phases)
    if flips["steps"]:
        flip_png = _plot_flip_rate(plt, run_dir, flips, summary)
    return {"heatmap": heatmap, "curves": curves, "flip_rate": flip_png, "summary": "\n".join(summary)}


def _model_config(run_dir: str) -> dict:
    """RUN_DIR/config.json, or {} when it is missing or unreadable (the plots then mark no phase)."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _auto_switch_threshold(run_dir: str):
    """activation_auto_switch_max_drop from RUN_DIR/config.json, or None."""
    config = _model_config(run_dir)
    return config.get("activation_auto_switch_max_drop") if config.get("activation_auto_switch") else None


def _dense_tail_step(run_dir: str):
    """The optimizer step from which the FFN ran dense again (activation_dense_tail_steps),
    from RUN_DIR/config.json; None when the run had no activation dense tail (or not yet)."""
    step = _model_config(run_dir).get(keys.DENSE_TAIL_STEP)
    return None if step is None else int(step)


def _dense_to_sparse_step(run_dir: str):
    """The 2:4 run's dense warm-up length from RUN_DIR/config.json (the auto switch's step
    when it switched), or None (no 2:4)."""
    config = _model_config(run_dir)
    if not config.get("activation_2by4"):
        return None
    warmup = int(config.get("activation_dense_warmup_steps", 0))
    if config.get("activation_auto_switch") and config.get(keys.SWITCH_STEP) is not None:
        return min(warmup, int(config[keys.SWITCH_STEP]))  # where the auto switch ended it
    return warmup


def _binned(steps: list, per_layer: list, max_columns: int):
    """Average consecutive log rows into at most `max_columns` columns: (bin edges in
    steps, per-layer matrix). NaNs (a layer missing from a row) are skipped."""
    n = len(steps)
    bins = min(n, max_columns)
    edges_idx = [round(b * n / bins) for b in range(bins + 1)]
    matrix = []
    for layer_values in per_layer:
        row = []
        for lo, hi in zip(edges_idx, edges_idx[1:]):
            chunk = [v for v in layer_values[lo:hi] if v == v]
            row.append(sum(chunk) / len(chunk) if chunk else float("nan"))
        matrix.append(row)
    # Column b spans steps[lo] .. steps[hi - 1]; edges half a log interval outside.
    half = (steps[1] - steps[0]) / 2 if n > 1 else 0.5
    edges = [steps[lo] - half for lo in edges_idx[:-1]] + [steps[-1] + half]
    return edges, matrix


def layer_ticks(layers: list) -> tuple[list, list]:
    """Integer tick positions (row index) and labels (layer id) for the heatmap's layer
    axis, thinned to at most ~16 labels."""
    stride = max(1, -(-len(layers) // 16))
    positions = list(range(0, len(layers), stride))
    return positions, [str(layers[i]) for i in positions]


def _plot_activation_sparsity(plt, run_dir: str, series: dict, summary: list, phases: dict) -> tuple[str, str]:
    """The layer x step heatmap and the mean curves; appends their summary lines.

    Both figures have a fixed size whatever the number of log rows. `phases["switch"]` (the
    dense warm-up length of a 2:4 run) shades the warm-up and marks the dense->sparse step;
    `phases["tail"]` (the activation dense tail's first step) marks the sparse->dense step
    and shades the tail.
    """
    heatmap = _plot_heatmap(plt, run_dir, series, phases)
    curves = _plot_curves(plt, run_dir, series, phases)
    _summarise_activations(series, phases, summary)
    summary += [f"heatmap: {heatmap}", f"curves:  {curves}"]
    return heatmap, curves


def _plot_heatmap(plt, run_dir: str, series: dict, phases: dict) -> str:
    steps = series["steps"]
    layers = series["layers"]
    edges, matrix = _binned(steps, series["per_layer"], MAX_HEATMAP_COLUMNS)
    fig, ax = plt.subplots(figsize=HEATMAP_SIZE)
    image = ax.pcolormesh(
        edges, [i - 0.5 for i in range(len(layers) + 1)], matrix, vmin=0.0, vmax=1.0, cmap="viridis", shading="flat"
    )
    positions, labels = layer_ticks(layers)
    ax.set_yticks(positions)
    ax.set_yticklabels(labels)
    marks = ((phases["switch"], "--", "2:4 on"), (phases["tail"], ":", "dense again"))
    marks = [(step, style, what) for step, style, what in marks if step is not None and edges[0] < step < edges[-1]]
    for step, style, what in marks:
        ax.axvline(step, color="white", linestyle=style, linewidth=1.2, label=f"{what} (step {step})")
    if marks:
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer")
    ax.set_title("ReLU² activation sparsity (fraction of exact zeros)")
    fig.colorbar(image, ax=ax, label="fraction of exact zeros")
    heatmap = os.path.join(run_dir, HEATMAP_NAME)
    fig.savefig(heatmap, dpi=100)
    plt.close(fig)
    return heatmap


def _plot_curves(plt, run_dir: str, series: dict, phases: dict) -> str:
    steps, switch, tail = series["steps"], phases["switch"], phases["tail"]
    fig, ax = plt.subplots(figsize=(7, 4))
    marker = "." if len(steps) <= 200 else None  # markers turn a long run into a smear
    ax.plot(steps, series["mean"], marker=marker, label="mean ReLU² sparsity")
    if series["has_24"]:
        ax.plot(steps, series["drop_24"], marker=marker, label="2:4 drop rate (of non-zeros)")
    for pattern, values in series["drop_nm"].items():
        ax.plot(steps, values, marker=marker, linestyle="--", label=f"{pattern} would-drop rate (of non-zeros)")
    if series["has_pooled"]:
        ax.plot(steps, series["pooled_drop"], marker=marker, label="2:4 drop rate, pooled (auto switch)")
        threshold = _auto_switch_threshold(run_dir)
        if threshold is not None:
            ax.axhline(threshold, color="red", linestyle=":", linewidth=1, label=f"auto-switch threshold {threshold:g}")
    if switch is not None and steps[0] < switch:
        # During the warm-up the 2:4 rate is what the mask *would* drop: nothing is dropped yet.
        ax.axvspan(steps[0], min(switch, steps[-1]), color="grey", alpha=0.15, label="dense warm-up (would drop)")
        if switch <= steps[-1]:
            reason = f", {series['switch_reason']}" if series["switch_reason"] else ""
            ax.axvline(switch, color="black", linestyle="--", linewidth=1, label=f"2:4 on (step {switch}{reason})")
    if tail is not None and tail <= steps[-1]:
        # The tail runs dense again: the 2:4 rate there is again what the mask *would* drop.
        ax.axvspan(max(tail, steps[0]), steps[-1], color="tan", alpha=0.2, label="dense tail (would drop)")
        ax.axvline(tail, color="brown", linestyle=":", linewidth=1, label=f"dense again (step {tail})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction")
    ax.set_title("ReLU² sparsity and 2:4 drop rate, mean over layers" if series["has_24"] else
                 "ReLU² sparsity, mean over layers")  # fmt: skip
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    curves = os.path.join(run_dir, CURVES_NAME)
    fig.savefig(curves, dpi=100)
    plt.close(fig)
    return curves


def _summarise_activations(series: dict, phases: dict, summary: list) -> None:
    steps = series["steps"]
    last = {i: series["per_layer"][n][-1] for n, i in enumerate(series["layers"])}
    summary += [
        f"logging steps with sparsity: {len(steps)} (step {steps[0]} .. {steps[-1]})",
        f"mean ReLU² sparsity: first {series['mean'][0]:.4f}, last {series['mean'][-1]:.4f}",
        "last per-layer: " + ", ".join(f"L{i}={v:.3f}" for i, v in last.items()),
    ]
    if series["has_24"]:
        summary.append(f"2:4 drop rate: last {series['drop_24'][-1]:.4f}")
    for pattern, values in series["drop_nm"].items():
        summary.append(f"{pattern} would-drop rate: last {values[-1]:.4f}")
    if phases["switch"] is not None:
        reason = f" (auto switch: {series['switch_reason']})" if series["switch_reason"] else ""
        summary.append(f"2:4 activations from step {phases['switch']}{reason}")
    if phases["tail"] is not None:
        summary.append(f"dense again from step {phases['tail']} (activation dense tail)")


def _plot_flip_rate(plt, run_dir: str, flips: dict, summary: list) -> str:
    """Mean and max 2:4 weight-mask flip rate over steps; appends the summary lines."""
    steps = flips["steps"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, flips["mean"], marker=".", label="flip rate, mean over matrices")
    ax.plot(steps, flips["max"], marker=".", label="flip rate, max over matrices")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mask entries changed since previous log")
    # Healthy runs settle well below 1%: a log scale keeps the tail readable.
    if all(v > 0 for v in flips["mean"] + flips["max"]):
        ax.set_yscale("log")
    ax.set_title("2:4 weight-mask flip rate")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(run_dir, FLIP_RATE_NAME)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    summary += [
        f"flip rate: last mean {flips['mean'][-1]:.6f}, max {flips['max'][-1]:.6f}, "
        f"total {flips['total'][-1]:.6f} (step {steps[-1]})",
        f"flip rate curve: {path}",
    ]
    return path


def main(argv=None) -> int:
    from .training.config.cli_help import tool_prog

    parser = argparse.ArgumentParser(
        prog=tool_prog("hf-sparse-report", "hf_sparse.report"), description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", help="output_dir of a train_hf.py run (or a checkpoint folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    try:
        result = write_report(args.run_dir)
    except NotARunError as err:
        logger.error("error: %s", err)
        return 2
    logger.info("%s", result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
