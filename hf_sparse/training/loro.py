"""LORO optimizer (Mo et al., ICLR 2025) and its cosine-with-restarts LR schedule.

`LOROAdamW` trains `LowRankLinear` factor pairs (M = weight_out, N = weight_in,
W = M N^T) with cheap "lazy" Adam steps on the factors and, every `loro_freq` steps, an
exact Riemannian step of W on the manifold of rank-r matrices. All other parameters get
standard AdamW. Nothing here forms an out x in matrix.

Exact step, from the factor directions only (the full gradient G is never available):
with M = Q_M R_M and N = Q_N R_N (thin QR), G N = dM and G^T M = dN give
    A = G Q_N = dM R_N^-1,  B = G^T Q_M = dN R_M^-1,  K = Q_M^T G Q_N = Q_M^T A = B^T Q_N.
With A_p = (I - Q_M Q_M^T) A and B_p = (I - Q_N Q_N^T) B, the tangent projection is
    P_T(G) = Q_M K Q_N^T + A_p Q_N^T + Q_M B_p^T
so  W - lr P_T(G) = [Q_M, A_p] C [Q_N, B_p]^T,  C = [[R_M R_N^T - lr K, -lr I], [-lr I, 0]].
Thin QRs [Q_M, A_p] = U_L R_L and [Q_N, B_p] = U_R R_R reduce the best rank-r
approximation to an SVD of the 2r x 2r core R_L C R_R^T = U S V^T; the new balanced
factors are M = U_L U_r S_r^1/2 and N = U_R V_r S_r^1/2 (M^T M = N^T N = S_r).
"""

import functools
import logging
import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .. import metric_keys as keys
from ..model.lowrank import is_low_rank
from .callbacks.core import _FirstCallback, merge_into_log_row

logger = logging.getLogger(__name__)

LORO_TYPES = ("loro", "eucl")
LORO_REFRESH_CHOICES = (None, "all", "lrk", "reg")

_REGULAR = "regular"
_LOW_RANK = "lowrank"
_REFRESH_KINDS = {"all": (_REGULAR, _LOW_RANK), "lrk": (_LOW_RANK,), "reg": (_REGULAR,)}

# Exact steps stack same-shaped pairs so the QR/SVD calls run batched (one launch per
# chunk on GPU instead of one per layer). A chunk holds at most 2^22 factor elements:
# its float32 temporaries (about 8 copies) then stay near 128 MiB whatever the model size.
_EXACT_CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(dtype):
    # QR/SVD in bf16/fp16 are unsupported or inaccurate; float64 inputs keep float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def loro_exact_update(M, N, dM, dN, lr):
    """One exact LORO step of W = M N^T; returns balanced `(M_new, N_new)`.

    `dM` and `dN` are the factor directions, treated as G N and G^T M of an implied full
    gradient G. The result satisfies M_new N_new^T = best rank-r approximation of
    W - lr * P_T(G), with M_new^T M_new = N_new^T N_new = diag(singular values).
    Accepts leading batch dimensions. Computes in float32 (float64 for float64 inputs)
    and returns the input dtype. Memory is O((in + out) r + r^2) per pair.
    """
    out_dtype = M.dtype
    cdt = _compute_dtype(out_dtype)
    r = M.shape[-1]
    batch = M.shape[:-2]
    device = M.device
    # Intermediates are deleted as soon as they are used: the step is memory-bound on
    # large models, and the peak is what decides whether it fits.
    q_m, r_m = torch.linalg.qr(M.to(cdt))
    q_n, r_n = torch.linalg.qr(N.to(cdt))
    # G Q_N = (G N) R_N^-1 and G^T Q_M = (G^T M) R_M^-1: triangular solves, no inverse.
    a = torch.linalg.solve_triangular(r_n, dM.to(cdt), upper=True, left=False)
    b = torch.linalg.solve_triangular(r_m, dN.to(cdt), upper=True, left=False)
    t_a = q_m.mT @ a  # Q_M^T G Q_N, from dM
    t_b = q_n.mT @ b  # (Q_M^T G Q_N)^T, from dN
    # Adam-normalised directions need not come from one G, so the two estimates of the
    # shared block can differ; averaging them keeps the step symmetric in M and N.
    k = 0.5 * (t_a + t_b.mT)
    # a <- (I - Q_M Q_M^T) a and b <- (I - Q_N Q_N^T) b, in place.
    a -= q_m @ t_a
    b -= q_n @ t_b
    del t_a, t_b

    # QR of the concatenation (not of the projected part alone) keeps U_L orthonormal
    # even when that part is rank deficient (e.g. 2r > out), so the truncated core SVD
    # stays optimal and balanced.
    u_l, r_l = torch.linalg.qr(torch.cat([q_m, a], dim=-1))
    del q_m, a
    u_r, r_r = torch.linalg.qr(torch.cat([q_n, b], dim=-1))
    del q_n, b

    eye = torch.eye(r, dtype=cdt, device=device).expand(*batch, r, r)
    top = torch.cat([r_m @ r_n.mT - lr * k, -lr * eye], dim=-1)
    bottom = torch.cat([-lr * eye, torch.zeros_like(eye)], dim=-1)
    core = r_l @ torch.cat([top, bottom], dim=-2) @ r_r.mT

    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    sqrt_s = s[..., :r].sqrt().unsqueeze(-2)
    M_new = (u_l @ (u_c[..., :, :r] * sqrt_s)).to(out_dtype)
    del u_l
    N_new = (u_r @ (vh_c[..., :r, :].mT * sqrt_s)).to(out_dtype)
    return M_new, N_new


