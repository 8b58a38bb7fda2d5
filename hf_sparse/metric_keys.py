"""The names of the metrics hf_sparse adds to the Trainer's log rows (wandb, TensorBoard,
`trainer_state.json`): declared once here, for the code that writes them (telemetry, the
callbacks, the auto switch) and the code that reads them back (report, model card).

Per-layer metrics are `<family>/layer_{i}` with a `<family>/mean_across_layers` beside them;
the names are the public contract of DESIGN.md (the research script's wandb keys).
"""

# Fraction of ReLU² activations that are exactly zero, per layer.
ACTIVATION_ZEROS = "sparsity_relu"
# Fraction of non-zero activations the 2:4 rule drops (or, while dense, would drop).
DROP_24 = "sparsity_24"
# Fraction of non-zero activations that keeping the N largest of each M consecutive features
# would drop: sparsity_nm/<N>:<M>/layer_{i} and sparsity_nm/<N>:<M>/mean_across_layers.
NM_DROP = "sparsity_nm"
# Exact-zero fraction of the weights the forward uses: weight_sparsity/layer_{i}/<matrix>.
WEIGHT_ZEROS = "weight_sparsity"
# 2:4 weight-mask flip rate: flip_rate/layer_{i}/<matrix>, and the summaries below.
FLIP_RATE = "flip_rate"
FLIP_RATE_MEAN = "flip_rate/mean"
FLIP_RATE_MAX = "flip_rate/max"
FLIP_RATE_TOTAL = "flip_rate/total"
# The L1 term activation_l1 added to the training loss (per forward, all layers).
ACTIVATION_L1_LOSS = "activation_l1/loss"
# The 2:4 drop pooled over layers and ranks: what the auto switch reads.
AUTO_SWITCH_DROP = "activation_auto_switch/drop"
# The optimizer step at which the auto switch turned 2:4 activations on (logged once), and
# why: "threshold" or "cap" (a string: TensorBoard keeps it as text).
SWITCH_STEP = "activation_switch_step"
SWITCH_REASON = "activation_switch_reason"
# The optimizer step from which the FFN ran dense again (activation_dense_tail_steps).
DENSE_TAIL_STEP = "activation_dense_tail_step"
# Added to each evaluation row: exp(eval_loss).
EVAL_PERPLEXITY = "eval_perplexity"
# Steps the non-finite guard skipped (nonfinite_policy "skip").
SKIPPED_STEPS = "numerics/skipped_steps"
# In-loop downstream scores: lm_eval/<task>/<metric>.
LM_EVAL = "lm_eval"
# LORO: exact Riemannian steps taken so far, and whether the last step was one.
LORO_EXACT_STEPS = "loro/exact_steps"
LORO_LAST_STEP_EXACT = "loro/last_step_exact"

MEAN_ACROSS_LAYERS = "mean_across_layers"
# The per-layer activation families the activation-metrics switch covers.
ACTIVATION_FAMILIES = (ACTIVATION_ZEROS, DROP_24, NM_DROP)


def layer_key(family: str, layer_idx: int) -> str:
    """`<family>/layer_{i}`."""
    return f"{family}/layer_{layer_idx}"


def mean_key(family: str) -> str:
    """`<family>/mean_across_layers`."""
    return f"{family}/{MEAN_ACROSS_LAYERS}"


def nm_family(n: int, m: int) -> str:
    """`sparsity_nm/<N>:<M>`: the family of one N:M pattern's would-drop fractions."""
    return f"{NM_DROP}/{n}:{m}"


def in_family(key: str, *families: str) -> bool:
    """Whether `key` is one of the `<family>/...` metrics of `families`."""
    return key.startswith(tuple(family + "/" for family in families))
