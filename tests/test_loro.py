"""LOROAdamW (lazy/exact steps, refresh, resume) and the cosine-restart schedule."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from hf_sparse.training.loro import LOROAdamW, _cosine_restart_lambda, get_cosine_restart_schedule, loro_exact_update
from hf_sparse.model.lowrank import LowRankLinear

F64 = torch.float64


# ---- the exact Riemannian step, against a dense reference ----------------------------


def _dense_reference(M, N, G, lr):
    """Best rank-r approximation of W - lr P_T(G), with P_T built from dense projectors."""
    r = M.shape[1]
    q_m, q_n = torch.linalg.qr(M)[0], torch.linalg.qr(N)[0]
    p_u, p_v = q_m @ q_m.T, q_n @ q_n.T
    tangent = p_u @ G + G @ p_v - p_u @ G @ p_v
    u, s, vh = torch.linalg.svd(M @ N.T - lr * tangent)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


# (out, in, r): the spec's case, other learning rates, and 2r > out / 2r > in, where the
# projected gradient blocks are rank deficient.
@pytest.mark.parametrize(
    "seed,lr,out,inp,r",
    [(0, 0.1, 12, 9, 3), (1, 1.0, 12, 9, 3), (2, 1e-3, 12, 9, 3), (3, 0.3, 5, 9, 3), (4, 0.3, 4, 4, 3)],
)
def test_exact_update_is_best_rank_r_of_projected_step(seed, lr, out, inp, r):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(out, r, generator=gen, dtype=F64)
    N = torch.randn(inp, r, generator=gen, dtype=F64)
    G = torch.randn(out, inp, generator=gen, dtype=F64)
    M_new, N_new = loro_exact_update(M, N, G @ N, G.T @ M, lr)
    assert M_new.shape == M.shape and N_new.shape == N.shape and M_new.dtype == F64
    torch.testing.assert_close(M_new @ N_new.T, _dense_reference(M, N, G, lr), rtol=0, atol=1e-10)
    # Balanced: M^T M = N^T N = diag(singular values).
    gram_m, gram_n = M_new.T @ M_new, N_new.T @ N_new
    torch.testing.assert_close(gram_m, gram_n, rtol=0, atol=1e-10)
    torch.testing.assert_close(gram_m, torch.diag(torch.diagonal(gram_m)), rtol=0, atol=1e-10)


def test_exact_update_batched_and_low_precision():
    gen = torch.Generator().manual_seed(5)
    Ms = torch.randn(4, 12, 3, generator=gen, dtype=F64)
    Ns = torch.randn(4, 9, 3, generator=gen, dtype=F64)
    Gs = torch.randn(4, 12, 9, generator=gen, dtype=F64)
    dMs, dNs = Gs @ Ns, Gs.mT @ Ms
    M_b, N_b = loro_exact_update(Ms, Ns, dMs, dNs, 0.2)
    for i in range(4):
        ref = _dense_reference(Ms[i], Ns[i], Gs[i], 0.2)
        torch.testing.assert_close(M_b[i] @ N_b[i].T, ref, rtol=0, atol=1e-10)
    # float32 / bf16 inputs: computed in float32, returned in the input dtype.
    ref = M_b[0] @ N_b[0].T
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        args = [t[0].to(dtype) for t in (Ms, Ns, dMs, dNs)]
        M_l, N_l = loro_exact_update(*args, 0.2)
        assert M_l.dtype == dtype and torch.isfinite(M_l).all() and torch.isfinite(N_l).all()
        err = (M_l.double() @ N_l.double().T - ref).norm() / ref.norm()
        assert err < tol, (dtype, err)


# ---- the optimizer -----------------------------------------------------------------


class Tiny(nn.Module):
    """Two low-rank linears (different ranks and shapes), a dense linear with bias, a norm."""

    def __init__(self, dtype=F64):
        super().__init__()
        self.a = LowRankLinear(6, 8, 2, dtype=dtype)
        self.b = LowRankLinear(8, 5, 3, bias=True, dtype=dtype)
        self.dense = nn.Linear(5, 4, dtype=dtype)
        self.norm_weight = nn.Parameter(torch.ones(4, dtype=dtype))

    def forward(self, x):
        return self.dense(torch.tanh(self.b(torch.tanh(self.a(x))))) * self.norm_weight


def _data(step, dtype=F64):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=gen, dtype=dtype), torch.randn(16, 4, generator=gen, dtype=dtype)


def _train(model, opt, steps, start=1, record=None):
    for k in range(start, start + steps):
        x, y = _data(k, next(model.parameters()).dtype)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if record is not None and opt.last_step_was_exact:
            record.append(k)


def _fresh_grads(model):
    x, y = _data(0)
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    return {p: p.grad.clone() for p in model.parameters()}


def _first_direction(g, eps):
    # Step 1 from zero moments: m_hat = g, v_hat = g^2.
    return g / (g.abs() + eps)


@pytest.mark.parametrize("scaler,wd", [(-1.0, 0.0), (0.5, 0.1)])
def test_lazy_step_closed_form(scaler, wd):
    model = Tiny()
    before = {p: p.detach().clone() for p in model.parameters()}
    grads = _fresh_grads(model)
    lr, eps = 0.01, 1e-8
    opt = LOROAdamW.from_model(
        model, lr=lr, eps=eps, weight_decay=wd, loro_freq=100, loro_lr_scaler=scaler, hidden_size=8
    )
    opt.step()
    assert not opt.last_step_was_exact and opt.num_exact_steps == 0
    for layer in (model.a, model.b):
        s = scaler if scaler > 0 else layer.rank / 8
        for p in (layer.weight_in, layer.weight_out):
            expected = before[p] * (1 - lr * wd) - lr * s * _first_direction(grads[p], eps)
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-14)


def test_regular_params_match_torch_adamw_and_skip_decay_on_1d():
    model = Tiny()
    reference = copy.deepcopy(model)
    opt = LOROAdamW.from_model(model, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, loro_freq=2)
    kinds = [(g["loro_kind"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    assert kinds == [("regular", 0.1, 1), ("regular", 0.0, 3), ("lowrank", 0.1, 4)]
    dense = [reference.dense.weight]
    no_decay = [reference.dense.bias, reference.b.bias, reference.norm_weight]
    ref_opt = torch.optim.AdamW(
        [{"params": dense}, {"params": no_decay, "weight_decay": 0.0}], lr=0.01, betas=(0.8, 0.95), weight_decay=0.1
    )
    for k in range(1, 4):
        # Same factors on both sides, so regular-parameter gradients stay comparable.
        with torch.no_grad():
            for name in ("a", "b"):
                for f in ("weight_in", "weight_out"):
                    getattr(getattr(reference, name), f).copy_(getattr(getattr(model, name), f))
        for m in (model, reference):
            x, y = _data(k)
            m.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
        opt.step()
        ref_opt.step()
        for p, q in zip(dense + no_decay, [model.dense.weight, model.dense.bias, model.b.bias, model.norm_weight]):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


def test_exact_step_in_optimizer_uses_adam_directions():
    model = Tiny()
    before = {p: p.detach().clone() for p in model.parameters()}
    grads = _fresh_grads(model)
    lr, eps = 0.05, 1e-8
    opt = LOROAdamW.from_model(model, lr=lr, eps=eps, loro_freq=1, hidden_size=8)
    opt.step()
    assert opt.last_step_was_exact and opt.num_exact_steps == 1
    for layer in (model.a, model.b):
        M, N = layer.weight_out, layer.weight_in
        M_exp, N_exp = loro_exact_update(
            before[M], before[N], _first_direction(grads[M], eps), _first_direction(grads[N], eps), lr
        )
        torch.testing.assert_close(M.detach(), M_exp, rtol=0, atol=1e-12)
        torch.testing.assert_close(N.detach(), N_exp, rtol=0, atol=1e-12)
        gram_m, gram_n = M.T @ M, N.T @ N
        torch.testing.assert_close(gram_m, gram_n, rtol=0, atol=1e-12)
        torch.testing.assert_close(gram_m, torch.diag(torch.diagonal(gram_m)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("loro_type,expected", [("loro", [3, 6, 9]), ("eucl", [])])
def test_exact_step_schedule(loro_type, expected):
    model = Tiny()
    opt = LOROAdamW.from_model(model, lr=0.01, loro_freq=3, loro_type=loro_type)
    exact = []
    _train(model, opt, 10, record=exact)
    assert exact == expected
    assert opt.num_exact_steps == len(expected) and opt.loro_step == 10
    assert all(g["loro_step"] == 10 for g in opt.param_groups)
    assert [k for k in range(1, 11) if opt.is_exact_step(k)] == expected


@pytest.mark.parametrize("mode", ["all", "lrk", "reg"])
def test_refresh_zeroes_exactly_the_chosen_moments(mode):
    model = Tiny()
    opt = LOROAdamW.from_model(model, lr=0.01, loro_freq=100, loro_refresh=mode, loro_refresh_freq=2)
    refreshed = {"all": {"regular", "lowrank"}, "lrk": {"lowrank"}, "reg": {"regular"}}[mode]

    def moments(kind):
        return [opt.state[p] for g in opt.param_groups if g["loro_kind"] == kind for p in g["params"]]

    _train(model, opt, 1)
    assert all(torch.count_nonzero(s["exp_avg_sq"]) > 0 for s in moments("regular") + moments("lowrank"))
    _train(model, opt, 1, start=2)
    for kind in ("regular", "lowrank"):
        for s in moments(kind):
            zeroed = torch.count_nonzero(s["exp_avg"]) == 0 and torch.count_nonzero(s["exp_avg_sq"]) == 0
            assert zeroed == (kind in refreshed), (mode, kind)
            assert s["step"] == (0 if kind in refreshed else 2)
    _train(model, opt, 1, start=3)  # bias correction restarts with the moments
    for kind in ("regular", "lowrank"):
        assert all(s["step"] == (1 if kind in refreshed else 3) for s in moments(kind))


def test_state_dict_round_trip_resumes_schedule():
    kwargs = dict(lr=0.02, weight_decay=0.01, loro_freq=3, loro_refresh="all", loro_refresh_freq=4)
    torch.manual_seed(0)
    uninterrupted = Tiny()
    resumed = copy.deepcopy(uninterrupted)
    opt = LOROAdamW.from_model(uninterrupted, **kwargs)
    exact_ref = []
    _train(uninterrupted, opt, 8, record=exact_ref)
    assert exact_ref == [3, 6]

    first = LOROAdamW.from_model(resumed, **kwargs)
    _train(resumed, first, 4)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    restarted = Tiny()
    restarted.load_state_dict(checkpoint["model"])
    second = LOROAdamW.from_model(restarted, **kwargs)
    second.load_state_dict(checkpoint["optimizer"])
    assert second.loro_step == 4 and second.num_exact_steps == 1
    exact_resumed = []
    _train(restarted, second, 4, start=5, record=exact_resumed)
    assert exact_resumed == [6] and second.num_exact_steps == 2
    for (name, p), q in zip(uninterrupted.named_parameters(), restarted.parameters()):
        assert torch.equal(p, q), name


def test_bf16_factors_stay_bf16_and_finite():
    model = Tiny(dtype=torch.bfloat16)
    opt = LOROAdamW.from_model(model, lr=0.01, loro_freq=2)
    _train(model, opt, 4)
    assert opt.num_exact_steps == 2
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()


def test_step_has_no_host_sync(monkeypatch):
    model = Tiny()
    opt = LOROAdamW.from_model(model, lr=0.01, loro_freq=2, loro_refresh="all", loro_refresh_freq=2)
    _fresh_grads(model)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside LOROAdamW.step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()  # lazy
    opt.step()  # exact + refresh
    monkeypatch.undo()
    assert opt.num_exact_steps == 1


def test_argument_validation_names_the_key():
    model = Tiny()
    bad = {
        "loro_freq": dict(loro_freq=0),
        "loro_type": dict(loro_type="riemann"),
        "loro_refresh": dict(loro_refresh="everything"),
        "loro_refresh_freq": dict(loro_refresh="all", loro_refresh_freq=0),
        "loro_lr_scaler": dict(loro_lr_scaler=0.0),
        "hidden_size": dict(hidden_size=-8),
    }
    for key, kwargs in bad.items():
        with pytest.raises(ValueError, match=key):
            LOROAdamW.from_model(model, lr=0.01, **kwargs)
    with pytest.raises(ValueError, match="low_rank_pairs"):
        LOROAdamW([model.dense.weight], lr=0.01, low_rank_pairs=[(model.a.weight_out, model.b.weight_in)])
    # "none" from a CLI means no refresh.
    assert LOROAdamW.from_model(model, lr=0.01, loro_refresh="none").loro_refresh is None


def test_constructor_moves_factors_out_of_user_groups():
    model = Tiny()
    pairs = [(model.a.weight_out, model.a.weight_in), (model.b.weight_out, model.b.weight_in)]
    opt = LOROAdamW(model.parameters(), lr=0.01, low_rank_pairs=pairs, hidden_size=8)
    assert [g["loro_kind"] for g in opt.param_groups] == ["regular", "lowrank"]
    assert len(opt.param_groups[0]["params"]) == 4 and len(opt.param_groups[1]["params"]) == 4
    assert opt._lazy_scale[model.b.weight_in] == 3 / 8


# ---- the schedule ------------------------------------------------------------------


def test_cosine_restart_schedule_values():
    cfg = dict(num_warmup_steps=10, num_training_steps=100, min_lr_ratio=0.1, restart_every=30, restart_warmup_steps=5)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = get_cosine_restart_schedule(opt, **cfg)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(115):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    factor = [lr / 2.0 for lr in lrs]

    def cosine(t):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))

    assert factor[0] == 0.0 and factor[5] == pytest.approx(0.5)
    assert factor[10] == pytest.approx(1.0)  # warm-up end
    assert factor[55] == pytest.approx(0.55)  # cosine midpoint
    assert factor[100] == pytest.approx(0.1) and factor[115] == pytest.approx(0.1)  # min at the end
    # Re-warm-up after each restart: 0 right after it, linear back to the cosine.
    for start in (30, 60, 90):
        assert factor[start] == 0.0
        for j in range(1, 5):
            assert factor[start + j] == pytest.approx(cosine(start + j) * j / 5)
        assert factor[start + 5] == pytest.approx(cosine(start + 5))
        assert factor[start - 1] == pytest.approx(cosine(start - 1))
    # Without restarts it is the plain warm-up + cosine.
    plain = dict(cfg, restart_every=None)
    assert _cosine_restart_lambda(30, **plain) == pytest.approx(cosine(30))
    with pytest.raises(ValueError, match="restart_warmup_steps"):
        get_cosine_restart_schedule(opt, **dict(cfg, restart_warmup_steps=30))
    with pytest.raises(ValueError, match="min_lr_ratio"):
        get_cosine_restart_schedule(opt, **dict(cfg, min_lr_ratio=1.5))
