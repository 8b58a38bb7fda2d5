"""CPU tests of the 2:4 activation-sparse ReLU² FFN op (hf_sparse/model/sparse_ffn.py).

References are built here, independently of the op: masks from a sort-based top-2,
gradients from plain float64 autograd with explicit token-wise masking.
"""

import math

import pytest
import torch

from hf_sparse.model import gemm_backends, kernels
from hf_sparse.model.select_2to4 import keyed_uniforms, mvue_key
from hf_sparse.model.sparse_ffn import (
    BACKWARD_MODES,
    SPARSE_METHODS,
    TokenPermutation,
    count_2to4_stats,
    make_token_permutation,
    relu2_2to4_ffn,
    relu2_ffn_reference,
    sparsify_2to4,
)
from tests.conftest import host_sync_calls

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


def groups(y):
    return y.reshape(*y.shape[:-1], y.shape[-1] // 4, 4)


def top2_mask_reference(y):
    """Top-2 |y| of each 4-group along the last dim via a stable sort (ties -> lower
    index), restricted to non-zeros."""
    g = groups(y).abs()
    idx = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (mask & (g != 0)).reshape(y.shape)


def token_top2_reference(z):
    """Token-wise 2:4 on a (T, F) tensor: per column, top-2 |z| of each 4 consecutive
    rows; a last partial group is zero-padded."""
    t, f = z.shape
    pad = (-t) % 4
    zp = torch.cat([z, z.new_zeros(pad, f)]) if pad else z
    keep = top2_mask_reference(zp.t().contiguous()).t()  # rows of zp.t() = columns of z
    # top2_mask_reference drops zeros; zeros contribute nothing either way.
    return (zp * keep)[:t]


def densest_features(y2s, k):
    counts = (y2s != 0).sum(0).tolist()
    order = sorted(range(len(counts)), key=lambda j: (-counts[j], j))
    return sorted(order[:k])


def make_inputs(t=32, d=16, f=32, dtype=F64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, d, generator=g, dtype=F64) * scale).to(dtype)
    w_up = (torch.randn(f, d, generator=g, dtype=F64) / math.sqrt(d)).to(dtype)
    w_down = (torch.randn(d, f, generator=g, dtype=F64) / math.sqrt(f)).to(dtype)
    dy = torch.randn(t, d, generator=g, dtype=F64).to(dtype)
    return x, w_up, w_down, dy


def run_op(x, w_up, w_down, dy, seed=123, **kw):
    x, w_up, w_down = (a.clone().requires_grad_() for a in (x, w_up, w_down))
    torch.manual_seed(seed)
    y = relu2_2to4_ffn(x, w_up, w_down, **kw)
    y.backward(dy)
    return y.detach(), x.grad, w_up.grad, w_down.grad


def reference_grads(x, w_up, w_down, dy, method, backward, dense_features, seed=123):
    """Float64 reference: masked forward with D held constant, plain autograd, and the
    token-wise masking of the weight-gradient operands written out explicitly."""
    x, w_up, w_down = (a.clone().requires_grad_() for a in (x, w_up, w_down))
    y1 = x @ w_up.t()
    y2 = torch.relu(y1) ** 2
    torch.manual_seed(seed)  # same RNG draw as the op (mvue)
    y2s_val, dmat = sparsify_2to4(y2.detach(), method)
    # y2s = D ⊙ y2 - c with D, c constants reproduces every method's value and Jacobian.
    y2s = dmat * y2 - (dmat * y2.detach() - y2s_val)
    y3 = y2s @ w_down.t()
    dx, dy1 = torch.autograd.grad(y3, (x, y1), dy, retain_graph=True)
    y2s_d, dy1 = y2s.detach(), dy1.detach()
    f = w_up.shape[0]
    if backward == "exact":
        op_down, op_up = y2s_d, dy1
    else:
        op_down, op_up = token_top2_reference(y2s_d), token_top2_reference(dy1)
        if backward == "split_gemm":
            dense = densest_features(y2s_d, math.ceil(dense_features * f))
            op_down[:, dense] = y2s_d[:, dense]
            op_up[:, dense] = dy1[:, dense]
    dw_down = dy.t() @ op_down
    dw_up = op_up.t() @ x.detach()
    return y3.detach(), dx, dw_up, dw_down


