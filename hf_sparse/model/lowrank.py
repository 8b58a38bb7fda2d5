"""Low-rank linear layers for the LORO mode (W = weight_out @ weight_in.T).

This file ships next to the modeling file as HF remote code, so it imports only torch,
math and the standard library (no `hf_sparse.` imports).
"""

import logging
import math

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

# Public contract: the state-dict keys of a replaced linear are `<name>.weight_in` and
# `<name>.weight_out` (see DESIGN.md, section 2).
LOW_RANK_FACTOR_NAMES = ("weight_in", "weight_out")

LORO_INIT_CHOICES = ("xavier", "auto", "kaiming", "orth", "randn_<std>")

# HF `initializer_range` default; `auto` and `orth` aim at this std for the product W.
DEFAULT_INIT_RANGE = 0.02


def _init_error(init):
    return ValueError(
        f"loro_init={init!r} is not valid; choose one of "
        f"{', '.join(repr(c) for c in LORO_INIT_CHOICES)} (e.g. 'randn_0.02')."
    )


def parse_low_rank_init(init):
    """Validate a `loro_init` string; return `(kind, std)` where std is set for randn_<std>."""
    if not isinstance(init, str):
        raise _init_error(init)
    if init in ("xavier", "auto", "kaiming", "orth"):
        return init, None
    if init.startswith("randn_"):
        try:
            std = float(init[len("randn_") :])
        except ValueError:
            raise _init_error(init) from None
        if not (std > 0 and math.isfinite(std)):
            raise _init_error(init)
        return "randn", std
    raise _init_error(init)


def _orthonormal_columns_(tensor, scale, generator):
    """Fill `tensor` (n x r) with `scale` times orthonormal columns.

    The QR runs in float32 (float64 stays float64) because a bf16 QR is not supported
    everywhere and would lose orthogonality; only the final result is rounded.
    """
    n, r = tensor.shape
    compute_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    gaussian = torch.randn(n, r, generator=generator, device=tensor.device, dtype=compute_dtype)
    q, rr = torch.linalg.qr(gaussian)
    # Sign fix makes Q Haar-distributed (QR alone is biased by LAPACK's sign choice).
    q = q * torch.sign(torch.diagonal(rr)).unsqueeze(0)
    with torch.no_grad():
        tensor.copy_(q * scale)
    return tensor


@torch.no_grad()
def init_low_rank_(module, init=None, generator=None, init_range=None):
    """(Re-)initialise the factors of a `LowRankLinear` in place; the bias is zeroed.

    Rules (n = in_features, m = out_features, r = rank):
      - `xavier`: `nn.init.xavier_normal_` on each factor tensor (std sqrt(2/(n+r)) for
        weight_in, sqrt(2/(m+r)) for weight_out). Default, as in the LORO recipe.
      - `auto`: normal factors with std (init_range**2 / r) ** 0.25, so every entry of the
        product W (a sum of r products of two factor entries) has variance
        r * std**4 = init_range**2: the product matches a dense Llama linear
        initialised with `initializer_range` (0.02).
      - `kaiming`: `nn.init.kaiming_normal_` on each factor tensor, as the original LORO
        code does (fan_in = r for both stored tensors, so factor std = sqrt(2/r)).
      - `orth`: both factors get orthonormal columns times one common scale c, chosen so
        the product's entries have std init_range: W = c^2 Q_out Q_in^T has squared
        Frobenius norm c^4 r, so c^2 = init_range * sqrt(m * n / r). Equal scales make the
        factors balanced (M^T M = N^T N), the form LORO's exact step returns.
      - `randn_<std>`: normal factors with that std.
    """
    init = module.init if init is None else init
    init_range = getattr(module, "init_range", DEFAULT_INIT_RANGE) if init_range is None else init_range
    kind, std = parse_low_rank_init(init)
    w_in, w_out = module.weight_in, module.weight_out
    rank = w_in.shape[1]
    # Each rule inits the stored (n x r) / (m x r) tensors directly, as the original LORO
    # code does, so ported runs with the same `loro_init` start from the same statistics.
    if kind == "xavier":
        nn.init.xavier_normal_(w_in, generator=generator)
        nn.init.xavier_normal_(w_out, generator=generator)
    elif kind == "kaiming":
        nn.init.kaiming_normal_(w_in, generator=generator)
        nn.init.kaiming_normal_(w_out, generator=generator)
    elif kind == "auto":
        # var(W_ij) = r * var(M) * var(N) = r * std**4 = init_range**2.
        factor_std = (init_range**2 / rank) ** 0.25
        nn.init.normal_(w_in, 0.0, factor_std, generator=generator)
        nn.init.normal_(w_out, 0.0, factor_std, generator=generator)
    elif kind == "orth":
        scale = math.sqrt(init_range * math.sqrt(w_in.shape[0] * w_out.shape[0] / rank))
        _orthonormal_columns_(w_in, scale, generator)
        _orthonormal_columns_(w_out, scale, generator)
    else:
        nn.init.normal_(w_in, 0.0, std, generator=generator)
        nn.init.normal_(w_out, 0.0, std, generator=generator)
    # Zero bias as in HF's Llama `_init_weights` for linears.
    if getattr(module, "bias", None) is not None:
        module.bias.zero_()
    return module


