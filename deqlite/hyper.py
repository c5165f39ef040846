"""Neural deep equilibrium solvers: a learned initializer and HyperAnderson iterations.

Bai, Koltun & Kolter, *Neural Deep Equilibrium Solvers* (ICLR 2022), seed 002. A DEQ solves
the same kind of fixed-point problem ``z = f(z, x)`` for every input ``x``; a tiny network
can learn to solve *this* ``f`` faster than a generic method. The solver has two parts:

* an **initializer** ``z0 = h_phi(x)`` (Sec. 4.1, Eq. 3): a shallow layer + ReLU +
  projection that guesses the fixed point from the input;
* **HyperAnderson iterations** (Alg. 2): keep the last ``m + 1`` iterates ``z_i``, their
  images ``f(z_i)`` and residuals ``g_i = f(z_i) - z_i``; compress each residual (Eq. 4:
  global pooling over the spatial dimensions of a ``(B, C, H, W)`` state, a small linear
  projection for a flat ``(B, D)`` state); a 2-layer temporal convolution over this short
  history predicts ``alpha_hat`` (``m_k + 1`` weights) and ``beta``; then::

      alpha  = alpha_hat + (1 - sum(alpha_hat)) / (m_k + 1)        # sums to one, may be < 0
      z_next = beta * sum_i alpha_i f(z_i) + (1 - beta) * sum_i alpha_i z_i

  which is Anderson's update (Alg. 1) with learned instead of least-squares weights.

Training (Sec. 4.2, Fig. 3) keeps the DEQ frozen and uses no labels: fixed points ``z*``
come from a classic solver run to high precision, and the solver is unrolled for ``K``
steps and trained by backpropagation through them on three losses::

    L_conv  = sum_k w_k ||z_k - z*||        (w_k increasing, sum to one; Eq. 7: w_k ~ k)
    L_init  = ||h_phi(x) - z*||              (the only loss the initializer sees)
    L_alpha = sum_k ||G_k alpha_k||           (Anderson's objective, Eq. 2; weight decayed to ~0)

The trained solver is a :class:`deqlite.solvers.Solver`, so ``solve`` and ``DEQ`` run it
through the same loop, with the same stopping rules and :class:`~deqlite.SolverTrace`, as
every classic solver. The mixing network sees only the iteration history, never ``x``;
the initializer needs ``x`` and so runs *before* the solve::

    hyper = HyperSolver.build(state_dim=256, input_dim=64)
    train_hypersolver(hyper, deq_f, x_train)           # f(z, x), frozen
    z_star, trace = hyper_solve(hyper, deq_f, x)        # = solve(f(., x), hyper.initial_state(x), solver=hyper)

The defaults follow the paper: compressed residuals as the network's features (pooling for
images, a learned projection for flat states), the shifted normalisation, ``w_k ~ k`` and the
loss weights ``lambda = (0.1, 0.05, 1e-4)`` of its App. A (:func:`train_hypersolver`).
Choices the paper leaves open, and options that depart from it (chapter 4 says why it uses
them), are documented where they are made:

* every history slot is also described by its log-norm, and all features are divided by the
  largest norm in the window: residuals shrink by orders of magnitude during a solve, and
  the network should see the *shape* of the history;
* ``gram=True`` (not the paper's) adds each slot's row of the Gram matrix ``<g_i, g_j>``
  (what Anderson's least squares looks at; size-independent, no parameters), and with
  ``compress_dim=0`` replaces the projection, whose ``D x c`` weights would exceed the
  paper's 1-3% budget on a small flat DEQ;
* the weights start at "take the newest iterate" (a damped plain step), not at a uniform
  average;
* ``conv_loss="log"`` (optional) puts ``log ||z_k - z*||`` in ``L_conv`` so that late steps
  still get gradient; ``"l2"`` (default) is the paper's;
* the initializer may train with its own learning rate and batch (it needs no unrolling).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .solvers import Solver, register_solver, solve
from .solvers.anderson import AndersonHistory, least_squares_weights

__all__ = [
    "ALPHA_MODES", "LOSS_WEIGHTS", "MLPInitializer", "ConvInitializer", "HyperAndersonNet",
    "LeastSquaresMixer", "HyperSolver", "normalize_alpha", "anderson_weights", "loss_weights",
    "unroll", "hyper_losses", "fixed_points", "train_hypersolver", "TrainLog", "hyper_solve",
    "budget_curve", "matched_nfe", "count_parameters", "median_time", "budget_times",
    "budget_snapshot", "race_snapshot", "steps_figure", "pareto_figure", "slow_digits_deq", "frozen_map",
    "median_times",
]

ALPHA_MODES = ("shift", "softmax", "none")
LOSS_WEIGHTS = ("increasing", "uniform", "last")


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def count_parameters(*modules: Optional[nn.Module]) -> int:
    """Number of trainable entries in the given modules (``None`` counts as 0)."""
    return sum(p.numel() for mod in modules if mod is not None for p in mod.parameters())


def _check_pos_int(name: str, value: Any, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def normalize_alpha(alpha_hat: Tensor, mode: str = "shift") -> Tensor:
    """Turn raw weights ``alpha_hat`` ``(B, T)`` (``T = m_k + 1``) into mixing weights.

    ``"shift"`` (Alg. 2, the paper's choice): ``alpha = alpha_hat + (1 - sum alpha_hat) / T``,
    which sums to one and may be negative, like Anderson's least-squares weights.
    ``"softmax"``: ``softmax(alpha_hat)``, positive weights summing to one (App. C ablation).
    ``"none"``: ``alpha_hat`` unchanged (App. C ablation, "unnormalised").

    >>> normalize_alpha(torch.tensor([[0.2, 0.3, 0.9]])).sum().item()
    1.0
    """
    if mode == "shift":
        T = alpha_hat.shape[-1]
        return alpha_hat + (1.0 - alpha_hat.sum(-1, keepdim=True)) / T
    if mode == "softmax":
        return torch.softmax(alpha_hat, dim=-1)
    if mode == "none":
        return alpha_hat
    raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {mode!r}")


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
    _check_pos_int("K", K)
    k = torch.arange(1, K + 1, dtype=torch.float64)
    if kind == "increasing":
        w = k
    elif kind == "uniform":
        w = torch.ones_like(k)
    elif kind == "last":
        w = (k == K).double()
    else:
        raise ValueError(f"weights must be one of {LOSS_WEIGHTS}, got {kind!r}")
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
            _check_pos_int(name, v)
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
            _check_pos_int(name, v)
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
    ``beta`` constant. With it, :class:`HyperSolver` *is* Anderson with memory ``m + 1``
    (the "shift" normalisation leaves weights that already sum to one unchanged). It is the
    default mixer, so ``solve(f, z0, solver="hyper")`` works without training."""

    def __init__(self, beta: float = 1.0, ridge: float = 1e-4, scale_ridge: bool = True):
        super().__init__()
        if not (isinstance(beta, (int, float)) and 0.0 < beta <= 1.0):
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
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
        m: memory; the history holds up to ``m + 1`` residuals.
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

    Features per history slot (oldest first, left-padded with zeros to ``m + 1``): the
    compressed residual divided by the largest compressed norm in the window, the log of
    ``||g_i|| / max_j ||g_j||`` and a 0/1 slot-is-filled mask: ``(B, features, m + 1)``.
    """

    def __init__(self, m: int = 5, *, state_dim: Optional[int] = None, channels: Optional[int] = None,
                 compress_dim: int = 8, hidden: int = 16, kernel_size: int = 3, beta_max: float = 1.0,
                 last_weight_init: float = 1.0, beta_init: float = 0.9, gram: bool = False):
        super().__init__()
        _check_pos_int("m", m)
        if (state_dim is None) == (channels is None):
            raise ValueError("give exactly one of state_dim= (flat (B, D) states) or channels= "
                             f"((B, C, H, W) states), got state_dim={state_dim!r}, channels={channels!r}")
        for name, v in (("hidden", hidden), ("kernel_size", kernel_size)):
            _check_pos_int(name, v)
        _check_pos_int("compress_dim", compress_dim, lo=0)
        if compress_dim == 0 and not gram:
            raise ValueError("compress_dim=0 with gram=False leaves the network no view of the residuals; "
                             "set compress_dim >= 1 or gram=True")
        if not (0.0 < beta_max and 0.0 < beta_init < beta_max):
            raise ValueError(f"need 0 < beta_init < beta_max, got beta_init={beta_init}, beta_max={beta_max}")
        self.m, self.state_dim, self.channels, self.beta_max = m, state_dim, channels, float(beta_max)
        self.gram = bool(gram)
        if state_dim is not None:
            _check_pos_int("state_dim", state_dim)
            self.compress = nn.Linear(state_dim, compress_dim, bias=False) if compress_dim else None
            c = compress_dim
        else:
            _check_pos_int("channels", channels)
            self.compress = None
            c = channels
        pad = kernel_size // 2
        n_feat = c + 2 + (m + 1 if gram else 0)
        self.conv1 = nn.Conv1d(n_feat, hidden, kernel_size, padding=pad)
        self.conv2 = nn.Conv1d(hidden, 2, kernel_size, padding=pad)
        with torch.no_grad():  # start near "alpha = newest, beta = beta_init"
            self.conv2.weight.mul_(0.1)
            self.conv2.bias.zero_()
        prior = torch.zeros(m + 1)
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
        """``G``: ``(B, T, n)`` residuals, ``1 <= T <= m + 1``; ``order`` ``(T,)`` lists its rows
        oldest to newest (``None``: they already are); ``gram`` ``(B, T, T)``: ``G G^T`` if the
        caller has it. Returns ``alpha_hat`` ``(B, T)`` for the rows of ``G`` and ``beta``
        ``(B,)``, in ``G``'s dtype."""
        B, T, n = G.shape
        if not 1 <= T <= self.m + 1:
            raise ValueError(f"history length {T} outside 1..m+1 = 1..{self.m + 1}")
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
            parts.append(F.pad(gram / top[:, :, None], (self.m + 1 - T, 0)))  # (B, T, m+1)
        feats = torch.cat(parts, -1)  # (B, T, features), rows of G
        if order is not None:  # per-row features are computed in storage order; now sort them
            feats = feats[:, order]
            if self.gram:
                n_g = self.m + 1
                gram_cols = feats[:, :, -n_g:][:, :, n_g - T:]  # (B, T, T), columns in storage order
                feats = torch.cat([feats[:, :, :-n_g], F.pad(gram_cols[:, :, order], (n_g - T, 0))], -1)
        feats = F.pad(feats.transpose(1, 2), (self.m + 1 - T, 0))  # (B, features, m+1), left-padded
        h = self.conv2(torch.relu(self.conv1(feats)))  # (B, 2, m+1)
        alpha_hat = h[:, 0, -T:] + self.alpha_bias[-T:]  # (B, T), oldest first
        beta = self.beta_max * torch.sigmoid(h[:, 1, -T:].mean(-1) + self.beta_bias)  # (B,)
        if order is not None:  # back to the rows of G
            alpha_hat = torch.empty_like(alpha_hat).index_copy_(1, order, alpha_hat)
        return alpha_hat.to(G.dtype), beta.to(G.dtype)


# --------------------------------------------------------------------------------------
# the solver
# --------------------------------------------------------------------------------------


@register_solver("hyper")
@dataclass(frozen=True, eq=False)
class HyperSolver(Solver):
    """HyperAnderson iterations (Alg. 2 of Bai, Koltun & Kolter 2022) as a deqlite solver.

    Args:
        mixer: ``mixer(G, order=None, gram=None) -> (alpha_hat (B, T), beta (B,))`` for a
            ``(B, T, n)`` residual history whose rows are oldest to newest in the order
            ``order`` ``(T,)`` (``None``: as stored), with ``gram = G G^T``; a trained
            :class:`HyperAndersonNet`, or
            :class:`LeastSquaresMixer` (the default: Anderson).
        m: memory; the last ``m + 1`` iterates are mixed (the net's ``m`` must match).
        alpha_mode: ``"shift"`` (the paper), ``"softmax"`` or ``"none"``; see :func:`normalize_alpha`.
        initializer: ``h_phi``, ``x -> z0`` (applied by :meth:`initial_state`, outside the solve,
            because the solve loop never sees ``x``); ``None`` starts from zeros.
        state_shape: trailing shape of the state, used for the zero start when there is no
            initializer (optional otherwise).

    Each step costs one evaluation of ``f`` (made by the loop) plus the tiny mixer.

    >>> from deqlite import solve
    >>> z, tr = solve(torch.cos, torch.zeros(2, 1, dtype=torch.float64), solver=HyperSolver(), tol=1e-10)
    >>> round(z[0, 0].item(), 6), tr.status
    (0.739085, 'converged')
    """

    mixer: nn.Module = field(default_factory=LeastSquaresMixer)
    m: int = 5
    alpha_mode: str = "shift"
    initializer: Optional[nn.Module] = None
    state_shape: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        _check_pos_int("m", self.m)
        if not callable(self.mixer):
            raise TypeError(f"mixer must be an nn.Module mapping G (B, T, n) -> (alpha_hat, beta), "
                            f"got {type(self.mixer).__name__}")
        if self.alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {self.alpha_mode!r}")
        net_m = getattr(self.mixer, "m", None)
        if isinstance(net_m, int) and net_m != self.m:
            raise ValueError(f"the mixer was built with m={net_m} but the solver has m={self.m}; "
                             f"pass m={net_m}")
        if self.initializer is not None and not callable(self.initializer):
            raise TypeError(f"initializer must be an nn.Module x -> z0, got {type(self.initializer).__name__}")
        if self.state_shape is not None:
            object.__setattr__(self, "state_shape", tuple(int(s) for s in self.state_shape))

    def __repr__(self) -> str:
        ini = type(self.initializer).__name__ if self.initializer is not None else None
        return (f"HyperSolver(mixer={type(self.mixer).__name__}, m={self.m}, alpha_mode={self.alpha_mode!r}, "
                f"initializer={ini}, parameters={self.num_parameters()})")

    # -- construction ---------------------------------------------------------------
    @classmethod
    def build(cls, *, state_dim: Optional[int] = None, channels: Optional[int] = None,
              input_dim: Optional[int] = None, input_channels: Optional[int] = None, m: int = 5,
              alpha_mode: str = "shift", use_initializer: bool = True, init_hidden: int = 8,
              compress_dim: int = 8, hidden: int = 16, beta_max: float = 1.0, gram: bool = False, seed: int = 0,
              state_shape: Optional[Sequence[int]] = None) -> "HyperSolver":
        """An untrained neural solver for flat states (``state_dim``; initializer from flat
        inputs of size ``input_dim``) or image states (``channels``; initializer from images with
        ``input_channels``). ``use_initializer=False`` starts from zeros (ablation).

        >>> HyperSolver.build(state_dim=32, input_dim=8).initial_state(torch.zeros(4, 8)).shape
        torch.Size([4, 32])
        """
        if alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {alpha_mode!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = HyperAndersonNet(m, state_dim=state_dim, channels=channels, compress_dim=compress_dim,
                                   hidden=hidden, beta_max=beta_max, gram=gram,
                                   last_weight_init=4.0 if alpha_mode == "softmax" else 1.0)
            ini: Optional[nn.Module] = None
            if use_initializer:
                if state_dim is not None:
                    if input_dim is None:
                        raise ValueError("a flat-state initializer needs input_dim= (features of x); "
                                         "or pass use_initializer=False")
                    ini = MLPInitializer(input_dim, state_dim, hidden=init_hidden)
                else:
                    if input_channels is None:
                        raise ValueError("an image-state initializer needs input_channels= (channels of x); "
                                         "or pass use_initializer=False")
                    ini = ConvInitializer(input_channels, channels, hidden=init_hidden)
        if state_shape is None and state_dim is not None:
            state_shape = (state_dim,)
        return cls(mixer=net, m=m, alpha_mode=alpha_mode, initializer=ini,
                   state_shape=tuple(state_shape) if state_shape is not None else None)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the mixer and the initializer."""
        for mod in (self.mixer, self.initializer):
            if mod is not None:
                yield from mod.parameters()

    def num_parameters(self) -> int:
        return count_parameters(self.mixer, self.initializer)

    def train(self, mode: bool = True) -> "HyperSolver":
        for mod in (self.mixer, self.initializer):
            if mod is not None:
                mod.train(mode)
        return self

    def eval(self) -> "HyperSolver":
        return self.train(False)

    # -- the start --------------------------------------------------------------------
    def initial_state(self, x: Tensor, state_shape: Optional[Sequence[int]] = None) -> Tensor:
        """``z0 = h_phi(x)``; zeros of ``(B, *state_shape)`` when there is no initializer."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, ...), got {type(x).__name__}")
        if self.initializer is not None:
            return self.initializer(x)
        shape = tuple(state_shape) if state_shape is not None else self.state_shape
        if shape is None:
            raise ValueError("this HyperSolver has no initializer and no state_shape: pass "
                             "initial_state(x, state_shape=(D,)) or build it with state_shape=")
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        return x.new_zeros((x.shape[0],) + shape, dtype=dtype)

    # -- the Solver protocol -----------------------------------------------------------
    def init(self, z0: Tensor) -> AndersonHistory:
        return AndersonHistory(self.m + 1)  # the last m + 1 iterates

    def mix(self, z: Tensor, fz: Tensor, state: AndersonHistory) -> Tuple[Tensor, AndersonHistory, Dict[str, Tensor]]:
        """One HyperAnderson update (Alg. 2, lines 4-6) on flattened ``(B, n)`` states.

        The history is :class:`deqlite.solvers.anderson.AndersonHistory`, the one
        :class:`~deqlite.solvers.Anderson` keeps (a ring buffer inside :func:`deqlite.solve`,
        re-stacked oldest first under autograd); only the weights differ: the mixer chooses
        them from the residuals ``G`` (storage order, with the chronological ``order`` of its
        rows and ``gram = G G^T``). The update
        ``beta sum alpha_i f(z_i) + (1 - beta) sum alpha_i z_i`` is computed as
        ``sum alpha_i f(z_i) - (1 - beta) sum alpha_i g_i``.

        Returns ``z_next``, the history and ``{"alpha": (B, T), "beta": (B,), "G_alpha":
        (B, n)}`` (``G_alpha = sum_i alpha_i g_i``, the residual Anderson minimises), with
        ``alpha`` oldest first.
        """
        state.push(fz, fz - z)
        Fh, Gh = state.rows()  # (B, T, n), T = m_k + 1
        order = state.order()
        alpha_hat, beta = self.mixer(Gh, order=order, gram=state.gram(z.dtype))
        if alpha_hat.shape != Gh.shape[:2] or beta.shape != Gh.shape[:1]:
            raise ValueError(f"the mixer must return alpha_hat {tuple(Gh.shape[:2])} and beta "
                             f"{tuple(Gh.shape[:1])}, got {tuple(alpha_hat.shape)} and {tuple(beta.shape)}")
        alpha = normalize_alpha(alpha_hat, self.alpha_mode)  # (B, T); normalising ignores order
        mixed_g = state.combine(alpha, Gh)
        z_next = state.combine(alpha, Fh) - (1.0 - beta)[:, None] * mixed_g
        if order is not None:
            alpha = alpha[:, order]
        return z_next, state, {"alpha": alpha, "beta": beta, "G_alpha": mixed_g}

    def step(self, f, z, fz, state):
        z_next, state, _ = self.mix(z, fz, state)
        return z_next, state


# --------------------------------------------------------------------------------------
# unrolling, losses, training
# --------------------------------------------------------------------------------------


def unroll(hyper: HyperSolver, f: Callable[[Tensor], Tensor], z0: Tensor, K: int) -> Dict[str, Any]:
    """Run ``K`` HyperAnderson steps *with* autograd (for training; :func:`solve` runs without).

    ``f``: ``(B, ...) -> (B, ...)``; ``z0``: ``(B, ...)``. Uses ``K`` evaluations of ``f`` and
    returns ``{"z": [z_1..z_K] (each (B, n)), "G_alpha": [K x (B, n)], "alpha": [...],
    "beta": [...], "residual": [K x (B,)] ||f(z_k) - z_k|| for k = 0..K-1}``.
    """
    _check_pos_int("K", K)
    B = z0.shape[0]
    shape = z0.shape
    z = z0.reshape(B, -1)
    state = hyper.init(z)
    out: Dict[str, List[Tensor]] = {"z": [], "G_alpha": [], "alpha": [], "beta": [], "residual": []}
    for _ in range(K):
        fz = f(z.view(shape)).reshape(B, -1)
        out["residual"].append((fz - z).norm(dim=1))
        z, state, info = hyper.mix(z, fz, state)
        out["z"].append(z)
        for key in ("G_alpha", "alpha", "beta"):
            out[key].append(info[key])
    return out


def hyper_losses(hyper: HyperSolver, f: Callable[[Tensor], Tensor], x: Tensor, z_star: Tensor, K: int,
                 weights: Union[str, Tensor] = "increasing", conv_loss: str = "l2") -> Dict[str, Tensor]:
    """The three losses of Sec. 4.2 on one batch (means over the batch of per-sample norms).

    ``L_conv = sum_k w_k ||z_k - z*||`` over ``k = 1..K``; ``L_init = ||h_phi(x) - z*||``;
    ``L_alpha = sum_k ||G_k alpha_k||``. As in Fig. 3, the initializer is trained by ``L_init``
    only: its output enters the unrolled iterations detached.

    ``conv_loss="log"`` uses ``sum_k w_k log ||z_k - z*||`` instead (not in the paper): errors
    fall by orders of magnitude over ``K`` steps, and on the plain norm the late steps, the
    ones that decide how many evaluations a tolerance costs, contribute almost no gradient.
    """
    if conv_loss not in ("l2", "log"):
        raise ValueError(f"conv_loss must be 'l2' or 'log', got {conv_loss!r}")
    z0 = hyper.initial_state(x, state_shape=tuple(z_star.shape[1:]))
    if z0.shape != z_star.shape:
        raise ValueError(f"the initializer returns {tuple(z0.shape)} but z_star is {tuple(z_star.shape)}")
    w = loss_weights(K, weights) if isinstance(weights, str) else weights
    if w.shape != (K,):
        raise ValueError(f"weights must have shape ({K},), got {tuple(w.shape)}")
    w = w.to(device=z_star.device, dtype=z_star.dtype)
    zs = z_star.reshape(z_star.shape[0], -1)
    run = unroll(hyper, f, z0.detach(), K)
    errs = torch.stack([(zk - zs).norm(dim=1) for zk in run["z"]], 1)  # (B, K)
    if conv_loss == "log":
        l_conv = (torch.log(errs + 1e-12) * w).sum(1).mean()
    else:
        l_conv = (errs * w).sum(1).mean()
    l_init = (z0.reshape(zs.shape) - zs).norm(dim=1).mean() if hyper.initializer is not None else zs.new_zeros(())
    l_alpha = torch.stack([ga.norm(dim=1) for ga in run["G_alpha"]], 1).sum(1).mean()
    return {"conv": l_conv, "init": l_init, "alpha": l_alpha, "final_error": errs[:, -1].mean()}


def fixed_points(f: Callable[[Tensor, Tensor], Tensor], x: Tensor, *, batch_size: int = 512,
                 solver: str = "anderson", tol: float = 1e-6, max_iter: int = 200, state_shape=None,
                 z0: Optional[Tensor] = None, **solver_options: Any) -> Tuple[Tensor, float]:
    """Precise fixed points ``z*(x)`` of a frozen map ``f(z, x)`` with a classic solver.

    ``x``: ``(N, ...)``; the state starts at zeros of ``(N, *state_shape)`` (or at ``z0``).
    Returns ``(z_star (N, ...), worst relative residual)``; check the second number.
    """
    if z0 is None:
        if state_shape is None:
            raise ValueError("pass state_shape=(D,) (or z0=) so the solve knows the state's shape")
        z0 = x.new_zeros((x.shape[0],) + tuple(state_shape))
    outs, worst = [], 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        z, tr = solve(lambda z: f(z, xb), z0[i:i + batch_size], solver=solver, tol=tol,
                      max_iter=max_iter, on_failure="ignore", **solver_options)
        outs.append(z)
        worst = max(worst, float(tr.best_residual.max()))
    return torch.cat(outs), worst


@dataclass
class TrainLog:
    """What :func:`train_hypersolver` did: per logged step the losses, and totals."""

    step: List[int] = field(default_factory=list)
    conv: List[float] = field(default_factory=list)
    init: List[float] = field(default_factory=list)
    alpha: List[float] = field(default_factory=list)
    final_error: List[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    z_star_residual: float = float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def train_hypersolver(hyper: HyperSolver, f: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                      z_star: Optional[Tensor] = None, *, K: int = 8, steps: int = 1000,
                      batch_size: int = 32, lr: float = 1e-3, weights: str = "increasing", conv_loss: str = "l2",
                      lambda_conv: float = 0.1, lambda_init: float = 0.05, lambda_alpha: float = 1e-4,
                      alpha_floor: float = 5e-8, alpha_decay_steps: Optional[int] = None,
                      time_budget: Optional[float] = None,
                      init_lr: Optional[float] = None, init_batch_size: Optional[int] = None,
                      seed: int = 0, log_every: int = 25) -> TrainLog:
    """Train ``hyper`` on a frozen map ``f(z, x)`` over inputs ``x`` ``(N, ...)`` (no labels).

    Each step draws ``batch_size`` inputs, unrolls ``K`` HyperAnderson steps and minimises
    ``lambda_conv L_conv + lambda_init L_init + lambda_alpha(t) L_alpha`` (Sec. 4.2) with Adam
    and cosine learning-rate annealing (App. A.1). The default weights are the paper's
    (Table 3 of App. A, the WikiText-103 column: ``lambda_1 = 0.1``, ``lambda_2 = 0.05``,
    ``lambda_3 = 1e-4``; its vision models use 0.02 and 1e-5); ``lambda_alpha(t)`` decays
    linearly to ``alpha_floor`` (the paper's 5e-8) over ``alpha_decay_steps`` (the paper: 2,000
    of its 3-5K steps; default here: 40% of ``steps``). With Adam and the initializer in its
    own parameter group (it only sees ``L_init``), what matters is the ratio
    ``lambda_alpha / lambda_conv``. Only the solver's
    parameters get gradients (``f``'s ``.grad`` stays untouched). ``z_star`` defaults to
    :func:`fixed_points` (Anderson to relative residual 1e-6). ``time_budget`` (seconds) stops
    early. The initializer, trained by ``L_init`` alone, may get its own learning rate
    ``init_lr`` and its own (cheap, larger) batch ``init_batch_size``: it needs no unrolling.
    Returns a :class:`TrainLog`.
    """
    if not isinstance(hyper, HyperSolver):
        raise TypeError(f"hyper must be a HyperSolver, got {type(hyper).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch of inputs (N, ...), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    for name, v in (("K", K), ("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        _check_pos_int(name, v)
    if init_batch_size is not None:
        _check_pos_int("init_batch_size", init_batch_size)
    if weights not in LOSS_WEIGHTS:
        raise ValueError(f"weights must be one of {LOSS_WEIGHTS}, got {weights!r}")
    params = list(hyper.parameters())
    if not params:
        raise ValueError("this HyperSolver has nothing to train (a LeastSquaresMixer and no initializer); "
                         "build one with HyperSolver.build(...)")
    log = TrainLog()
    t0 = time.perf_counter()
    if z_star is None:
        state_shape = hyper.state_shape
        if state_shape is None:
            raise ValueError("cannot compute z_star without the state shape: pass z_star= or build "
                             "the solver with state_shape=")
        z_star, log.z_star_residual = fixed_points(f, x, state_shape=state_shape)
    if z_star.shape[0] != x.shape[0]:
        raise ValueError(f"z_star has {z_star.shape[0]} samples but x has {x.shape[0]}")
    z_star = z_star.detach()
    decay = alpha_decay_steps if alpha_decay_steps is not None else max(1, int(0.4 * steps))
    gen = torch.Generator().manual_seed(seed)
    init_params = list(hyper.initializer.parameters()) if hyper.initializer is not None else []
    init_ids = {id(p) for p in init_params}
    groups = [{"params": [p for p in params if id(p) not in init_ids], "lr": lr}]
    if init_params:
        groups.append({"params": init_params, "lr": lr if init_lr is None else init_lr})
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    wk = loss_weights(K, weights)
    hyper.train()
    N = x.shape[0]
    for it in range(steps):
        idx = torch.randint(0, N, (min(batch_size, N),), generator=gen)
        xb, zb = x[idx], z_star[idx]
        L = hyper_losses(hyper, lambda z: f(z, xb), xb, zb, K, wk, conv_loss=conv_loss)
        if init_batch_size is not None and hyper.initializer is not None:  # L_init on its own batch
            idx_i = torch.randint(0, N, (min(init_batch_size, N),), generator=gen)
            zi = z_star[idx_i].reshape(len(idx_i), -1)
            L["init"] = (hyper.initial_state(x[idx_i]).reshape(zi.shape) - zi).norm(dim=1).mean()
        floor = min(alpha_floor, lambda_alpha)
        lam_a = floor + (lambda_alpha - floor) * max(0.0, 1.0 - it / decay)
        loss = lambda_conv * L["conv"] + lambda_init * L["init"] + lam_a * L["alpha"]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        sched.step()
        log.steps = it + 1
        if it % log_every == 0 or it == steps - 1:
            log.step.append(it)
            for key in ("conv", "init", "alpha", "final_error"):
                getattr(log, key).append(float(L[key].detach()))
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            break
    for p in params:
        p.grad = None
    hyper.eval()
    log.seconds = time.perf_counter() - t0
    return log


# --------------------------------------------------------------------------------------
# inference and evaluation
# --------------------------------------------------------------------------------------


def hyper_solve(hyper: HyperSolver, f: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                **solve_options: Any) -> Tuple[Tensor, Any]:
    """``z0 = hyper.initial_state(x)``, then ``solve(lambda z: f(z, x), z0, solver=hyper, ...)``.

    ``f`` is the DEQ map ``f(z, x)``; ``solve_options`` go to :func:`deqlite.solve` (``tol``,
    ``max_iter``, ...). Returns ``(z_star, trace)``; ``trace.extra["init_time"]`` holds the
    initializer's wall time (``trace.wall_time`` is the solve alone).
    """
    if not isinstance(hyper, HyperSolver):
        raise TypeError(f"hyper must be a HyperSolver, got {type(hyper).__name__}")
    t0 = time.perf_counter()
    with torch.no_grad():
        z0 = hyper.initial_state(x)
    t_init = time.perf_counter() - t0
    z, tr = solve(lambda z: f(z, x), z0, solver=hyper, **solve_options)
    tr.extra["init_time"] = t_init
    return z, tr


def budget_curve(f: Callable[[Tensor], Tensor], z0: Tensor, solver: Any, max_nfe: int, *,
                 z_star: Optional[Tensor] = None, readout: Optional[Callable[[Tensor], Tensor]] = None,
                 labels: Optional[Tensor] = None, **solver_options: Any) -> Dict[str, List[float]]:
    """What a solve returns after each budget of ``1..max_nfe`` evaluations, from one run.

    ``solve(f, z0, solver=..., max_iter=K)`` returns the best-so-far iterate per sample; this
    reproduces that for every ``K`` from a single run with ``return_iterates=True``. Returns
    lists indexed by ``K - 1``: ``"nfe"``, ``"rel_residual"`` (median over samples of the
    returned iterate), ``"error"`` (median ``||z - z*|| / ||z*||``, if ``z_star``) and
    ``"accuracy"`` (% of ``argmax readout(z) == labels``, if both are given).
    """
    _, tr = solve(f, z0, solver=solver, tol=1e-30, max_iter=max_nfe, return_iterates=True,
                  on_failure="ignore", **solver_options)
    res = tr.residual  # (T, B)
    its = torch.stack(tr.iterates)  # (T, B, ...)
    T, B = res.shape
    out: Dict[str, List[float]] = {"nfe": [], "rel_residual": [], "error": [], "accuracy": []}
    best = torch.full((B,), math.inf, dtype=res.dtype, device=res.device)
    best_z = its[0].clone()
    if z_star is not None:
        z_star = z_star.to(its.device)
    if labels is not None:
        labels = labels.to(its.device)
    rel = tr.rel_residual
    best_rel = torch.full((B,), math.inf, dtype=res.dtype, device=res.device)
    for k in range(T):
        better = torch.isfinite(res[k]) & (res[k] < best)
        best = torch.where(better, res[k], best)
        best_rel = torch.where(better, rel[k], best_rel)
        best_z = torch.where(better.view((B,) + (1,) * (its.dim() - 2)), its[k], best_z)
        out["nfe"].append(k + 1)
        out["rel_residual"].append(float(best_rel.median()))
        if z_star is not None:
            d = (best_z - z_star).reshape(B, -1).norm(dim=1) / z_star.reshape(B, -1).norm(dim=1).clamp_min(1e-30)
            out["error"].append(float(d.median()))
        if readout is not None and labels is not None:
            with torch.no_grad():
                pred = readout(best_z).argmax(-1)
            out["accuracy"].append(100.0 * float((pred == labels).double().mean()))
    return out


def matched_nfe(values: Sequence[float], target: float, tol: float, higher_is_better: bool = True) -> Optional[int]:
    """Smallest budget (1-based index) from which ``values`` stays within ``tol`` of ``target``
    (``values[k] >= target - tol`` for accuracy, ``<= target + tol`` otherwise) for every
    larger budget too; ``None`` if it never does. Staying, not touching once, keeps a noisy
    curve from claiming an early match."""
    ok = [(v >= target - tol) if higher_is_better else (v <= target + tol) for v in values]
    if not ok or not ok[-1]:
        return None
    k = len(ok)
    while k > 0 and ok[k - 1]:
        k -= 1
    return k + 1


def median_times(fns: Dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> Dict[str, Dict[str, float]]:
    """Median wall-clock *and* CPU seconds (``time.process_time``) of each ``fns[name]()``.

    The runs are interleaved (round ``r`` runs every function once), so load from other
    processes on a shared machine falls on all of them alike; ratios taken from one call
    are the numbers to quote. Returns ``{name: {"wall": s, "cpu": s}}``."""
    _check_pos_int("repeats", repeats)
    _check_pos_int("warmup", warmup, lo=0)
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)

    def med(v: List[float]) -> float:
        v = sorted(v)
        mid = len(v) // 2
        return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])

    return {name: {"wall": med(wall[name]), "cpu": med(cpu[name])} for name in fns}


def slow_digits_deq(width: int = 256, gain: float = 1.1, *, seed: int = 0, inject_scale: float = 0.3,
                    **deq_options: Any) -> nn.Module:
    """An untrained digits :class:`~deqlite.models.mlp.DEQClassifier` whose map is *slow*:
    ``W`` starts as ``gain`` times a random orthogonal matrix and is left unconstrained.

    Its Jacobian at the fixed point, ``diag(1 - z*^2) W``, has eigenvalues spread around a
    circle of radius close to 1, so plain iteration gains little per step and Anderson needs
    15-30 evaluations to a relative residual of 1e-3-1e-4: the regime of the paper's DEQs,
    which need tens of solver steps. (A spectrally normalised ``W``, as in chapter 3, gives
    a map Anderson solves in 6-7 steps: nothing left to accelerate.) The injection starts
    scaled by ``inject_scale`` so the model leans on its equilibrium. Its solves are capped
    at 40 steps with ``on_failure="ignore"`` (pass ``on_failure="warn"`` to see each one).
    """
    from .models.mlp import DEQClassifier

    _check_pos_int("width", width)
    if not (isinstance(gain, (int, float)) and gain > 0):
        raise ValueError(f"gain must be a positive number, got {gain!r}; 0.9-1.3 gives a slow map")
    # the map is slow on purpose: training runs capped solves (40 steps), so the DEQ's
    # non-convergence warning would fire every step; its traces still record each status
    opts: Dict[str, Any] = dict(tol=1e-4, max_iter=40, backward="jacobian_free", on_failure="ignore")
    opts.update(deq_options)
    torch.manual_seed(seed)
    model = DEQClassifier(64, width, 10, radius=None, **opts)
    with torch.no_grad():
        q, r = torch.linalg.qr(torch.randn(width, width))
        model.cell.W.weight.copy_(gain * q * torch.sign(torch.diagonal(r))[None, :])
        model.inject.weight.mul_(inject_scale)
    return model


def frozen_map(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(z, x) = tanh(W z + inject(x))`` of a trained :class:`DEQClassifier`, with ``W``
    read once (a spectral-norm parametrisation would otherwise recompute an SVD per call).
    Freezes the model (``eval()``, no gradients)."""
    model.eval().requires_grad_(False)
    W = model.cell.W.weight.detach().clone()
    inject = model.inject

    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ W.T + inject(x))

    return f


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    _check_pos_int("repeats", repeats)
    _check_pos_int("warmup", warmup, lo=0)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])


def budget_times(f: Callable[[Tensor], Tensor], z0: Tensor, solver: Any, max_nfe: int, *,
                 repeats: int = 3, init: Optional[Callable[[], Tensor]] = None) -> List[float]:
    """Wall-clock seconds until each budget ``1..max_nfe`` of one solve (median of ``repeats``
    runs after a warm-up), read from per-step timestamps. ``init()`` (e.g. the hypersolver's
    initializer) is timed too and replaces ``z0``."""
    _check_pos_int("max_nfe", max_nfe)
    _check_pos_int("repeats", repeats)
    runs: List[List[float]] = []
    for r in range(repeats + 1):
        stamps: List[float] = []
        t0 = time.perf_counter()
        with torch.no_grad():
            start = init() if init is not None else z0
        solve(f, start, solver=solver, tol=1e-30, max_iter=max_nfe, on_failure="ignore",
              callback=lambda info: stamps.append(time.perf_counter() - t0))
        if r:
            runs.append(stamps)
    return [sorted(col)[len(col) // 2] for col in zip(*runs)]


def budget_snapshot(f: Callable[[Tensor], Tensor], starts: Dict[str, Tuple[Any, Tensor]], K: int, *,
                    readout: Callable[[Tensor], Tensor], labels: Tensor) -> Dict[str, Dict[str, Any]]:
    """Each solver after ``K`` evaluations: ``{name: {"rel_residual": (B,) numpy, "accuracy": %}}``.

    ``starts`` maps a name to ``(solver, z0)``. This is the ``compute`` of the chapter's steps
    slider (:func:`steps_figure` draws it)."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, (solver, z0) in starts.items():
        z, tr = solve(f, z0, solver=solver, tol=1e-30, max_iter=K, on_failure="ignore")
        with torch.no_grad():
            acc = 100.0 * float((readout(z).argmax(-1) == labels).double().mean())
        out[name] = {"rel_residual": tr.best_residual.detach().cpu().numpy(), "accuracy": acc, "K": K}
    return out


def steps_figure(snapshot: Dict[str, Dict[str, Any]], height: int = 380):
    """Box plot of the per-sample relative residual (log) and bars of the accuracy of every
    solver after the same number of evaluations (one :func:`budget_snapshot`)."""
    from plotly.subplots import make_subplots  # lazy: ``import deqlite`` must not need plotly
    import plotly.graph_objects as go

    fig = make_subplots(rows=1, cols=2, subplot_titles=("relative residual per sample", "test accuracy (%)"))
    names = list(snapshot)
    for name in names:
        fig.add_trace(go.Box(y=snapshot[name]["rel_residual"], name=name, boxpoints=False,
                             showlegend=False), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[snapshot[n]["accuracy"] for n in names], showlegend=False,
                         text=[f"{snapshot[n]['accuracy']:.1f}" for n in names], textposition="inside",
                         insidetextanchor="end"),
                  row=1, col=2)
    fig.update_yaxes(type="log", exponentformat="power", row=1, col=1)
    fig.update_yaxes(range=[0, 100], row=1, col=2)  # labels sit inside the bars, clear of the title
    fig.update_layout(height=height, margin=dict(t=80, b=40), template=_template())
    return fig


def race_snapshot(f: Callable[[Tensor], Tensor], starts: Dict[str, Tuple[Any, Tensor]], budgets: Dict[str, int], *,
                  readout: Callable[[Tensor], Tensor], labels: Tensor) -> Dict[str, Dict[str, Any]]:
    """Like :func:`budget_snapshot`, but each solver gets its own budget: ``budgets[name]``
    evaluations of ``f``. Keys of the result read ``"name (K)"``; the compute of the chapter's
    "Anderson's steps vs the neural solver's steps" slider."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, (solver, z0) in starts.items():
        if name not in budgets:
            raise ValueError(f"no budget for solver {name!r}: budgets has {sorted(budgets)}")
        _check_pos_int(f"budgets[{name!r}]", budgets[name])
        snap = budget_snapshot(f, {name: (solver, z0)}, budgets[name], readout=readout, labels=labels)[name]
        out[f"{name} ({budgets[name]})"] = snap
    return out


def _template() -> str:
    """The book's plotly theme (``deqlite/viz/theme.py``), so figures follow light/dark mode."""
    from .viz.theme import register
    return register()


def pareto_figure(curves: Dict[str, Dict[str, List[float]]], times: Optional[Dict[str, List[float]]] = None,
                  converged_accuracy: Optional[float] = None, height: int = 620):
    """Accuracy and median relative residual against evaluations (and wall time, when
    ``times`` is given) for each solver: the speed/accuracy trade-off of Fig. 1 / 4 of the paper.
    ``curves[name]`` is a :func:`budget_curve`, ``times[name]`` a :func:`budget_times`."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    cols = 2 if times else 1
    titles = ["accuracy vs evaluations of f"] + (["accuracy vs wall time"] if times else []) + \
             ["residual vs evaluations of f"] + (["residual vs wall time"] if times else [])
    fig = make_subplots(rows=2, cols=cols, subplot_titles=titles, vertical_spacing=0.14)
    from .viz.theme import COLORWAY as palette
    for i, (name, c) in enumerate(curves.items()):
        color = palette[i % len(palette)]
        xs = [("nfe", c["nfe"], 1)]
        if times:
            xs.append(("ms", [1e3 * t for t in times[name]], 2))
        for label, x, col in xs:
            for row, key in ((1, "accuracy"), (2, "rel_residual")):
                fig.add_trace(go.Scatter(x=x, y=c[key], mode="lines+markers", name=name, legendgroup=name,
                                         line=dict(color=color), marker=dict(size=5),
                                         showlegend=(row == 1 and col == 1)), row=row, col=col)
    if converged_accuracy is not None:  # zoom on the converged accuracy (the start is at chance)
        for col in range(1, cols + 1):
            fig.add_hline(y=converged_accuracy, line_dash="dot", row=1, col=col)
            fig.update_yaxes(range=[converged_accuracy - 8, min(100.0, converged_accuracy + 2)], row=1, col=col)
    for col in range(1, cols + 1):
        fig.update_yaxes(type="log", exponentformat="power", row=2, col=col)
        fig.update_xaxes(title_text="evaluations of f" if col == 1 else "milliseconds", row=2, col=col)
    fig.update_layout(height=height, margin=dict(t=60), template=_template())
    return fig
