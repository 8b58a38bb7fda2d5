"""Export a finished run's model for inference, with the weights its forward uses.

    python -m hf_sparse.export RUN_DIR OUT_DIR [--dense]

RUN_DIR is a saved `sparse_llama` model folder (config.json + model.safetensors, as
`train_hf.py` / `save_pretrained` write them; a `checkpoint-N` folder works too). A
2:4-weight model stores dense masters plus per-matrix scales and recomputes
``scale · S(W)`` on every forward; the export stores that effective weight itself, so the
exported matrices are genuinely 2:4 along the input dim (at most 2 non-zeros in every group
of 4 consecutive inputs; in low-rank mode each factor along its own input dim) with the
scale folded in, and the scale buffers are gone. Outputs equal the trained model's: bit
for bit at full rank; with low-rank factors to float rounding (~1e-7 in float32: the
stock low-rank forward reads `weight_in` transposed, a different GEMM layout).

What the export contains is the model's *final* forward (``step=None``, as after training),
i.e. exactly what loading RUN_DIR gives (for a mid-run ``checkpoint-N`` too):
- a run that ended in a dense tail (``sparse_dense_finetune_steps > 0``) ran dense weights
  last, so the dense masters are exported (not 2:4) and the card/config say so; with
  ``activation_dense_finetune`` its FFN ran dense activations last too, so the export drops
  ``activation_2by4``;
- everything else in the schedule (start step, warm-up) is history and has no effect.

Architecture of OUT_DIR:
- **stock transformers, no remote code** whenever the final forward is one of (full rank,
  no activation 2:4 in the final forward); ``llama`` is preferred wherever the weights
  allow it, because vLLM runs ``LlamaForCausalLM`` natively and ``ArceeForCausalLM`` only
  through its generic Transformers backend:
    ``squ_relu="silu"``                                 -> ``llama`` (``LlamaForCausalLM``)
    ``squ_relu="relu2"``                                -> ``llama`` with ``hidden_act="relu"``
                                                           and ``gate_proj = up_proj``: relu(z)·z
                                                           is relu(z)², exactly (one more FFN
                                                           matrix than arcee); ``target="arcee"``
                                                           for the compact non-gated form
    ``squ_relu="relu"``                                 -> ``arcee`` (``ArceeForCausalLM``: the
                                                           same Llama body with a non-gated
                                                           ``down(act(up(x)))`` MLP; relu(z) has
                                                           no gated form without a bias)
- otherwise ``sparse_llama`` with its model code copied (load with
  ``trust_remote_code=True``; `hf_sparse` need not be installed): low-rank linears
  (``loro_scope``) and 2:4 activations have no stock equivalent. Its config has
  ``weight_2by4=False``: the stored weights are used as they are.
``--dense`` (``dense=True``) demands a stock architecture and fails with one line saying
why when the model has none. Either way ``config.hf_sparse_export`` records what was done.
"""

import argparse
import copy
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile

import torch
from transformers import ArceeConfig, ArceeForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights
from transformers.utils import logging as transformers_logging

from .training.callbacks.checkpoints import (
    apply_umask_permissions,
    architecture_lines,
    current_umask,
    last_complete_checkpoint,
)
from .training.config.cli_help import tool_prog
from .training.data.tokenizer import LOADER_ARGUMENTS, TOKENIZER_FILES
from .model.configuration_sparse_llama import SparseLlamaConfig
from .model.modeling_sparse_llama import SparseLlamaForCausalLM, set_training_step
from .model.weight_sparse import is_weight_sparse

logger = logging.getLogger(__name__)