class LowRankLinear(nn.Module):
    """A linear layer whose weight is the rank-r product W = weight_out @ weight_in.T.

    `weight_in` is (in_features x r), `weight_out` is (out_features x r), `bias` (optional)
    is (out_features). The forward computes (x @ weight_in) @ weight_out.T: autograd then
    only ever holds x, x @ weight_in and the two factors, and the factor gradients are
    dW @ weight_in and dW.T @ weight_out computed as products of thin matrices, so the
    out x in matrix is never formed (that is the memory saving of low-rank pretraining).
    """

    def __init__(
        self,
        in_features,
        out_features,
        rank,
        bias=False,
        init="xavier",
        device=None,
        dtype=None,
        init_range=DEFAULT_INIT_RANGE,
    ):
        super().__init__()
        if not (isinstance(rank, int) and 0 < rank <= min(in_features, out_features)):
            raise ValueError(
                f"rank={rank!r} must be an int in [1, min(in_features, out_features)={min(in_features, out_features)}]."
            )
        # Validate eagerly so a bad config fails at construction, not at first init.
        parse_low_rank_init(init)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.init = init
        self.init_range = init_range
        # (in x r) and (out x r), the state-dict contract shared with the LORO reference
        # code: both factors are tall with the rank last, the form the exact step's QRs take.
        self.weight_in = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.weight_out = nn.Parameter(torch.empty(out_features, rank, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self, init=None, generator=None):
        if init is not None:
            parse_low_rank_init(init)
            self.init = init
        init_low_rank_(self, self.init, generator=generator)

    def forward(self, x):
        # Two thin GEMMs; F.linear fuses the bias into the second one.
        hidden = F.linear(x, self.weight_in.t())
        return F.linear(hidden, self.weight_out, self.bias)

    def dense_weight(self):
        """The out x in product weight_out @ weight_in.T.

        Materialises the full matrix: for tests, debugging and export only, never on the
        training path.
        """
        return self.weight_out @ self.weight_in.t()

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, init={self.init!r}"
        )


def is_low_rank(module):
    """True for a `LowRankLinear`, including copies loaded as HF remote code.

    A checkpoint loaded with `trust_remote_code=True` imports this file under another
    module name, so an `isinstance` check against this class alone would miss its layers;
    the factor pair with a shared rank dimension identifies them instead.
    """
    if isinstance(module, LowRankLinear):
        return True
    w_in = getattr(module, "weight_in", None)
    w_out = getattr(module, "weight_out", None)
    return (
        isinstance(w_in, nn.Parameter)
        and isinstance(w_out, nn.Parameter)
        and w_in.dim() == 2
        and w_out.dim() == 2
        and w_in.shape[1] == w_out.shape[1]
    )
