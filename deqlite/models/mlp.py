"""A fully connected DEQ classifier: the model of chapters 1, 2 and 4 (digits).

    u  = U x + b                  input injection, computed once per forward
    z* = tanh(W z* + u)           the equilibrium (``TanhCell``), solved by :class:`DEQ`
    y  = head(z*)                 logits
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..deq import DEQ
from ..regularize import make_contractive
from ..solvers import SolverTrace
from .._checks import check_int

__all__ = ["TanhCell", "DEQClassifier"]


class TanhCell(nn.Module):
    """``f(z, u) = tanh(W z + u)``, state ``(B, width)``; ``u`` is the injected input.

    With ``radius < 1`` the spectral norm of ``W`` is kept ``<= radius``
    (:func:`deqlite.make_contractive`), so ``f`` is a contraction and every solver
    converges; ``radius=None`` leaves ``W`` free.
    """

    def __init__(self, width: int, radius: Optional[float] = 0.9, init_scale: float = 1.0):
        super().__init__()
        check_int("width", width)
        self.width = width
        self.W = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.W.weight.mul_(init_scale)
        if radius is not None:
            make_contractive(self, radius=radius, names=["W"])

    def init_state(self, u: Tensor) -> Tensor:
        return u.new_zeros(u.shape[0], self.width)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        return torch.tanh(self.W(z) + u)


class DEQClassifier(nn.Module):
    """Input injection, a :class:`TanhCell` equilibrium and a linear read-out.

    Args:
        in_dim, width, n_classes: sizes (digits: 64 pixels, 10 classes).
        radius: spectral-norm bound of ``W`` (``None``: unconstrained).
        **deq_options: passed to :class:`deqlite.DEQ` (solver, tol, max_iter, backward, ...).

    ``forward(x)`` returns logits ``(B, n_classes)``; ``last_trace`` holds the forward
    solver's trace. ``cell`` and ``inject`` are exposed so that a solver can be studied
    on the frozen map ``z -> cell(z, inject(x))`` (chapter 4).

    Example:
        >>> model = DEQClassifier(64, 32, 10)
        >>> model(torch.randn(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(self, in_dim: int = 64, width: int = 128, n_classes: int = 10,
                 radius: Optional[float] = 0.9, **deq_options: Any):
        super().__init__()
        self.inject = nn.Linear(in_dim, width)
        self.cell = TanhCell(width, radius)
        opts: Dict[str, Any] = dict(solver="anderson", tol=1e-4, max_iter=30)
        opts.update(deq_options)
        self.deq = DEQ(self.cell, **opts)
        self.head = nn.Linear(width, n_classes)
        self.last_trace: Optional[SolverTrace] = None

    def equilibrium(self, x: Tensor, z0: Optional[Tensor] = None) -> Tensor:
        """The fixed point ``z*`` ``(B, width)`` for inputs ``x`` ``(B, in_dim)``."""
        if x.dim() != 2 or x.shape[1] != self.inject.in_features:
            raise ValueError(f"x must have shape (B, {self.inject.in_features}), got {tuple(x.shape)}")
        z, trace = self.deq(self.inject(x), z0)
        self.last_trace = trace
        return z

    def map(self, x: Tensor):
        """The map ``f(z) = cell(z, inject(x))`` with the input bound, for :func:`deqlite.solve`."""
        u = self.inject(x).detach()
        return lambda z: self.cell(z, u)

    def forward(self, x: Tensor, z0: Optional[Tensor] = None) -> Tensor:
        return self.head(self.equilibrium(x, z0))
