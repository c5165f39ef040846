"""The neural solver as a deqlite :class:`~deqlite.solvers.Solver`: HyperAnderson iterations
(Alg. 2 of Bai, Koltun & Kolter 2022) with an optional learned initializer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..solvers import Solver, register_solver
from ..solvers.anderson import AndersonHistory
from ..training import count_params
from .nets import ALPHA_MODES, ConvInitializer, HyperAndersonNet, LeastSquaresMixer, MLPInitializer, normalize_alpha

__all__ = ["HyperSolver"]


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
        m: memory: the number of iterates mixed, as in :class:`deqlite.solvers.Anderson`
            (the net's ``m`` must match). The default 6 is the paper's memory 5: Alg. 2
            counts the past iterates, ``m_k = min(m - 1, k)``, and mixes ``m_k + 1``.
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
    m: int = 6
    alpha_mode: str = "shift"
    initializer: Optional[nn.Module] = None
    state_shape: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        check_int("m", self.m)
        if not callable(self.mixer):
            raise TypeError(f"mixer must be an nn.Module mapping G (B, T, n) -> (alpha_hat, beta), "
                            f"got {type(self.mixer).__name__}")
        check_choice("alpha_mode", self.alpha_mode, ALPHA_MODES)
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
              input_dim: Optional[int] = None, input_channels: Optional[int] = None, m: int = 6,
              alpha_mode: str = "shift", use_initializer: bool = True, init_hidden: int = 8,
              compress_dim: int = 8, hidden: int = 16, beta_max: float = 1.0, gram: bool = False, seed: int = 0,
              state_shape: Optional[Sequence[int]] = None) -> "HyperSolver":
        """An untrained neural solver for flat states (``state_dim``; initializer from flat
        inputs of size ``input_dim``) or image states (``channels``; initializer from images with
        ``input_channels``). ``use_initializer=False`` starts from zeros (ablation).

        >>> HyperSolver.build(state_dim=32, input_dim=8).initial_state(torch.zeros(4, 8)).shape
        torch.Size([4, 32])
        """
        check_choice("alpha_mode", alpha_mode, ALPHA_MODES)
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
        return count_params(self.mixer, self.initializer, trainable_only=False)

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
    def setup(self, z0: Tensor) -> AndersonHistory:
        return AndersonHistory(self.m)  # the last m iterates

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