def assert_close(a, b, rtol=1e-10, atol=1e-12, msg=""):
    assert a.shape == b.shape, msg
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_at_most_two_per_group_and_d_consistent(method):
    torch.manual_seed(0)
    y = torch.randn(64, 48, dtype=F64)
    y[y.abs() < 0.3] = 0  # zeros and all-zero groups included
    y[:4] = 0
    ys, d = sparsify_2to4(y, method)
    assert (groups(ys) != 0).sum(-1).max() <= 2
    assert (groups(d) != 0).sum(-1).max() <= 2
    assert torch.all((d == 0) <= (ys == 0) | (y == 0))  # dropped -> value 0
    if method != "mvue":
        assert set(d.unique().tolist()) <= {0.0, 1.0}
    # D is 0 on zeros (a group with < 2 non-zeros keeps its non-zeros and nothing else)
    assert torch.all(d[y == 0] == 0)


def test_naive_keeps_two_largest_with_ties():
    torch.manual_seed(1)
    # Small integer range: plenty of ties, signs and zeros.
    y = torch.randint(-2, 3, (200, 64)).to(F64)
    ys, d = sparsify_2to4(y, "naive")
    ref = top2_mask_reference(y)
    assert torch.equal(d.bool(), ref)
    assert torch.equal(ys, y * ref)
    # Explicit tie cases: lower index wins.
    t = torch.tensor([[3.0, 3, 3, 1, 0, 5, 0, 0, 2, 2, 2, 2, -4, 1, 2, -3]])
    ys, _ = sparsify_2to4(t, "naive")
    assert ys.tolist() == [[3.0, 3, 0, 0, 0, 5, 0, 0, 2, 2, 0, 0, -4, 0, 0, -3]]


def test_naive_along_other_dim():
    torch.manual_seed(2)
    y = torch.randn(8, 12, 5, dtype=F64)
    ys, d = sparsify_2to4(y, "naive", dim=0)
    ref = top2_mask_reference(y.movedim(0, -1)).movedim(-1, 0)
    assert torch.equal(d.bool(), ref)
    with pytest.raises(ValueError, match="multiple of 4"):
        sparsify_2to4(y, "naive", dim=2)


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_lossless_and_idempotent_on_2to4_input(method):
    torch.manual_seed(3)
    y = torch.randn(64, 32, dtype=F64)
    keep = torch.zeros(64, 8, 4, dtype=torch.bool)
    keep.scatter_(-1, torch.rand(64, 8, 4).argsort(-1)[..., :2], True)
    keep &= torch.rand(64, 8, 4) > 0.2  # some groups with 1 or 0 non-zeros
    y = y * keep.reshape(64, 32)
    ys, d = sparsify_2to4(y, method)
    assert torch.equal(ys, y)
    assert torch.equal(d, (y != 0).to(F64))
    ys2, _ = sparsify_2to4(ys, method)
    assert torch.equal(ys2, ys)


def test_soft_threshold_values():
    y = torch.tensor([[4.0, 1, 3, 2, 0, 5, 0, 0, -4, 1, 2, -3]])
    ys, d = sparsify_2to4(y, "soft_threshold")
    # group 1: t=2 -> (4-2, 3-2); group 2: t=0; group 3: t=2 -> (-(4-2), -(3-2))
    assert ys.tolist() == [[2.0, 0, 1, 0, 0, 5, 0, 0, -2, 0, 0, -1]]
    assert d.tolist() == [[1.0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1]]


def mvue_probabilities(y):
    """Independent p_i: min(1, 2|y|/sum) with the excess of a capped member
    redistributed proportionally (looped per group)."""
    g = groups(y).abs().reshape(-1, 4).tolist()
    out = []
    for grp in g:
        s = sum(grp)
        if s == 0:
            out.append([0.0] * 4)
            continue
        p = [2 * a / s for a in grp]
        if max(p) > 1:
            i = p.index(max(p))
            rest = s - grp[i]
            p = [1.0 if j == i else (grp[j] / rest if rest > 0 else 0.0) for j in range(4)]
        out.append(p)
    return torch.tensor(out, dtype=F64).reshape(y.shape)