def _check_positive_int(key, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be a positive int.")


def _check_adamw_args(lr, betas, eps, weight_decay):
    """AdamW's hyper-parameter ranges; a ValueError names the first argument out of range."""
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr={lr!r} must be a non-negative float.")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas={betas!r} must be two floats in [0, 1).")
    if not eps >= 0:
        raise ValueError(f"eps={eps!r} must be >= 0.")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be >= 0.")


def _checked_loro_args(loro_type, loro_freq, loro_refresh, loro_refresh_freq, loro_lr_scaler, hidden_size):
    """(loro_refresh, loro_lr_scaler) normalised ("none" -> None, a float scaler) after
    checking every LORO argument."""
    if loro_type not in LORO_TYPES:
        raise ValueError(f"loro_type={loro_type!r} is not valid; choose one of {LORO_TYPES}.")
    _check_positive_int("loro_freq", loro_freq)
    if isinstance(loro_refresh, str) and loro_refresh.lower() in ("", "none"):
        loro_refresh = None
    if loro_refresh not in LORO_REFRESH_CHOICES:
        raise ValueError(f"loro_refresh={loro_refresh!r} is not valid; choose one of {LORO_REFRESH_CHOICES}.")
    if loro_refresh is not None:
        _check_positive_int("loro_refresh_freq", loro_refresh_freq)
    try:
        loro_lr_scaler = float(loro_lr_scaler)
    except (TypeError, ValueError):
        raise ValueError(f"loro_lr_scaler={loro_lr_scaler!r} must be -1 or a positive float.") from None
    if not (loro_lr_scaler == -1.0 or (loro_lr_scaler > 0 and math.isfinite(loro_lr_scaler))):
        raise ValueError(f"loro_lr_scaler={loro_lr_scaler!r} must be -1 (rank / hidden_size) or a positive float.")
    if hidden_size is not None:
        _check_positive_int("hidden_size", hidden_size)
    return loro_refresh, loro_lr_scaler