__all__ = ["ExportError", "export_model", "stock_architecture", "effective_state_dict", "main"]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
STOCK_ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "arcee": (ArceeConfig, ArceeForCausalLM),
}
STOCK_RULE = (
    "stock exports (full rank, no activation 2:4): squ_relu='silu' -> llama; 'relu2' -> llama (gate_proj = up_proj, "
    "hidden_act relu: relu(z)*z = relu(z)^2) or, with --target arcee, arcee; 'relu' -> arcee; low-rank (loro_scope) "
    "and activation_2by4 need the sparse_llama code"
)
# What each stock target can express, by squ_relu; the first one is the default.
STOCK_TARGETS = {"silu": ("llama",), "relu2": ("llama", "arcee"), "relu": ("arcee",)}
_WHY = {
    ("silu", "llama"): "its SwiGLU FFN is Llama's MLP",
    ("relu2", "llama"): "relu(z)·z = relu(z)², so its ReLU² FFN is Llama's gated MLP with hidden_act relu and "
    "gate_proj = up_proj (exact; 1.5× the FFN weights of the arcee form), and vLLM runs LlamaForCausalLM natively",
    ("relu2", "arcee"): "asked for (target arcee): the non-gated ReLU² FFN as it is; vLLM runs ArceeForCausalLM only "
    "through its Transformers backend",
    ("relu", "arcee"): "a non-gated relu FFN has no Llama form (relu(z) would need a gate of ones); "
    "vLLM runs ArceeForCausalLM only through its Transformers backend",
}


class ExportError(ValueError):
    """A one-line, user-facing reason why the export cannot run."""


def final_activation_2by4(config: SparseLlamaConfig) -> bool:
    """Whether the FFN's final forward (after training, step=None) uses 2:4 activations.

    Mirrors `SparseLlamaMLP.training_step`'s rule at step None: on, unless the run ended in
    a dense tail that covered activations too (`activation_dense_finetune`)."""
    return bool(config.activation_2by4) and not (config.activation_dense_finetune and config.in_dense_tail(None, None))


def stock_architecture(config: SparseLlamaConfig, target: str | None = None) -> tuple[str | None, str]:
    """(stock model_type, "") if the final forward of `config` is a stock transformers
    architecture (`target`, or the preferred one: llama wherever the weights allow it), else
    (None, the reason)."""
    reasons = []
    if config.loro_scope is not None:
        reasons.append(f"low-rank linears (loro_scope={config.loro_scope!r})")
    if final_activation_2by4(config):
        reasons.append("2:4 activations (activation_2by4=True)")
    if reasons:
        return None, " and ".join(reasons)
    targets = STOCK_TARGETS[config.squ_relu]
    if target is not None and target not in targets:
        return None, f"squ_relu={config.squ_relu!r}, which has no {target} form"
    return (target or targets[0]), ""


def architecture_reason(config: SparseLlamaConfig, architecture: str, why_not_stock: str = "") -> str:
    """One sentence for the report and the card: why `architecture` was written."""
    if architecture == "sparse_llama":
        return f"{why_not_stock} have no stock transformers equivalent, so the sparse_llama code ships with it"
    return _WHY[(config.squ_relu, architecture)]


def _gate_from_up(state: dict, sparse_names: list[str]) -> None:
    """Llama form of a ReLU² FFN: gate_proj is a copy of up_proj (a copy, not the same
    tensor: save_pretrained would drop a shared one as tied)."""
    for name in [k for k in state if k.endswith(".mlp.up_proj.weight")]:
        gate = name.replace(".up_proj.", ".gate_proj.")
        state[gate] = state[name].clone()
        if name in sparse_names:
            sparse_names.append(gate)