def test_mvue_unbiased_and_keeps_min2_nnz():
    torch.manual_seed(4)
    base = torch.relu(torch.randn(16, 32, dtype=F64)) ** 2
    base[0, :4] = torch.tensor([10.0, 0.1, 0.1, 0.0])  # capped group
    base[1, :4] = 0
    n = 4000
    torch.manual_seed(5)
    ys, d = sparsify_2to4(base.repeat(n, 1), "mvue")
    # exactly min(2, nnz) kept per group, every draw
    kept = (groups(ys) != 0).sum(-1)
    nnz = (groups(base.repeat(n, 1)) != 0).sum(-1)
    assert torch.equal(kept, nnz.clamp(max=2))
    mean = ys.reshape(n, 16, 32).mean(0)
    p = mvue_probabilities(base)
    var = torch.where(p > 0, base**2 * (1 / p.clamp_min(1e-300) - 1), torch.zeros_like(p))
    sd = (var / n).sqrt()
    z = (mean - base).abs() / sd.clamp_min(1e-300)
    # elements with p == 1 or 0 are exact
    assert_close(mean[sd == 0], base[sd == 0])
    assert z[sd > 0].max() < 5.5, z.max()
    assert abs(((mean - base)[sd > 0] / sd[sd > 0]).mean()) < 4 / math.sqrt(int((sd > 0).sum()))
    # D = 1/p on kept members
    dk = d.reshape(n, 16, 32)[0]
    kept0 = dk != 0
    assert_close(dk[kept0], 1 / p[kept0])


def test_mvue_uniforms_are_keyed_by_global_index():
    """MVUE's uniforms are a function of (key, row, global group index): a slice of the groups
    (a tensor-parallel rank's) draws exactly what the whole width draws there, the same key
    draws the same table, and the table looks uniform and uncorrelated."""
    key = torch.tensor(12345)
    whole = keyed_uniforms(key, 40, 64)
    assert whole.dtype == torch.float32 and whole.shape == (40, 64)
    assert torch.equal(keyed_uniforms(key, 40, 64), whole)
    assert torch.equal(keyed_uniforms(key, 40, 16, group_offset=24), whole[:, 24:40])
    assert torch.equal(keyed_uniforms(key, 7, 64), whole[:7])
    assert (keyed_uniforms(torch.tensor(12346), 40, 64) != whole).float().mean() > 0.99
    # Traced (one functional expression) = eager (in place, in cache-sized row chunks).
    torch._dynamo.reset()
    traced = torch.compile(keyed_uniforms, backend="aot_eager", fullgraph=True)
    assert torch.equal(traced(key, 3000, 40, 8), keyed_uniforms(key, 3000, 40, 8))
    # The key is the only draw from the global RNG: reproducible from the seed.
    torch.manual_seed(9)
    k1 = mvue_key("cpu")
    torch.manual_seed(9)
    assert torch.equal(mvue_key("cpu"), k1) and k1.dtype == torch.int64 and k1.dim() == 0
    u = keyed_uniforms(k1, 512, 512).double()
    n = u.numel()
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    counts = torch.histc(u, bins=16, min=0, max=1)
    chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum()
    assert chi2 < 50  # 15 degrees of freedom: p ~ 1e-5
    c = u - 0.5
    for a, b in ((c[1:], c[:-1]), (c[:, 1:], c[:, :-1])):  # neighbouring rows, neighbouring groups
        assert abs((a * b).mean() / (1 / 12)) < 5 / math.sqrt(a.numel())


