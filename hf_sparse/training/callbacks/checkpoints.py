"""Checkpoint folders: which one is the last *finished* one, and their model cards."""

import json
import os
import re
import stat

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ... import metric_keys as keys
from .auto_switch import switch_reason

_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# The Trainer writes trainer_state.json after the weights, optimizer and RNG states, so a
# folder with a readable one was written to the end.
COMPLETION_MARKER = "trainer_state.json"


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask can only
    set it: setting and restoring leaves a window in which another thread's files get
    mode 0666)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_permissions(folder: str) -> None:
    """Give every file under `folder` the permissions the umask allows, as open() would have.
    safetensors 0.8's save_file writes model.safetensors 0600 whatever the umask (the files
    beside it are 0644 under umask 022), so another uid, e.g. a serving container, could not
    read the weights of a run folder, a checkpoint or an export. Only adds permission bits."""
    allowed = 0o666 & ~current_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISREG(info.st_mode) and mode & allowed != allowed:
                os.chmod(path, mode | allowed)


def is_complete_checkpoint(path: str) -> bool:
    marker = os.path.join(path, COMPLETION_MARKER)
    if not os.path.isfile(marker) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        with open(marker, encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, json.JSONDecodeError):
        return False
    return True


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step checkpoint folder that was fully written (a run killed while
    writing the next one leaves that one half-written; it is never picked)."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT_RE.match(name)))
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if is_complete_checkpoint(path):
            return path
    return None


def checkpoint_step(path: str) -> int:
    """The optimizer step a finished checkpoint was written at (its trainer_state.json)."""
    with open(os.path.join(path, COMPLETION_MARKER), encoding="utf-8") as handle:
        return int(json.load(handle).get("global_step", 0))


def _latest_eval(log_history: list[dict]) -> dict:
    rows = [row for row in log_history if "eval_loss" in row]
    return rows[-1] if rows else {}


LM_EVAL_PREFIX = keys.LM_EVAL + "/"  # the in-loop lm-eval scores: lm_eval/<task>/<metric>


def latest_lm_eval(log_history: list[dict]) -> tuple[int | None, dict]:
    """(step, {"<task>/<metric>": value}) of the last row with lm-eval scores."""
    for row in reversed(log_history):
        scores = {k[len(LM_EVAL_PREFIX) :]: v for k, v in row.items() if k.startswith(LM_EVAL_PREFIX)}
        if scores:
            return row.get("step"), scores
    return None, {}