def _split_param_groups(params_or_groups, pairs):
    """The caller's param groups without the factors of `pairs` (tagged regular), plus one
    low-rank group holding all the factors (when there are pairs)."""
    factor_ids = {id(p) for pair in pairs for p in pair}
    groups = list(params_or_groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    regular_groups = []
    for group in groups:
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group["params"] = [p for p in params if id(p) not in factor_ids]
        group["loro_kind"] = _REGULAR
        # A group left empty by moving the factors out is dropped, not kept empty.
        if group["params"]:
            regular_groups.append(group)
    if not pairs:
        return regular_groups
    return regular_groups + [{"params": [p for pair in pairs for p in pair], "loro_kind": _LOW_RANK}]


def _lazy_scales(pairs, loro_lr_scaler, hidden_size):
    """{factor: lazy-step lr multiplier}: `loro_lr_scaler`, or when it is -1 rank / hidden_size
    (rank / min(out, in) of each pair without a hidden_size); a pair's two factors share it."""
    scales = {}
    for M, N in pairs:
        if loro_lr_scaler > 0:
            scale = loro_lr_scaler
        else:
            width = hidden_size if hidden_size is not None else min(M.shape[0], N.shape[0])
            scale = M.shape[1] / width
        scales[M] = scales[N] = scale
    return scales


class LOROAdamW(Optimizer):
    """AdamW for regular parameters plus LORO updates for low-rank factor pairs.

    Args:
        params_or_groups: parameters or param-group dicts (regular parameters; factor
            parameters found here are moved to the low-rank group).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (decoupled weight decay,
            bias-corrected moments, as `torch.optim.AdamW`).
        low_rank_pairs: `(weight_out, weight_in)` of each low-rank linear. They form one
            dedicated param group (`group["loro_kind"] == "lowrank"`) that uses the
            constructor's lr/betas/eps/weight_decay.
        loro_freq: optimizer step k is an exact Riemannian step iff k % loro_freq == 0
            (k counts from 1); `loro_type="eucl"` never takes one.
        loro_refresh: None, `"all"`, `"lrk"` (factors) or `"reg"` (regular params):
            whose Adam moments are zeroed after every `loro_refresh_freq`-th step.
        loro_lr_scaler: lazy factor steps use lr * s with s = loro_lr_scaler, or
            s = rank / hidden_size when it is -1. Exact steps use the plain lr (the
            tangent projection needs no rescaling), as in the LORO reference code.
        hidden_size: model width for s = r / hidden_size; if None each pair uses
            min(in_features, out_features) (the hidden size for Llama projections).

    Decisions: weight decay multiplies both factors by (1 - lr * weight_decay) before
    every low-rank update (lazy or exact), as AdamW does for any parameter. A refresh
    zeroes the moments and resets that parameter's step counter to 0, so bias correction
    restarts with the moments and the first post-refresh step is a proper Adam step.
    The global step counter lives in every param group (`loro_step`, `loro_exact_steps`)
    so `state_dict()` / `load_state_dict()` (the HF Trainer checkpoint) resume the
    exact-step and refresh schedule.
    """

    def __init__(
        self,
        params_or_groups,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        *,
        low_rank_pairs=(),
        loro_freq=500,
        loro_refresh=None,
        loro_refresh_freq=500,
        loro_lr_scaler=-1.0,
        loro_type="loro",
        hidden_size=None,
    ):
        _check_adamw_args(lr, betas, eps, weight_decay)
        loro_refresh, loro_lr_scaler = _checked_loro_args(
            loro_type, loro_freq, loro_refresh, loro_refresh_freq, loro_lr_scaler, hidden_size
        )

        pairs = self._check_pairs(low_rank_pairs)
        all_groups = _split_param_groups(params_or_groups, pairs)

        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            loro_kind=_REGULAR,
            loro_step=0,
            loro_exact_steps=0,
        )
        super().__init__(all_groups, defaults)

        self.low_rank_pairs = pairs
        self.loro_freq = loro_freq
        self.loro_refresh = loro_refresh
        self.loro_refresh_freq = loro_refresh_freq
        self.loro_lr_scaler = loro_lr_scaler
        self.loro_type = loro_type
        self.hidden_size = hidden_size
        self._lazy_scale = _lazy_scales(pairs, loro_lr_scaler, hidden_size)

    @staticmethod
    def _check_pairs(low_rank_pairs):
        pairs, seen = [], set()
        for pair in low_rank_pairs:
            if len(pair) != 2:
                raise ValueError("low_rank_pairs must hold (weight_out, weight_in) tuples.")
            M, N = pair
            if M.dim() != 2 or N.dim() != 2 or M.shape[1] != N.shape[1]:
                raise ValueError(
                    f"low_rank_pairs: expected (out x r, in x r) factors, got {tuple(M.shape)} and {tuple(N.shape)}."
                )
            if id(M) in seen or id(N) in seen or M is N:
                raise ValueError("low_rank_pairs: a factor parameter appears more than once.")
            seen.update((id(M), id(N)))
            pairs.append((M, N))
        return pairs

    @classmethod
    def from_model(cls, model, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, hidden_size=None, **loro_kwargs):
        """Build the optimizer for every low-rank linear of `model` plus its other parameters.

        Regular parameters are split like the HF Trainer does: 2-D and larger tensors
        (linears, embeddings) get `weight_decay`, 1-D ones (biases, norm scales) get none.
        `hidden_size` defaults to `model.config.hidden_size`. Frozen parameters are left out.
        """
        pairs = [
            (module.weight_out, module.weight_in)
            for module in model.modules()
            if is_low_rank(module) and module.weight_out.requires_grad and module.weight_in.requires_grad
        ]
        factor_ids = {id(p) for pair in pairs for p in pair}
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad and id(p) not in factor_ids:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if hidden_size is None:
            hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        logger.info(
            "LOROAdamW: %d low-rank pairs (%d factor params), %d regular params, hidden_size=%s",
            len(pairs),
            sum(p.numel() for pair in pairs for p in pair),
            sum(p.numel() for p in decay + no_decay),
            hidden_size,
        )
        return cls(
            groups,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            low_rank_pairs=pairs,
            hidden_size=hidden_size,
            **loro_kwargs,
        )

    # ---- bookkeeping -----------------------------------------------------------------

    @property
    def loro_step(self):
        """Optimizer steps taken so far (restored by `load_state_dict`)."""
        return max((g.get("loro_step", 0) for g in self.param_groups), default=0)

    @property
    def num_exact_steps(self):
        """Exact Riemannian steps taken so far (restored by `load_state_dict`)."""
        return max((g.get("loro_exact_steps", 0) for g in self.param_groups), default=0)

    @property
    def last_step_was_exact(self):
        """Whether the most recent step was an exact one (derived, so right after resume too)."""
        return self.loro_step > 0 and self.is_exact_step(self.loro_step)

    def is_exact_step(self, step):
        """Whether optimizer step `step` (counted from 1) is an exact Riemannian step.

        Never without low-rank pairs: a full-rank model under LOROAdamW is plain AdamW.
        """
        return bool(self.low_rank_pairs) and self.loro_type == "loro" and step % self.loro_freq == 0

    @torch.no_grad()
    def refresh_states(self, mode):
        """Zero the Adam moments (and step counters) of `"all"`, `"lrk"` or `"reg"` params."""
        if mode not in _REFRESH_KINDS:
            raise ValueError(f"loro_refresh={mode!r} is not valid; choose one of {tuple(_REFRESH_KINDS)}.")
        kinds = _REFRESH_KINDS[mode]
        for group in self.param_groups:
            if group.get("loro_kind", _REGULAR) not in kinds:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state and "exp_avg" in state:
                    state["exp_avg"].zero_()
                    state["exp_avg_sq"].zero_()
                    state["step"] = 0

    # ---- the step --------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # One global count (max over groups, so a group added later by add_param_group
        # joins it) decides the exact/refresh schedule for every pair alike.
        k = self.loro_step + 1
        exact = self.is_exact_step(k)
        for group in self.param_groups:
            group["loro_step"] = k
            if exact:
                group["loro_exact_steps"] = group.get("loro_exact_steps", 0) + 1
            if group.get("loro_kind", _REGULAR) == _LOW_RANK:
                self._low_rank_step(group, exact)
            else:
                self._adamw_step(group)

        # After the update, so the step that follows a refresh starts from zero moments.
        if self.loro_refresh is not None and k % self.loro_refresh_freq == 0:
            self.refresh_states(self.loro_refresh)
        return loss

    def _update_moments(self, group):
        """Update Adam moments of the group's params with gradients.

        Returns (params, exp_avgs, denoms, bias_correction1) with
        denom = sqrt(v / bias_correction2) + eps, or None when no param has a gradient.
        Bias corrections come from Python-int step counters: no device sync.
        """
        beta1, beta2 = group["betas"]
        params, grads, exp_avgs, exp_avg_sqs, bc1, bc2_sqrt = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LOROAdamW does not support sparse gradients.")
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            bc1.append(1.0 - beta1 ** state["step"])
            bc2_sqrt.append(math.sqrt(1.0 - beta2 ** state["step"]))
        if not params:
            return None
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, bc2_sqrt)
        torch._foreach_add_(denoms, group["eps"])
        return params, exp_avgs, denoms, bc1

    def _moments_and_decay(self, group):
        """Adam moments updated and decoupled weight decay applied; None if nothing to step."""
        moments = self._update_moments(group)
        if moments is not None and group["weight_decay"] != 0:
            torch._foreach_mul_(moments[0], 1.0 - group["lr"] * group["weight_decay"])
        return moments

    def _adamw_step(self, group):
        moments = self._moments_and_decay(group)
        if moments is None:
            return
        params, exp_avgs, denoms, bc1 = moments
        lr = group["lr"]
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / b for b in bc1])

    def _low_rank_step(self, group, exact):
        moments = self._moments_and_decay(group)
        if moments is None:
            return
        params, exp_avgs, denoms, bc1 = moments
        lr = group["lr"]
        if not exact:
            # Lazy step: AdamW on each factor with the lr scaled by s.
            scales = [-lr * self._lazy_scale.get(p, 1.0) / b for p, b in zip(params, bc1)]
            torch._foreach_addcdiv_(params, exp_avgs, denoms, scales)
            return
        # Directions m_hat / (sqrt(v_hat) + eps), built in the denominator buffers so the
        # exact step needs no second copy of all factors.
        torch._foreach_reciprocal_(denoms)
        torch._foreach_mul_(denoms, exp_avgs)
        torch._foreach_div_(denoms, bc1)
        self._exact_step(dict(zip(params, denoms)), lr)

    def _exact_step(self, directions, lr):
        # Group same-shaped pairs so QR/SVD run batched.
        buckets = {}
        for M, N in self.low_rank_pairs:
            # Pairs with no gradient at all (frozen or unused this step) keep their factors.
            dM, dN = directions.get(M), directions.get(N)
            if dM is None and dN is None:
                continue
            # A factor without a gradient contributes a zero direction (G N = 0 or G^T M = 0).
            dM = torch.zeros_like(M) if dM is None else dM
            dN = torch.zeros_like(N) if dN is None else dN
            key = (tuple(M.shape), tuple(N.shape), M.dtype, M.device)
            buckets.setdefault(key, []).append((M, N, dM, dN))
        for (m_shape, n_shape, _, _), items in buckets.items():
            chunk = max(1, _EXACT_CHUNK_ELEMENTS // ((m_shape[0] + n_shape[0]) * m_shape[1]))
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                stacked = [torch.stack([item[i] for item in part]) for i in range(4)]
                M_new, N_new = loro_exact_update(*stacked, lr)
                for (M, N, _, _), m_new, n_new in zip(part, M_new, N_new):
                    M.copy_(m_new)
                    N.copy_(n_new)


def _cosine_restart_lambda(
    step, *, num_warmup_steps, num_training_steps, min_lr_ratio, restart_every, restart_warmup_steps
):
    if step < num_warmup_steps:
        factor = step / max(1, num_warmup_steps)
    else:
        progress = min(1.0, (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps))
        factor = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if restart_every and restart_warmup_steps > 0 and step >= restart_every:
        offset = step % restart_every
        if offset < restart_warmup_steps:
            factor *= offset / restart_warmup_steps
    return factor


def get_cosine_restart_schedule(
    optimizer,
    num_warmup_steps,
    num_training_steps,
    min_lr_ratio=0.1,
    restart_every=None,
    restart_warmup_steps=0,
    last_epoch=-1,
):
    """Linear warm-up, cosine decay to `min_lr_ratio`, and re-warm-ups after restarts.

    The multiplier at scheduler step t is the warm-up/cosine value times
    (t % restart_every) / restart_warmup_steps inside each re-warm-up window
    (t >= restart_every and t % restart_every < restart_warmup_steps).

    Alignment with `LOROAdamW`: the optimizer step k runs with the multiplier at t = k - 1,
    and a refresh happens after step n * restart_every, so the first step on fresh Adam
    moments (whose first direction is sign-like, the largest possible) runs at lr 0 and
    the lr climbs back over `restart_warmup_steps` steps. Set `restart_every` to
    `loro_refresh_freq` (the LORO recipe uses one period for exact steps and refreshes).
    """
    _check_positive_int("num_training_steps", num_training_steps)
    if isinstance(num_warmup_steps, bool) or not isinstance(num_warmup_steps, int) or num_warmup_steps < 0:
        raise ValueError(f"num_warmup_steps={num_warmup_steps!r} must be a non-negative int.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio!r} must be in [0, 1].")
    if restart_every is not None:
        _check_positive_int("restart_every", restart_every)
    if isinstance(restart_warmup_steps, bool) or not isinstance(restart_warmup_steps, int) or restart_warmup_steps < 0:
        raise ValueError(f"restart_warmup_steps={restart_warmup_steps!r} must be a non-negative int.")
    if restart_every is not None and restart_warmup_steps >= restart_every:
        raise ValueError(
            f"restart_warmup_steps={restart_warmup_steps} must be smaller than restart_every={restart_every}."
        )
    lr_lambda = functools.partial(
        _cosine_restart_lambda,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        min_lr_ratio=min_lr_ratio,
        restart_every=restart_every,
        restart_warmup_steps=restart_warmup_steps,
    )
    return LambdaLR(optimizer, lr_lambda, last_epoch)


class LoroCallback(_FirstCallback):
    """Logs the LORO schedule (`loro/exact_steps`, `loro/last_step_exact`) at each
    logging step, from the optimizer's own counters (restored on resume)."""

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        self._check_order(kwargs)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        if logs is None or "loss" not in logs or not isinstance(optimizer, LOROAdamW):
            return
        metrics = {
            keys.LORO_EXACT_STEPS: float(optimizer.num_exact_steps),
            keys.LORO_LAST_STEP_EXACT: float(optimizer.last_step_was_exact),
        }
        merge_into_log_row(state, logs, metrics)


def build_loro_optimizer_and_scheduler(model, training_args, script_args):
    """The (optimizer, scheduler) pair `train_hf.py` hands to the Trainer for `loro_adamw`."""
    optimizer = LOROAdamW.from_model(
        model,
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
        weight_decay=training_args.weight_decay,
        loro_freq=script_args.loro_freq,
        loro_refresh=script_args.loro_refresh,
        loro_refresh_freq=script_args.loro_refresh_freq,
        loro_lr_scaler=script_args.loro_lr_scaler,
        loro_type=script_args.loro_type,
    )
    scheduler = None
    if script_args.scheduler == "cosine_restart":
        warmup = training_args.get_warmup_steps(training_args.max_steps)
        scheduler = run_cosine_restart_schedule(optimizer, script_args, warmup, training_args.max_steps)
    return optimizer, scheduler


def uses_run_cosine_restart(script_args) -> bool:
    """Whether train_hf.py gives the Trainer the LORO cosine_restart schedule (it ignores
    lr_scheduler_type and lr_scheduler_kwargs then)."""
    return (getattr(script_args, "optimizer", None), getattr(script_args, "scheduler", None)) == (
        "loro_adamw", "cosine_restart")  # fmt: skip


def run_cosine_restart_schedule(optimizer, script_args, num_warmup_steps: int, num_training_steps: int):
    """The cosine_restart schedule of a run's keys: what the Trainer gets for `loro_adamw`,
    and what resume_check replays to tell the learning rate a resumed run gets."""
    return get_cosine_restart_schedule(
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        min_lr_ratio=script_args.min_lr_ratio,
        restart_every=script_args.cosine_restart_freq or script_args.loro_refresh_freq,
        restart_warmup_steps=script_args.cosine_restart_warmup,
    )


__all__ = [
    "LOROAdamW",
    "LoroCallback",
    "build_loro_optimizer_and_scheduler",
    "get_cosine_restart_schedule",
    "loro_exact_update",
    "run_cosine_restart_schedule",
    "uses_run_cosine_restart",
    "LORO_TYPES",
    "LORO_REFRESH_CHOICES",
]