def test_mvue_op_on_feature_slices_draws_what_the_whole_width_draws():
    """The forward op on two slices of the width, told where each starts (as tensor-parallel
    ranks are), sums to the whole op's output: the same members kept with the same 1/p."""
    x, w_up, w_down, _ = make_inputs(t=32, d=16, f=64, seed=17)
    fwd = torch.ops.hf_sparse.relu2_2to4_ffn_fwd
    torch.manual_seed(3)
    whole = fwd(x, w_up, w_down, "mvue", "exact", 0, False, False, False)[0]  # the schema before TP args
    parts, unkeyed = 0, 0
    for lo, hi in ((0, 24), (24, 64)):
        up, down = w_up[lo:hi].contiguous(), w_down[:, lo:hi].contiguous()
        torch.manual_seed(3)
        parts = parts + fwd(x, up, down, "mvue", "exact", 0, False, False, False, 64, lo, "")[0]
        torch.manual_seed(3)
        unkeyed = unkeyed + fwd(x, up, down, "mvue", "exact", 0, False, False, False)[0]
    assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(unkeyed, whole)  # the offset matters
    # A call written before the tensor-parallel arguments existed still differentiates.
    leaves = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
    fwd(*leaves, "naive", "split_gemm", 4, False, True, False)[0].sum().backward()
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_no_nan_inf_bf16(method):
    torch.manual_seed(6)
    y = torch.zeros(32, 64, dtype=torch.bfloat16)
    y[8:16] = (torch.rand(8, 64) * 1e37).to(torch.bfloat16)
    y[16:24] = torch.full((8, 64), 1e-38).to(torch.bfloat16)
    y[24:, ::4] = 1e37  # one huge member, three zeros
    ys, d = sparsify_2to4(y, method)
    assert torch.isfinite(ys).all() and torch.isfinite(d).all()
    assert torch.equal(ys[:8], torch.zeros_like(ys[:8]))
    # through the op, forward and backward
    x, w_up, w_down, dy = make_inputs(t=32, d=16, f=32, dtype=torch.bfloat16, scale=1e6)
    x[:8] = 0  # all-zero groups
    out, dx, dwu, dwd = run_op(x, w_up, w_down, dy, method=method)
    for tns in (out, dx, dwu, dwd):
        assert torch.isfinite(tns).all()
        assert tns.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("t", [32, 31])  # 31: a partial last token group of 3 rows
@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("backward", BACKWARD_MODES)
def test_forward_and_grads_match_reference(method, backward, t):
    x, w_up, w_down, dy = make_inputs(t=t, d=16, f=32, seed=7)
    dense_features = 0.25
    got = run_op(x, w_up, w_down, dy, method=method, backward=backward, dense_features=dense_features)
    ref = reference_grads(x, w_up, w_down, dy, method, backward, dense_features)
    for name, a, b in zip(("y", "dx", "dw_up", "dw_down"), got, ref):
        assert_close(a, b, msg=f"{method}/{backward}/{name}")


@pytest.mark.parametrize("t", [5, 6, 7])
def test_partial_last_token_group(t):
    # w_up = I and two positive features per 4-group: y2s is dense on features 0,1,4,5,
    # so the zero-padded last token group (1-3 rows) must still keep only its top 2.
    f = 8
    g = torch.Generator().manual_seed(15)
    x = -torch.ones(t, f, dtype=F64)
    for j in (0, 1, 4, 5):
        x[:, j] = 0.5 + torch.rand(t, generator=g, dtype=F64)
    w_up = torch.eye(f, dtype=F64)
    w_down = torch.randn(f, f, generator=g, dtype=F64)
    dy = torch.randn(t, f, generator=g, dtype=F64)
    got = run_op(x, w_up, w_down, dy, method="naive", backward="naive")
    ref = reference_grads(x, w_up, w_down, dy, "naive", "naive", 0.0)
    for a, b in zip(got, ref):
        assert_close(a, b)


def test_reference_dense_path_matches_plain_relu2():
    x, w_up, w_down, dy = make_inputs(seed=8)
    x, w_up, w_down = (a.requires_grad_() for a in (x, w_up, w_down))
    y = relu2_ffn_reference(x, w_up, w_down)
    assert_close(y, torch.relu(x @ w_up.t()).pow(2) @ w_down.t())


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_split_gemm_endpoints(method):
    x, w_up, w_down, dy = make_inputs(t=36, seed=9)
    exact = run_op(x, w_up, w_down, dy, method=method, backward="exact")
    naive = run_op(x, w_up, w_down, dy, method=method, backward="naive")
    full = run_op(x, w_up, w_down, dy, method=method, backward="split_gemm", dense_features=1.0)
    none = run_op(x, w_up, w_down, dy, method=method, backward="split_gemm", dense_features=0.0)
    part = run_op(x, w_up, w_down, dy, method=method, backward="split_gemm", dense_features=0.05)
    for a, b in zip(full, exact):
        assert torch.equal(a, b)
    for a, b in zip(none, naive):
        assert torch.equal(a, b)
    # dx is exact in every mode; the weight grads really differ between modes.
    assert torch.equal(part[1], exact[1]) and torch.equal(naive[1], exact[1])
    assert not torch.equal(naive[2], exact[2]) and not torch.equal(naive[3], exact[3])