def enable_cache_in_saved_config(folder: str) -> None:
    """Set use_cache=true in a saved config.json (atomically): the Trainer turns the KV cache
    off while training, and a checkpoint written then would say so to every tool that loads
    it, against its own generation_config.json."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("use_cache", True) is True:
        return
    config["use_cache"] = True
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as save_pretrained writes it
    os.replace(path + ".tmp", path)


# Hyperparameters the card lists, in this order, when the run's TrainingArguments are known.
CARD_HYPERPARAMETERS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
    "num_train_epochs", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
    "seed", "bf16", "fp16",
)  # fmt: skip
REPORT_FIGURES = (
    ("sparsity_relu_heatmap.png", "ReLU² sparsity per layer"),
    ("sparsity_over_steps.png", "mean sparsity and 2:4 drop rate"),
    ("flip_rate.png", "2:4 weight-mask flip rate"),
)


def _eval_results(metrics: dict, dataset_name: str | None, lm_eval_scores: dict | None = None) -> list:
    """model-index entries (what the hub renders as a results table) for the last evaluation
    and the last lm-eval scores (one dataset per task)."""
    from huggingface_hub import EvalResult

    downstream = [
        EvalResult(
            task_type="text-generation",
            task_name=f"lm-eval {key.split('/', 1)[0]}",
            dataset_type=key.split("/", 1)[0],
            dataset_name=key.split("/", 1)[0],
            metric_type=key.split("/", 1)[1],
            metric_name=key.split("/", 1)[1],
            metric_value=float(value),
        )
        for key, value in sorted((lm_eval_scores or {}).items())
    ]
    dataset = dataset_name or "evaluation split of the training data"
    wanted = (("eval_loss", "loss", "Eval loss"), (keys.EVAL_PERPLEXITY, "perplexity", "Perplexity"),
              ("eval_accuracy", "accuracy", "Next-token accuracy"))  # fmt: skip
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Causal language modeling",
            dataset_type=dataset_name or "local",
            dataset_name=dataset,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=float(metrics[key]),
        )
        for key, metric_type, metric_name in wanted
        if isinstance(metrics.get(key), (int, float))
    ] + downstream


def _framework_versions() -> list[str]:
    import importlib.metadata as metadata

    lines = []
    for package in ("hf_sparse", "transformers", "torch", "accelerate", "datasets", "tokenizers"):
        try:
            lines.append(f"- {package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue  # hf_sparse run from a checkout, or datasets absent on a GPU box
    return lines


def architecture_lines(config) -> list[str]:
    """Model-card bullets on the architecture (shared by checkpoint and export cards)."""
    ffn = "SwiGLU (gated SiLU)" if config.squ_relu == "silu" else f"non-gated {config.squ_relu} (`down(act(up(x)))`)"
    lines = [
        f"- hidden size {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
        f"vocabulary {config.vocab_size}, context {config.max_position_embeddings}",
        f"- FFN: {ffn}, width {config.ffn_width}",
    ]
    if config.loro_scope:
        lines.append(
            f"- low-rank (LORO) linears on `{config.loro_scope}`: attention rank {config.loro_attn_rank}, "
            f"FFN rank {config.loro_mlp_rank}, init `{config.loro_init}`; W = weight_out · weight_inᵀ"
        )
    return lines


def model_card(
    config,
    log_history: list[dict],
    base_model_dir_name: str = "",
    training_args=None,
    dataset_name: str | None = None,
    folder: str | None = None,
) -> str:
    """A hub model card (README.md) for a checkpoint folder: `huggingface_hub.ModelCardData`
    metadata (library, tags, pipeline, datasets, model-index with the last evaluation)
    and sections on the architecture, sparsity settings, evaluation, training
    hyperparameters (from `training_args`, when given), framework versions and the
    report's figures (those present in `folder`)."""
    from huggingface_hub import ModelCard

    eval_row = _latest_eval(log_history)
    metrics = {
        k: v for k, v in eval_row.items() if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))
    }
    title = base_model_dir_name or "sparse_llama model"
    lm_eval_step, lm_eval_scores = latest_lm_eval(log_history)
    card_data = _card_data(config, title, dataset_name, _eval_results(metrics, dataset_name, lm_eval_scores))
    lines = [
        f"# {title}",
        "",
        "A LLaMA-style causal LM trained with `hf_sparse` on the HuggingFace Trainer.",
        "Load it with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`; the model code",
        "ships with the weights, so `hf_sparse` need not be installed.",
        "",
        "## Architecture",
        "",
        *architecture_lines(config),
    ]
    lines += ["", "## Sparsity", "", *_sparsity_lines(config, log_history)]
    lines += ["", "## Evaluation", "", *_evaluation_lines(metrics, eval_row.get("step"), lm_eval_step, lm_eval_scores)]
    if training_args is not None:
        lines += ["", "## Training hyperparameters", "", *_hyperparameter_lines(training_args)]
    versions = _framework_versions()
    if versions:
        lines += ["", "## Framework versions", "", *versions]
    figures = [(name, what) for name, what in REPORT_FIGURES if folder and os.path.isfile(os.path.join(folder, name))]
    if figures:
        lines += ["", "## Sparsity report", ""] + [f"![{what}]({name})" for name, what in figures]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def _card_data(config, title: str, dataset_name: str | None, results: list):
    """The card's `ModelCardData`: tags from the sparsity settings; a model-index only with `results`."""
    from huggingface_hub import ModelCardData

    tags = ["hf_sparse", "sparse_llama", "2:4-activation-sparsity" if config.activation_2by4 else "squared-relu"]
    if getattr(config, "weight_2by4", False):
        tags.append("2:4-weight-sparsity")
    if config.loro_scope:
        tags.append("low-rank")
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[dataset_name] if dataset_name else None,
        model_name=title if results else None,
        eval_results=results or None,
    )


