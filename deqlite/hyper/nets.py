"""The parts of a neural equilibrium solver: the initializer ``h_phi(x)``, the mixing networks
(history of residuals -> ``(alpha_hat, beta)``) and the small functions they share
(:func:`normalize_alpha`, :func:`anderson_weights`, :func:`loss_weights`).

See :mod:`deqlite.hyper` for the method (Bai, Koltun & Kolter 2022) and where it departs.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_number
from ..solvers.anderson import least_squares_weights

__all__ = ["ALPHA_MODES", "LOSS_WEIGHTS", "normalize_alpha", "anderson_weights", "loss_weights",
           "MLPInitializer", "ConvInitializer", "LeastSquaresMixer", "HyperAndersonNet"]

ALPHA_MODES = ("shift", "softmax", "none")
LOSS_WEIGHTS = ("increasing", "uniform", "last")


def normalize_alpha(alpha_hat: Tensor, mode: str = "shift") -> Tensor:
    """Turn raw weights ``alpha_hat`` ``(B, T)`` (``T = m_k + 1``) into mixing weights.

    ``"shift"`` (Alg. 2, the paper's choice): ``alpha = alpha_hat + (1 - sum alpha_hat) / T``,
    which sums to one and may be negative, like Anderson's least-squares weights.
    ``"softmax"``: ``softmax(alpha_hat)``, positive weights summing to one (App. C ablation).
    ``"none"``: ``alpha_hat`` unchanged (App. C ablation, "unnormalised").

    >>> normalize_alpha(torch.tensor([[0.2, 0.3, 0.9]])).sum().item()
    1.0
    """
    check_choice("alpha_mode", mode, ALPHA_MODES)
    if mode == "shift":
        T = alpha_hat.shape[-1]
        return alpha_hat + (1.0 - alpha_hat.sum(-1, keepdim=True)) / T
    if mode == "softmax":
        return torch.softmax(alpha_hat, dim=-1)
    return alpha_hat  # "none"


def anderson_weights(G: Tensor, ridge: float = 1e-4, scale_ridge: bool = True,
                     gram: Optional[Tensor] = None) -> Tensor:
    """Least-squares Anderson weights (Eq. 2): ``argmin ||G^T alpha||`` s.t. ``sum alpha = 1``.

    ``G`` is ``(B, T, n)`` (one residual per row); returns ``(B, T)`` in ``G``'s dtype, from
    :func:`deqlite.solvers.anderson.least_squares_weights`, the solve
    :class:`deqlite.solvers.Anderson` uses. ``gram`` (``G G^T``, ``(B, T, T)``) skips its
    recomputation.
    """
    H = (torch.bmm(G, G.transpose(1, 2)) if gram is None else gram).double()  # (B, T, T) Gram matrix
    return least_squares_weights(H, ridge, scale_ridge).to(G.dtype)


def loss_weights(K: int, kind: str = "increasing") -> Tensor:
    """Weights ``w_1..w_K`` of ``L_conv`` (sum to one). ``"increasing"``: ``w_k = k / sum i``
    (App. A, Eq. 7); ``"uniform"``: ``1 / K``; ``"last"``: only ``w_K = 1`` (App. C)."""
    check_int("K", K)
    check_choice("weights", kind, LOSS_WEIGHTS)
    k = torch.arange(1, K + 1, dtype=torch.float64)
    if kind == "increasing":
        w = k
    elif kind == "uniform":
        w = torch.ones_like(k)
    else:  # "last"
        w = (k == K).double()
    return w / w.sum()


# --------------------------------------------------------------------------------------
# the initializer h_phi(x)
# --------------------------------------------------------------------------------------


class MLPInitializer(nn.Module):
    """``z0 = W2 relu(W1 x + b1) + b2`` for flat inputs ``(B, in_features) -> (B, state_dim)``.

    The shallow layer + ReLU + projection of Sec. 4.1 / App. B, with a narrow hidden layer
    (``hidden`` << ``state_dim``) so the guess costs little and has little capacity: its job is
    a good start, not a good model.

    >>> MLPInitializer(64, 256, hidden=8)(torch.zeros(5, 64)).shape
    torch.Size([5, 256])
    """

    def __init__(self, in_features: int, state_dim: int, hidden: int = 8):
        super().__init__()
        for name, v in (("in_features", in_features), ("state_dim", state_dim), ("hidden", hidden)):
            check_int(name, v)
        self.in_features, self.state_dim = in_features, state_dim
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, state_dim))

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"MLPInitializer expects x of shape (B, {self.in_features}), got {tuple(x.shape)}; "
                f"flatten the input or build the initializer with in_features={x.shape[-1] if x.dim() else '?'}")
        return self.net(x.to(self.net[0].weight.dtype))


class ConvInitializer(nn.Module):
    """``z0 = conv1x1(relu(conv_k(x)))`` for image inputs ``(B, C_in, H, W) -> (B, C, H, W)``.

    The vision initializer of App. B (Fig. 6b): a small-context convolution (kernel 3) + ReLU,
    then a 1x1 projection to the state's channels. Works for any ``H, W``.

    >>> ConvInitializer(3, 16, hidden=4)(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 16, 8, 8])
    """

    def __init__(self, in_channels: int, state_channels: int, hidden: int = 8, kernel_size: int = 3):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("state_channels", state_channels),
                        ("hidden", hidden), ("kernel_size", kernel_size)):
            check_int(name, v)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (to keep H, W), got {kernel_size}")
        self.in_channels = in_channels
        self.conv = nn.Conv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2)
        self.proj = nn.Conv2d(hidden, state_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ConvInitializer expects x of shape (B, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        return self.proj(torch.relu(self.conv(x.to(self.conv.weight.dtype))))


# --------------------------------------------------------------------------------------
# the mixing networks: history of residuals -> (alpha_hat, beta)
# --------------------------------------------------------------------------------------


class LeastSquaresMixer(nn.Module):
    """Anderson's own weights as a mixer: ``alpha_hat`` = least-squares weights (Eq. 2),
    ``beta`` constant. With it, :class:`HyperSolver` *is* Anderson with the same memory ``m``
    (the "shift" normalisation leaves weights that already sum to one unchanged). It is the
    default mixer, so ``solve(f, z0, solver="hyper")`` works without training."""

    def __init__(self, beta: float = 1.0, ridge: float = 1e-4, scale_ridge: bool = True):
        super().__init__()
        check_number("beta", beta, lo=0.0, hi=1.0, low_open=True)
        self.beta, self.ridge, self.scale_ridge = float(beta), float(ridge), bool(scale_ridge)

    def forward(self, G: Tensor, order: Optional[Tensor] = None,
                gram: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``G``: ``(B, T, n)`` residuals -> ``alpha_hat (B, T)`` (rows as in ``G``), ``beta (B,)``.
        Least squares does not care about the order of the rows, so ``order`` is unused."""
        alpha = anderson_weights(G, self.ridge, self.scale_ridge, gram=gram)
        return alpha, G.new_full((G.shape[0],), self.beta)