def test_densest_features_are_the_dense_ones():
    # d = F = 8, w_up = I: y1 = x. Features 0,1 are non-zero on every token, feature 4 on
    # one token per group of 4, the rest never. With dense_features=0.25 (2 features) the
    # dense ones must be 0 and 1; the inverted ranking of the research code would pick
    # two empty features and token-sparsify 0 and 1.
    t, f = 16, 8
    x = -torch.ones(t, f, dtype=F64)
    g = torch.Generator().manual_seed(10)
    x[:, 0:2] = 1 + torch.rand(t, 2, generator=g, dtype=F64)
    x[::4, 4] = 2.0
    w_up = torch.eye(f, dtype=F64)
    w_down = torch.randn(f, f, generator=g, dtype=F64)
    dy = torch.randn(t, f, generator=g, dtype=F64)
    _, _, dwu, dwd = run_op(x, w_up, w_down, dy, method="naive", backward="split_gemm", dense_features=0.25)
    _, _, dwu_x, dwd_x = run_op(x, w_up, w_down, dy, method="naive", backward="exact")
    _, _, dwu_n, dwd_n = run_op(x, w_up, w_down, dy, method="naive", backward="naive")
    assert torch.equal(dwd[:, :2], dwd_x[:, :2]) and torch.equal(dwu[:2], dwu_x[:2])
    assert not torch.allclose(dwd_n[:, :2], dwd_x[:, :2])  # token-wise 2:4 matters there
    assert not torch.allclose(dwu_n[:2], dwu_x[:2])


# ----------------------------------------------------------------------------- permutation


def test_make_token_permutation_deterministic():
    p1 = make_token_permutation(100, seed=3, device="cpu")
    p2 = make_token_permutation(100, seed=3, device=torch.device("cpu"))
    p3 = make_token_permutation(100, seed=4)
    assert p1.dtype == torch.int64 and torch.equal(p1, p2)
    assert torch.equal(p1.sort().values, torch.arange(100))
    assert not torch.equal(p1, p3)
    # The global RNG is untouched.
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    make_token_permutation(50, seed=1)
    assert torch.equal(torch.rand(3), a)


def test_token_permutation_cache():
    tp = TokenPermutation(seed=11)
    a = tp(64, "cpu")
    assert tp(64, torch.device("cpu")) is a
    assert torch.equal(a, make_token_permutation(64, 11))
    assert tp(32, "cpu").shape == (32,)
    for n in range(100, 120):  # bounded
        tp(n, "cpu")
    assert len(tp._cache) <= tp.max_entries


@pytest.mark.parametrize("method", ["naive", "soft_threshold"])
def test_permutation_semantics(method):
    x, w_up, w_down, dy = make_inputs(t=32, seed=12)
    perm = make_token_permutation(32, seed=5)
    kw = dict(method=method, backward="split_gemm", dense_features=0.05)
    y0, dx0, dwu0, dwd0 = run_op(x, w_up, w_down, dy, **kw)
    y1, dx1, dwu1, dwd1 = run_op(x, w_up, w_down, dy, permutation=perm, **kw)
    # forward unchanged, gradients change only through the token-wise grouping
    assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    assert_close(dx1, dx0, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dwu1, dwu0) and not torch.allclose(dwd1, dwd0)
    # == the op on pre-permuted tokens (groups of consecutive rows of x[perm]),
    # with outputs/dx mapped back through the inverse permutation.
    yp, dxp, dwup, dwdp = run_op(x[perm], w_up, w_down, dy[perm], **kw)
    assert_close(y1[perm], yp, rtol=1e-12, atol=1e-12)
    assert_close(dx1[perm], dxp, rtol=1e-12, atol=1e-12)
    assert_close(dwu1, dwup, rtol=1e-12, atol=1e-12)
    assert_close(dwd1, dwdp, rtol=1e-12, atol=1e-12)
    # leading dims flattened and restored
    y3 = relu2_2to4_ffn(x.view(4, 8, -1), w_up, w_down, permutation=perm, **kw)
    assert y3.shape == (4, 8, x.shape[1])
    with pytest.raises(ValueError, match="permutation"):
        relu2_2to4_ffn(x, w_up, w_down, permutation=perm[:10])