def _sparsity_lines(config, log_history: list[dict]) -> list[str]:
    """Card bullets on the 2:4 activation and weight settings (and the environment switches)."""
    if config.activation_2by4:
        lines = [
            f"- 2:4 activation sparsity on the ReLU² output, selection `{config.activation_sparse_method}`",
            "- dense warm-up: " + _warmup_line(config, log_history),
            f"- backward: `{config.activation_backward}` (dense features {config.activation_dense_features}), "
            f"token permutation {'on' if config.permute_2by4 else 'off'}",
        ]
        if config.activation_dense_tail_steps:
            lines.append("- activation dense tail: " + _dense_tail_line(config))
        if config.activation_2by4_fp8:
            lines.append("- FP8: forward and input-gradient 2:4 GEMMs in row-wise scaled FP8 e4m3 (sm90 GPUs)")
    else:
        lines = ["- no 2:4 activation sparsity"]
    environment = getattr(config, "hf_sparse_environment", None)
    if environment:
        lines.append("- trained with " + ", ".join(f"`{k}={v}`" for k, v in sorted(environment.items())))
    if config.weight_2by4:
        tail = config.sparse_dense_finetune_steps
        lines += [
            f"- 2:4 weights (`{config.weight_sparse_method}`) on `{config.weight_2by4_scope}` linears from optimizer "
            f"step {config.weight_2by4_start_step}"
            + (f", dense for the last {tail} steps (this model runs dense)" if tail else " (this model runs sparse)"),
            "- the stored weights are the dense masters; `python -m hf_sparse.export` writes the 2:4 weights themselves",
        ]
    return lines


def _evaluation_lines(metrics: dict, eval_step, lm_eval_step, lm_eval_scores: dict) -> list[str]:
    """The last evaluation's metrics (at `eval_step`) and the last in-loop lm-eval scores, as tables."""
    lines = []
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())
        ]
        lines.append(f"\n(at optimizer step {eval_step})")
    elif not lm_eval_scores:
        lines.append("No evaluation has run yet.")
    if lm_eval_scores:
        lines += ["", f"lm-evaluation-harness (in the training loop, at optimizer step {lm_eval_step}):", "",
                  "| task | metric | value |", "| --- | --- | --- |"]  # fmt: skip
        lines += [
            f"| {k.split('/', 1)[0]} | {k.split('/', 1)[1]} | {v:.4f} |" for k, v in sorted(lm_eval_scores.items())
        ]
    return lines


def _hyperparameter_lines(training_args) -> list[str]:
    """Card bullets for `CARD_HYPERPARAMETERS` that are set, and the total train batch size."""
    lines = []
    for key in CARD_HYPERPARAMETERS:
        value = getattr(training_args, key, None)
        if value is None or (key in ("bf16", "fp16") and not value):
            continue
        if key == "num_train_epochs" and getattr(training_args, "max_steps", -1) > 0:
            continue  # max_steps bounds the run; the epoch count the Trainer ignores would mislead
        lines.append(f"- {key}: {getattr(value, 'value', value)}")
    world = getattr(training_args, "world_size", 1) or 1
    total = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    lines.append(f"- total train batch size: {total} ({world} process{'es' if world > 1 else ''})")
    return lines


def _warmup_line(config, log_history: list[dict]) -> str:
    if not config.activation_auto_switch:
        return f"{config.activation_dense_warmup_steps} optimizer steps"
    rule = (f"automatic (2:4 once it would drop < {config.activation_auto_switch_max_drop} of the non-zero "
            f"activations for {config.activation_auto_switch_window} log rows; at most "
            f"{config.activation_dense_warmup_steps} steps)")  # fmt: skip
    if config.activation_switch_step is None:
        return rule + ", not switched yet"
    reason = switch_reason(config, log_history)
    return rule + f", switched at step {config.activation_warmup_end()}" + (f" (reason: {reason})" if reason else "")


def _dense_tail_line(config) -> str:
    tail = f"the last {config.activation_dense_tail_steps} optimizer steps run the dense FFN"
    if config.activation_dense_tail_step is None:
        return tail + ", not reached yet"
    return tail + f"; dense again from step {config.activation_dense_tail_step} (this model runs dense)"


def write_model_card(
    folder: str, config, log_history: list[dict], training_args=None, dataset_name: str | None = None
) -> str:
    path = os.path.join(folder, "README.md")
    tmp = path + ".tmp"
    title = os.path.basename(os.path.abspath(folder))
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(model_card(config, log_history, title, training_args, dataset_name, folder))
    os.replace(tmp, path)
    return path