class HyperAndersonNet(nn.Module):
    """The network ``s_xi`` of Alg. 2: compressed residual history -> ``(alpha_hat, beta)``.

    Args:
        m: memory: the history holds up to ``m`` residuals, the iterates that are mixed (as in
            :class:`deqlite.solvers.Anderson`; the paper's memory is ``m - 1``).
        state_dim: ``n`` for a flat ``(B, n)`` state: each residual is compressed by a learned
            linear projection ``n -> compress_dim``.
        channels: ``C`` for a ``(B, C, H, W)`` state: each residual is compressed by global
            average pooling over ``H, W`` (Eq. 4), so the net works for any image size.
            Give exactly one of ``state_dim`` and ``channels``.
        compress_dim: size of the projection (flat states only).
        hidden: channels of the temporal convolution.
        kernel_size: kernel of both temporal convolution layers.
        beta_max: ``beta = beta_max * sigmoid(.)``, in ``(0, beta_max)``.
        last_weight_init: the raw weight of the newest iterate at initialisation, so that the
            untrained solver takes a damped plain step (use ~4 with ``alpha_mode="softmax"``).
        beta_init: ``beta`` at initialisation.

    Features per history slot (oldest first, left-padded with zeros to ``m``): the
    compressed residual divided by the largest compressed norm in the window, the log of
    ``||g_i|| / max_j ||g_j||`` and a 0/1 slot-is-filled mask: ``(B, features, m)``.
    """

    def __init__(self, m: int = 6, *, state_dim: Optional[int] = None, channels: Optional[int] = None,
                 compress_dim: int = 8, hidden: int = 16, kernel_size: int = 3, beta_max: float = 1.0,
                 last_weight_init: float = 1.0, beta_init: float = 0.9, gram: bool = False):
        super().__init__()
        check_int("m", m)
        if (state_dim is None) == (channels is None):
            raise ValueError("give exactly one of state_dim= (flat (B, D) states) or channels= "
                             f"((B, C, H, W) states), got state_dim={state_dim!r}, channels={channels!r}")
        for name, v in (("hidden", hidden), ("kernel_size", kernel_size)):
            check_int(name, v)
        check_int("compress_dim", compress_dim, lo=0)
        if compress_dim == 0 and not gram:
            raise ValueError("compress_dim=0 with gram=False leaves the network no view of the residuals; "
                             "set compress_dim >= 1 or gram=True")
        if not (0.0 < beta_max and 0.0 < beta_init < beta_max):
            raise ValueError(f"need 0 < beta_init < beta_max, got beta_init={beta_init}, beta_max={beta_max}")
        self.m, self.state_dim, self.channels, self.beta_max = m, state_dim, channels, float(beta_max)
        self.gram = bool(gram)
        if state_dim is not None:
            check_int("state_dim", state_dim)
            self.compress = nn.Linear(state_dim, compress_dim, bias=False) if compress_dim else None
            c = compress_dim
        else:
            check_int("channels", channels)
            self.compress = None
            c = channels
        pad = kernel_size // 2
        n_feat = c + 2 + (m if gram else 0)
        self.conv1 = nn.Conv1d(n_feat, hidden, kernel_size, padding=pad)
        self.conv2 = nn.Conv1d(hidden, 2, kernel_size, padding=pad)
        with torch.no_grad():  # start near "alpha = newest, beta = beta_init"
            self.conv2.weight.mul_(0.1)
            self.conv2.bias.zero_()
        prior = torch.zeros(m)
        prior[-1] = last_weight_init
        self.alpha_bias = nn.Parameter(prior)
        p = beta_init / beta_max
        self.beta_bias = nn.Parameter(torch.tensor(math.log(p / (1 - p))))

    def compressed(self, G: Tensor) -> Tensor:
        """``(B, T, n)`` residuals -> ``(B, T, c)`` compressed residuals (Eq. 4)."""
        B, T, n = G.shape
        if self.state_dim is not None:
            if n != self.state_dim:
                raise ValueError(f"the state has {n} entries per sample but this HyperAndersonNet was "
                                 f"built for state_dim={self.state_dim}; rebuild it with state_dim={n}")
            if self.compress is None:  # no projection: the Gram features alone
                return G.new_zeros(B, T, 0).to(self.conv1.weight.dtype)
            return self.compress(G.to(self.compress.weight.dtype))
        C = self.channels
        if n % C != 0:
            raise ValueError(f"the state has {n} entries per sample, not a multiple of channels={C}; "
                             f"for (B, C, H, W) states build the net with channels=C")
        return G.reshape(B, T, C, n // C).mean(-1).to(self.conv1.weight.dtype)  # global pooling

    def forward(self, G: Tensor, order: Optional[Tensor] = None,
                gram: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``G``: ``(B, T, n)`` residuals, ``1 <= T <= m``; ``order`` ``(T,)`` lists its rows
        oldest to newest (``None``: they already are); ``gram`` ``(B, T, T)``: ``G G^T`` if the
        caller has it. Returns ``alpha_hat`` ``(B, T)`` for the rows of ``G`` and ``beta``
        ``(B,)``, in ``G``'s dtype."""
        B, T, n = G.shape
        if not 1 <= T <= self.m:
            raise ValueError(f"history length {T} outside 1..m = 1..{self.m}")
        c = self.compressed(G)  # (B, T, c)
        dt = c.dtype
        tiny = torch.finfo(dt).tiny
        if gram is None:
            gram = torch.bmm(G, G.transpose(1, 2))  # (B, T, T)
        gram = gram.to(dt)
        # scale-free features: residuals shrink by orders of magnitude during a solve
        if c.shape[-1]:
            c = c / c.norm(dim=-1).amax(-1).clamp_min(tiny)[:, None, None]
        sq = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(tiny)  # (B, T) ||g_i||^2
        top = sq.amax(-1, keepdim=True)
        logr = (0.5 * torch.log(sq / top)).clamp_min(-30.0)  # log(||g_i|| / max_j ||g_j||)
        parts = [c, logr.unsqueeze(-1), torch.ones_like(logr).unsqueeze(-1)]
        if self.gram:  # <g_i, g_j> / max ||g||^2: what Anderson's least squares looks at (Eq. 2)
            parts.append(F.pad(gram / top[:, :, None], (self.m - T, 0)))  # (B, T, m)
        feats = torch.cat(parts, -1)  # (B, T, features), rows of G
        if order is not None:  # per-row features are computed in storage order; now sort them
            feats = feats[:, order]
            if self.gram:
                n_g = self.m
                gram_cols = feats[:, :, -n_g:][:, :, n_g - T:]  # (B, T, T), columns in storage order
                feats = torch.cat([feats[:, :, :-n_g], F.pad(gram_cols[:, :, order], (n_g - T, 0))], -1)
        feats = F.pad(feats.transpose(1, 2), (self.m - T, 0))  # (B, features, m), left-padded
        h = self.conv2(torch.relu(self.conv1(feats)))  # (B, 2, m)
        alpha_hat = h[:, 0, -T:] + self.alpha_bias[-T:]  # (B, T), oldest first
        beta = self.beta_max * torch.sigmoid(h[:, 1, -T:].mean(-1) + self.beta_bias)  # (B,)
        if order is not None:  # back to the rows of G
            alpha_hat = torch.empty_like(alpha_hat).index_copy_(1, order, alpha_hat)
        return alpha_hat.to(G.dtype), beta.to(G.dtype)