# ----------------------------------------------------------------------------- stats


def hand_counts(y2, dmat):
    zeros = numel = dropped = 0
    for row_y, row_d in zip(y2.tolist(), dmat.tolist()):
        for a, m in zip(row_y, row_d):
            numel += 1
            zeros += a == 0
            dropped += a != 0 and m == 0
    return [zeros, numel, dropped]


@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("stats_dtype", [torch.float64, torch.int64])
def test_stats_counts(method, stats_dtype):
    x, w_up, w_down, _ = make_inputs(t=20, d=8, f=16, seed=13)
    x[:3] = 0  # fully zero rows
    stats = torch.full((4,), 7, dtype=stats_dtype)  # accumulates; extra slot untouched
    y2 = torch.relu(x @ w_up.t()) ** 2
    expected = [0, 0, 0]
    for seed in (1, 2):
        torch.manual_seed(seed)
        relu2_2to4_ffn(x, w_up, w_down, method=method, stats=stats)
        torch.manual_seed(seed)
        _, dmat = sparsify_2to4(y2, method)
        expected = [e + h for e, h in zip(expected, hand_counts(y2, dmat))]
    assert stats.tolist() == [7 + e for e in expected] + [7]
    assert expected[2] > 0 and expected[0] > 0

    warm = torch.zeros(3, dtype=stats_dtype)
    count_2to4_stats(y2, warm, method=method)
    _, dnaive = sparsify_2to4(y2, "naive")
    assert warm.tolist() == hand_counts(y2, dnaive)


def test_stats_soft_threshold_counts_the_mask_not_the_shift():
    # relu² rows (4, 4, 4, 1): the mask keeps the first two 4s and drops 2 non-zeros;
    # the S-STE shift then zeroes the kept 4s too, which must not count as dropped.
    x = torch.tensor([[2.0, 2, 2, 1, 3, 0, -1, 0]], dtype=F64).repeat(5, 1)
    w_up = torch.eye(8, dtype=F64)
    w_down = torch.ones(8, 8, dtype=F64)
    stats = torch.zeros(3, dtype=F64)
    y = relu2_2to4_ffn(x, w_up, w_down, method="soft_threshold", stats=stats)
    assert torch.equal(y, torch.zeros_like(y) + 9)  # only the 3² survives (t = 0 there)
    assert stats.tolist() == [5 * 3, 5 * 8, 5 * 2]