def _is_2to4(name: str, tensor: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 along the input dim (dim 0 of a low-rank weight_in)."""
    matrix = tensor.t() if name.endswith("weight_in") else tensor
    if matrix.shape[-1] % 4:
        return False
    return bool(((matrix.reshape(matrix.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def effective_state_dict(model: SparseLlamaForCausalLM) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict with every 2:4-weight linear's weights replaced by the weights its
    final forward uses (``scale·S(W)``, or the dense master after a dense tail) and its
    scale buffers dropped; plus the names of the tensors that are 2:4."""
    # step=None: "as the run ended" (sparse unless a dense tail), the state inference uses.
    set_training_step(model, None, None)
    state = model.state_dict()
    sparse_names = []
    for prefix, module in model.named_modules():
        if not is_weight_sparse(module):
            continue
        for key, tensor in module.forward_weights().items():
            name = f"{prefix}.{key}"
            if state[name].shape != tensor.shape:  # forward_weights uses state-dict layouts
                raise RuntimeError(f"{name}: forward weight {tuple(tensor.shape)} vs stored {tuple(state[name].shape)}")
            state[name] = tensor
            if module.sparse_weight_on:
                sparse_names.append(name)
        for key, _ in module.named_buffers(recurse=False):
            if key.endswith("2by4_scale"):
                # The scale is folded into the exported weights; nothing reads it any more.
                state.pop(f"{prefix}.{key}", None)
    return state, sparse_names


def _check_run_dir(run_dir: str) -> dict:
    """config.json of RUN_DIR as a dict, after the checks that need no weights loaded."""
    if not os.path.isdir(run_dir):
        raise ExportError(f"RUN_DIR {run_dir!r} does not exist or is not a directory.")
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        hint = ""
        checkpoint = last_complete_checkpoint(run_dir)
        if checkpoint:
            hint = f"; its last complete checkpoint is {checkpoint!r}, pass that to export it"
        raise ExportError(
            f"RUN_DIR {run_dir!r} has no config.json: not a saved model folder "
            f"(config.json + model.safetensors, as save_pretrained writes them){hint}."
        )
    try:
        with open(config_path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{config_path} is not readable JSON ({err}).") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != SparseLlamaConfig.model_type:
        raise ExportError(
            f"RUN_DIR {run_dir!r} holds a {model_type!r} model, not 'sparse_llama': hf_sparse.export "
            "only exports sparse_llama runs (other models load with transformers as they are)."
        )
    if not any(os.path.isfile(os.path.join(run_dir, name)) for name in WEIGHT_FILES):
        raise ExportError(f"RUN_DIR {run_dir!r} has a config.json but no weights (model.safetensors).")
    return raw


def _check_out_dir(out_dir: str, run_dir: str) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ExportError(f"OUT_DIR {out_dir!r} exists and is not a directory.")
        if os.listdir(out_dir):
            raise ExportError(f"OUT_DIR {out_dir!r} exists and is not empty; choose a new or empty folder.")
    if os.path.abspath(out_dir) == os.path.abspath(run_dir):
        raise ExportError("OUT_DIR must differ from RUN_DIR.")


def _load(run_dir: str) -> SparseLlamaForCausalLM:
    # dtype="auto": keep the stored dtype, so the effective weights are computed (and the
    # exported model runs) in the dtype the trained model runs in.
    model, info = SparseLlamaForCausalLM.from_pretrained(run_dir, dtype="auto", output_loading_info=True)
    # A missing tensor would be randomly initialised and exported as if trained. Scale
    # buffers are the exception: a model saved before its first sparse step has none that
    # mean anything, and the loaded model fixes them from the weights as any load does.
    missing = [k for k in info["missing_keys"] if not k.endswith("2by4_scale")]
    unexpected = list(info["unexpected_keys"])
    mismatched = [k for k, *_ in info.get("mismatched_keys", [])]
    for label, keys in (("lacks", missing), ("has unexpected", unexpected), ("has wrongly shaped", mismatched)):
        if keys:
            raise ExportError(
                f"RUN_DIR {run_dir!r}'s weights {label} tensors for its config.json ({len(keys)}, e.g. {keys[0]}): "
                "was it saved from another config?"
            )
    return model.eval()


def _stock_config(config: SparseLlamaConfig, model_type: str):
    """The stock config with the same body as `config` (fields the stock class has)."""
    config_class, _ = STOCK_ARCHITECTURES[model_type]
    source = config.to_dict()
    skip = {"architectures", "transformers_version", "model_type"}
    values = {
        f.name: source[f.name] for f in dataclasses.fields(config_class) if f.name in source and f.name not in skip
    }
    values["intermediate_size"] = config.ffn_width
    if model_type == "arcee":
        # sparse_llama's non-gated MLP uses ACT2FN[squ_relu] (hidden_act is the SwiGLU one).
        values["hidden_act"] = config.squ_relu
    elif config.squ_relu == "relu2":
        values["hidden_act"] = "relu"  # act(gate)·up with gate = up: relu(z)·z
    return config_class(**values)


def _sparse_llama_config(config: SparseLlamaConfig) -> SparseLlamaConfig:
    """`config` with the training schedule baked in: stored weights used as they are."""
    exported = copy.deepcopy(config)
    exported.activation_2by4 = final_activation_2by4(config)
    exported.weight_2by4 = False  # no Sparse24 linears, no scale buffers: weights are final
    # The schedule is over: a tail/start step left in the config would switch things again
    # if the exported model were trained on.
    exported.weight_2by4_start_step = 0
    exported.sparse_dense_finetune_steps = 0
    exported.activation_dense_finetune = False
    exported.auto_map = None  # rewritten by save_pretrained for the copied code
    return exported


def _target_model(config, model_class, dtype):
    # On the meta device and without init: only the key set, shapes, config and code
    # references are needed; the tensors come from the effective state dict.
    with no_init_weights(), torch.device("meta"):
        target = model_class(config)
    return target.to(dtype)


def _check_keys(state: dict, target) -> None:
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    # Tied embeddings appear under both names in both dicts; save_pretrained drops the alias.
    if expected != have:
        diff = sorted(set(expected.items()) ^ set(have.items()))
        raise RuntimeError(f"export state dict does not match {type(target).__name__}: {diff[:4]}")


def _eval_row(run_dir: str) -> dict:
    path = os.path.join(run_dir, "trainer_state.json")
    try:
        with open(path, encoding="utf-8") as handle:
            history = json.load(handle).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return {}
    rows = [row for row in history if isinstance(row, dict) and "eval_loss" in row]
    return rows[-1] if rows else {}


def _model_card(source: SparseLlamaConfig, info: dict, run_dir: str, title: str) -> str:
    lines = _card_front_matter(info) + _card_introduction(info, run_dir, title)
    lines += ["", "## Model", "", *architecture_lines(source)]
    lines += ["", "## Sparsity", "", *_card_sparsity_lines(source, info)]
    lines += _card_evaluation_lines(run_dir)
    return "\n".join(lines) + "\n"


def _card_front_matter(info: dict) -> list[str]:
    """The card's YAML metadata: library, tags (architecture, which 2:4 the weights carry), pipeline."""
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- hf_sparse",
        f"- {info['architecture']}",
    ]
    if info["weight_2by4"]:
        lines.append("- 2:4-weight-sparsity")
    if info["activation_2by4"]:
        lines.append("- 2:4-activation-sparsity")
    return lines + ["pipeline_tag: text-generation", "---"]


def _card_introduction(info: dict, run_dir: str, title: str) -> list[str]:
    """Title, provenance, how to load the architecture written and why it was chosen."""
    lines = [
        "",
        f"# {title}",
        "",
        f"Inference export of the `hf_sparse` run `{os.path.basename(os.path.abspath(run_dir))}` "
        "(`python -m hf_sparse.export`): the weights are exactly those the trained model's forward used.",
        "",
    ]
    if info["architecture"] != "sparse_llama":
        cls = STOCK_ARCHITECTURES[info["architecture"]][1].__name__
        lines.append(
            f"Architecture `{info['architecture']}` (`{cls}`): loads with stock transformers, "
            "`AutoModelForCausalLM.from_pretrained(path)`, no remote code."
        )
    else:
        lines.append(
            "Architecture `sparse_llama`: load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`; "
            "the model code ships with the weights, `hf_sparse` need not be installed."
        )
    return lines + [
        f"Why this architecture: {info['why']}.",
        "",
        "Serving: no serving stack accelerates 2:4 weights today "
        "(vLLM 0.33 removed its 2:4 path); the 2:4 zeros are stored dense and run as dense GEMMs.",
    ]


def _card_sparsity_lines(source: SparseLlamaConfig, info: dict) -> list[str]:
    """Bullets on the sparsity the exported weights and forward have, and what training had."""
    lines = []
    if info["weight_2by4"]:
        factors = " (each low-rank factor along its own input dim)" if source.loro_scope else ""
        lines.append(
            f"- 2:4 weights on `{source.weight_2by4_scope}` (`{source.weight_sparse_method}`): at most 2 non-zeros in "
            f"every group of 4 consecutive inputs{factors}, scale folded in; stored dense (zeros included), "
            f"{len(info['weight_2by4_tensors'])} tensors"
        )
    elif info["dense_tail"] and source.weight_2by4:
        lines.append(
            f"- trained with 2:4 weights, then {source.sparse_dense_finetune_steps} dense fine-tuning steps: "
            "the final weights are dense"
        )
    else:
        lines.append("- dense weights")
    if info["activation_2by4"]:
        lines.append(f"- 2:4 activation sparsity on the ReLU² output (`{source.activation_sparse_method}`)")
    elif source.activation_2by4:
        lines.append("- trained with 2:4 activations, dense in the final (dense-tail) forward")
    return lines


def _card_evaluation_lines(run_dir: str) -> list[str]:
    """The training run's last evaluation as a table (none when the run logged no evaluation)."""
    eval_row = _eval_row(run_dir)
    metrics = {
        k: v for k, v in eval_row.items() if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))
    }
    if not metrics:
        return []
    lines = ["", "## Evaluation (training run)", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    lines.append(f"\n(at optimizer step {eval_row.get('step')})")
    return lines


def _copy_tokenizer_file(source: str, target: str) -> None:
    """Copy a tokenizer file; tokenizer_config.json without the loader arguments that
    transformers 5.24 saves (a run saved offline would ask for local files only forever)."""
    if os.path.basename(source) != "tokenizer_config.json":
        shutil.copy2(source, target)
        return
    with open(source, encoding="utf-8") as handle:
        config = json.load(handle)
    for key in LOADER_ARGUMENTS:
        config.pop(key, None)
    with open(target, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _choose_architecture(raw: dict, run_dir: str, dense: bool, target: str | None) -> tuple[str | None, str]:
    """`stock_architecture` of RUN_DIR's config.json (`raw`), after checking that the config
    is valid and that `--dense` / `--target` can be honoured."""
    try:
        config = SparseLlamaConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise ExportError(f"RUN_DIR {run_dir!r} has an invalid sparse_llama config.json: {err}") from None
    if target is not None and target not in STOCK_ARCHITECTURES:
        raise ExportError(
            f"--target {target!r} is not valid; choose one of {', '.join(map(repr, STOCK_ARCHITECTURES))}."
        )
    stock, reason = stock_architecture(config, target)
    if (dense or target) and stock is None:
        flag = f"--target {target}" if target else "--dense"
        raise ExportError(
            f"{flag}: this model has no such stock transformers architecture: it has {reason} ({STOCK_RULE})."
        )
    return stock, reason


def _export_state_dict(model: SparseLlamaForCausalLM, stock: str | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`effective_state_dict` in the layout of the `stock` target (or sparse_llama), with
    the names of the 2:4 tensors only when all of them really are 2:4."""
    state, sparse_names = effective_state_dict(model)
    if stock == "llama" and model.config.squ_relu == "relu2":
        _gate_from_up(state, sparse_names)
    # Labelled 2:4 only when the stored tensors are (a dense tail's masters are not).
    if not all(_is_2to4(name, state[name]) for name in sparse_names):
        logger.warning("the weights the final forward uses are not all 2:4; the export is labelled dense.")
        sparse_names = []
    return state, sparse_names


def _export_config(config: SparseLlamaConfig, stock: str | None, info: dict):
    """(config, model class) of the exported model, the config carrying `hf_sparse_export`."""
    if stock:
        export_config = _stock_config(config, stock)
        model_class = STOCK_ARCHITECTURES[stock][1]
    else:
        export_config = _sparse_llama_config(config)
        model_class = SparseLlamaForCausalLM
    # Provenance for users and tools; the forward never reads it. Tensor names are listed
    # in the card only by count: a config.json should stay readable at any model size.
    export_config.hf_sparse_export = {
        "source_model_type": "sparse_llama",
        "weight_2by4": info["weight_2by4"],
        "weight_2by4_scope": config.weight_2by4_scope if info["weight_2by4"] else None,
        "weight_sparse_method": config.weight_sparse_method if info["weight_2by4"] else None,
        # Groups of 4 run along each stored matrix's input dim: dim 1 of an out×in weight
        # and of a low-rank weight_out (out×r), dim 0 of a low-rank weight_in (in×r).
        "weight_2by4_groups": "input dim" if info["weight_2by4"] else None,
        "dense_tail": info["dense_tail"],
        "activation_2by4": info["activation_2by4"],
        "architecture_reason": info["why"],
    }
    return export_config, model_class


def _write_export(target_model, state: dict, config: SparseLlamaConfig, info: dict, run_dir: str, out_dir: str) -> None:
    """Save the model, RUN_DIR's tokenizer files and the card to OUT_DIR, all or nothing."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # Written beside OUT_DIR and renamed at the end: a failed export leaves no half folder.
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.export-", dir=parent)
    try:
        # mkdtemp makes the folder private (0700); the renamed export would stay unreadable
        # to any other user, e.g. a serving container running as another uid.
        os.chmod(staging, 0o777 & ~current_umask())
        target_model.save_pretrained(staging, state_dict=state)
        apply_umask_permissions(staging)  # safetensors writes model.safetensors 0600
        _copy_tokenizer_files(run_dir, staging)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(_model_card(config, info, run_dir, os.path.basename(os.path.abspath(out_dir))))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above); a rename cannot replace it otherwise
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _copy_tokenizer_files(run_dir: str, staging: str) -> None:
    """Copy RUN_DIR's tokenizer files into `staging`; an export without them is only warned about."""
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            _copy_tokenizer_file(path, os.path.join(staging, name))
            copied.append(name)
    if not copied:
        logger.warning("%s has no tokenizer files: the export holds the model only.", run_dir)


def export_model(run_dir: str, out_dir: str, dense: bool = False, target: str | None = None) -> str:
    """Write the inference export of the sparse_llama model in `run_dir` to `out_dir`;
    return `out_dir`.

    The exported weights are those of the model's final forward (2:4 with the scale folded
    in, or dense after a dense tail), so outputs equal the trained model's. The folder is a
    stock model whenever the model allows it (full rank, no activation 2:4 in the final
    forward): `llama` for silu and relu2, `arcee` for relu or when `target="arcee"`; else a
    `sparse_llama` one with its code. `dense=True` (or a `target`) requires a stock
    architecture and raises `ExportError` otherwise. Tokenizer files are copied; `out_dir`
    must be new or empty, appears only once complete, and is readable like any folder
    save_pretrained makes (the umask's permissions, not mkdtemp's private 0700).
    """
    raw = _check_run_dir(run_dir)
    _check_out_dir(out_dir, run_dir)
    # Decide from the config before paying for the weights.
    stock, reason = _choose_architecture(raw, run_dir, dense, target)

    model = _load(run_dir)
    config = model.config
    state, sparse_names = _export_state_dict(model, stock)
    info = {
        "architecture": stock or "sparse_llama",
        "why": architecture_reason(config, stock or "sparse_llama", reason),
        "weight_2by4": bool(sparse_names),  # stored weights are 2:4 (false after a dense tail)
        "weight_2by4_tensors": sparse_names,
        "activation_2by4": final_activation_2by4(config),
        "dense_tail": config.in_dense_tail(None, None),
    }
    export_config, model_class = _export_config(config, stock, info)
    target_model = _target_model(export_config, model_class, model.dtype)
    target_model.generation_config = copy.deepcopy(model.generation_config)
    _check_keys(state, target_model)
    _write_export(target_model, state, config, info, run_dir, out_dir)
    what = f"{len(sparse_names)} 2:4 weight tensors" if sparse_names else "dense weights"
    if info["dense_tail"] and config.weight_2by4:
        what += " (the run ended in a dense tail: its final weights are dense)"
    logger.info("exported %s as %s with %s to %s", run_dir, info["architecture"], what, os.path.abspath(out_dir))
    logger.info("architecture %s: %s", info["architecture"], info["why"])
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=tool_prog("hf-sparse-export", "hf_sparse.export"),
        description="Write a finished sparse_llama run's model with the weights its forward uses "
        "(2:4 weights stored as such, scale folded in). " + STOCK_RULE[0].upper() + STOCK_RULE[1:] + ".",
    )
    parser.add_argument("run_dir", help="saved model folder of a run (config.json + model.safetensors)")
    parser.add_argument("out_dir", help="new or empty folder to write")
    parser.add_argument(
        "--target",
        choices=sorted(STOCK_ARCHITECTURES),
        help="the stock architecture to write (default: llama wherever the weights allow it, native in vLLM; "
        "arcee for the compact non-gated form of a relu2 model)",
    )
    parser.add_argument(
        "--dense",
        action="store_true",
        help="require a stock transformers architecture (llama/arcee; fail if the model has none). "
        "Without it, the stock architecture is still used whenever the model allows it.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    # The load/save progress bars of a few tensors add nothing to the one-line summary.
    transformers_logging.disable_progress_bar()
    try:
        export_model(args.run_dir, args.out_dir, dense=args.dense, target=args.target)
    except ExportError as err:
        logger.error("error: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
