"""Plain and damped fixed-point iteration: :class:`Picard` and :class:`KrasnoselskiiMann`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_number
from .base import Solver, register_solver

__all__ = ["Picard", "KrasnoselskiiMann"]


@register_solver("picard")
@dataclass(frozen=True)
class Picard(Solver):
    """Plain fixed-point iteration ``z_{k+1} = f(z_k)``. Converges when ``f`` is a contraction."""

    def step(self, f, z, fz, state):
        return fz, state


@register_solver("km")
@dataclass(frozen=True)
class KrasnoselskiiMann(Solver):
    """Damped (Krasnoselskii-Mann) iteration ``z_{k+1} = (1 - beta) z_k + beta f(z_k)``.

    ``beta`` in (0, 1]; ``beta = 1`` is Picard. Damping turns a non-expansive or mildly
    expansive map with an attracting fixed point into one plain iteration can follow.
    """

    beta: float = 0.5

    def __post_init__(self):
        check_number("beta", self.beta, 0.0, 1.0, low_open=True)

    def step(self, f, z, fz, state):
        return torch.lerp(z, fz, self.beta), state