@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("backward", BACKWARD_MODES)
def test_backward_twice_with_retain_graph(method, backward):
    """Saved tensors are not modified by backward (retain_graph re-use stays correct)."""
    x, w_up, w_down, dy = make_inputs(t=32, seed=16)
    x, w_up, w_down = (a.requires_grad_() for a in (x, w_up, w_down))
    y = relu2_2to4_ffn(x, w_up, w_down, method=method, backward=backward)
    first = torch.autograd.grad(y, (x, w_up, w_down), dy, retain_graph=True)
    second = torch.autograd.grad(y, (x, w_up, w_down), dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_stats_validation():
    x, w_up, w_down, _ = make_inputs()
    with pytest.raises(ValueError, match="stats"):
        relu2_2to4_ffn(x, w_up, w_down, stats=torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="stats"):
        relu2_2to4_ffn(x, w_up, w_down, stats=torch.zeros(3, dtype=torch.float32))


# ----------------------------------------------------------------------------- no sync


def test_no_host_sync(monkeypatch):
    x, w_up, w_down, dy = make_inputs(t=30, dtype=torch.float32)
    perm = make_token_permutation(30, seed=0)
    stats = torch.zeros(3, dtype=F64)

    def every_mode():
        for method in SPARSE_METHODS:
            for backward in BACKWARD_MODES:
                run_op(x, w_up, w_down, dy, method=method, backward=backward, permutation=perm, stats=stats)
        count_2to4_stats(torch.relu(x @ w_up.t()), stats)

    assert host_sync_calls(monkeypatch, every_mode) == []


# ----------------------------------------------------------------------------- dtypes, memory, API


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_dtypes(dtype, method):
    x, w_up, w_down, dy = make_inputs(t=24, dtype=dtype, seed=14)
    y, dx, dwu, dwd = run_op(x, w_up, w_down, dy, method=method)
    assert y.dtype == dx.dtype == dwu.dtype == dwd.dtype == dtype
    # close to the float64 result (mvue: rounding of p flips some random draws)
    if dtype != torch.float64 and method != "mvue":
        ref = run_op(*(a.to(F64) for a in (x, w_up, w_down, dy)), method=method)
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
        for a, b in zip((y, dx, dwu, dwd), ref):
            assert (a.to(F64) - b).norm() <= tol * b.norm()


def test_saved_activations():
    """naive keeps one T×F tensor for backward (dense autograd keeps two); the others two."""
    x, w_up, w_down, _ = make_inputs(t=24, d=16, f=32, dtype=torch.float32)
    x, w_up, w_down = (a.requires_grad_() for a in (x, w_up, w_down))

    def n_activations(fn, **kw):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, w_up, w_down, **kw)
        return sum(s == (24, 32) for s in shapes)

    assert n_activations(relu2_ffn_reference) >= 2
    assert n_activations(relu2_2to4_ffn, method="naive") == 1
    assert n_activations(relu2_2to4_ffn, method="soft_threshold") == 2
    assert n_activations(relu2_2to4_ffn, method="mvue") == 2


def test_argument_validation():
    x, w_up, w_down, _ = make_inputs()
    with pytest.raises(ValueError, match="method.*naive"):
        relu2_2to4_ffn(x, w_up, w_down, method="topk")
    with pytest.raises(ValueError, match="backward.*split_gemm"):
        relu2_2to4_ffn(x, w_up, w_down, backward="dense")
    for bad in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="dense_features"):
            relu2_2to4_ffn(x, w_up, w_down, dense_features=bad)
    with pytest.raises(ValueError, match="multiple of 4"):
        relu2_2to4_ffn(x, w_up[:30], w_down[:, :30])
    with pytest.raises(ValueError, match="method"):
        sparsify_2to4(x, "bogus")


def test_autocast_computes_in_autocast_dtype():
    x, w_up, w_down, _ = make_inputs(dtype=torch.float32)
    w_up.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = relu2_2to4_ffn(x, w_up, w_down)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w_up.grad.dtype == torch.float32


def test_kernel_dispatch_is_off_on_cpu(monkeypatch):
    x, w_up, w_down, _ = make_inputs(t=64, d=64, f=128, dtype=torch.bfloat16)
    assert "CUDA" in gemm_backends.CUSPARSELT.ineligibility_reason(x, w_up, w_down)
    assert gemm_backends.select_gemms(x, w_up, w_down) is gemm_backends.PLAIN
    # Asked for by name where it cannot run: the plain GEMMs, said once.
    assert gemm_backends.select_gemms(x, w_up, w_down, "cusparselt") is gemm_backends.PLAIN
    with pytest.raises(
        ValueError, match=r"gemms='cutlass' is not a registered GEMM back-end; choose one of \['cusparselt', 'plain'\]"
    ):
        relu2_2to4_ffn(x, w_up, w_down, gemms="cutlass")
    monkeypatch.setenv(gemm_backends.DISABLE_ENV, "1")
    assert gemm_backends.kernel_disabled()
    monkeypatch.setattr(gemm_backends, "_AUTOMATIC", {"cpu": "cusparselt"})
    assert gemm_backends.select_gemms(x, w_up, w_down) is gemm_backends.PLAIN
    monkeypatch.setenv(gemm_backends.DISABLE_ENV, "0")
    assert not gemm_backends.kernel_disabled()
    monkeypatch.setenv(kernels.ALG_ID_ENV, "3")
    assert kernels.cusparselt_alg_id() == 3
