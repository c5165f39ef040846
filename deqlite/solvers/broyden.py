"""Limited-memory Broyden's method."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Tuple

import torch
from torch import Tensor

from .._checks import check_int, check_number
from .base import Solver, _refuse_renamed, register_solver

__all__ = ["Broyden"]


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two (B, n) tensors -> (B,)."""
    return (a * b).sum(-1)


@register_solver("broyden")
@dataclass(frozen=True, init=False)
class Broyden(Solver):
    """Limited-memory ("good") Broyden's method on ``g(z) = f(z) - z``.

    Keeps a low-rank approximation of the inverse Jacobian of ``g``, starting from
    ``-I`` (so the first step is plain iteration) and applying Sherman-Morrison rank-one
    updates ``H <- H + (dz - H dg) dz^T H / (dz^T H dg)``; the step is ``z <- z - step_size H g``.
    ``m`` caps the number of stored updates (the oldest is dropped; with a short memory
    on hard problems this can destabilise the iteration, so the default keeps 100).
    ``step_size`` scales the step (1 = full Broyden step; it was called ``alpha`` before,
    a name Anderson uses for its weights).

    Without autograd, each step applies the stored low-rank terms twice (``H g`` and
    ``dz^T H``): ``H dg = H g + dz / step_size`` because the last step was
    ``dz = -step_size H g_prev``, and the updated ``H g`` is ``H g`` plus the new rank-one
    term (minus the one dropped from a full memory).
    """

    m: int = 100
    step_size: float = 1.0

    renamed_options: ClassVar[Dict[str, str]] = {"alpha": "step_size"}  # alpha: Anderson's weights

    def __init__(self, m: int = 100, step_size: float = 1.0, **old: Any):
        _refuse_renamed(type(self), old)
        if old:
            raise TypeError(f"unexpected option(s) {sorted(old)} for Broyden; valid options: m, step_size")
        object.__setattr__(self, "m", check_int("m", m))
        object.__setattr__(self, "step_size", check_number("step_size", step_size, 0.0, 1.0, low_open=True))

    def setup(self, z0):
        return {"U": None, "V": None, "z": None, "g": None, "count": 0}

    @staticmethod
    def _apply(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
        """H x with H = -I + sum_j u_j v_j^T, for (B, n) x."""
        if U.shape[1] == 0:
            return -x
        return -x + torch.bmm(torch.bmm(x.unsqueeze(1), V.transpose(1, 2)), U).squeeze(1)

    @staticmethod
    def _apply_t(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
        """x^T H, for (B, n) x."""
        if U.shape[1] == 0:
            return -x
        return -x + torch.bmm(torch.bmm(x.unsqueeze(1), U.transpose(1, 2)), V).squeeze(1)

    def step(self, f, z, fz, state):
        return self.step_residual(f, z, fz, fz - z, state)

    def step_residual(self, f, z, fz, g, state):
        if not torch.is_grad_enabled():
            return self._step_buffered(z, g, state)
        # autograd runs through the iterations (``unrolled``): re-stack, never write in place
        U, V = state["U"], state["V"]
        if U is None:
            B, n = z.shape
            U, V = z.new_zeros(B, 0, n), z.new_zeros(B, 0, n)
        if state["z"] is not None:
            u, vT = self._update(U, V, z - state["z"], g - state["g"])
            U = torch.cat([U, u.unsqueeze(1)], 1)[:, -self.m:]
            V = torch.cat([V, vT.unsqueeze(1)], 1)[:, -self.m:]
        state = {"U": U, "V": V, "z": z, "g": g, "count": state["count"] + 1}
        return z - self.step_size * self._apply(U, V, g), state

    def _update(self, U: Tensor, V: Tensor, dz: Tensor, dg: Tensor) -> Tuple[Tensor, Tensor]:
        """The rank-one term ``u vT`` of the good-Broyden update of ``H`` for the step
        ``dz`` and the residual change ``dg`` (both (B, n))."""
        vT = self._apply_t(U, V, dz)  # dz^T H, (B, n)
        u = dz - self._apply(U, V, dg)
        return u * self._inverse_or_zero(_bdot(vT, dg), dz, dg).unsqueeze(-1), vT

    def _step_buffered(self, z, g, state):
        """The update without autograd: the ``m`` pairs live in ``(B, m, n)`` buffers
        allocated once and written in place (a ring once full: ``H`` is a sum, so the order
        of the pairs does not matter), and ``H`` is applied twice per step (see the class
        docstring) with batched matrix products on views made once."""
        s = self.step_size
        if state["U"] is None:  # the first step: H = -I
            self._allocate(z, state)
            state["z"], state["g"] = z, g
            return torch.add(z, g, alpha=s), state
        count = state["count"]
        h, slot = min(count, self.m), count % self.m
        dz, dg = z - state["z"], g - state["g"]
        if h:
            # (B, 1, n) @ (B, n, h) then (B, 1, h) @ (B, h, n): the row-vector products are
            # the fast layout (a (B, h, n) @ (B, n, 1) product is ~10x slower on a CPU)
            U, V, Ut, Vt = self._views(state, h)
            c = torch.bmm(g.unsqueeze(1), Vt)  # (B, 1, h): v_j . g
            Hg = torch.bmm(c, U).squeeze(1).sub_(g)  # H g = -g + sum_j (v_j . g) u_j
            d = torch.bmm(dz.unsqueeze(1), Ut)  # (B, 1, h): dz . u_j
            vT = torch.bmm(d, V).squeeze(1).sub_(dz)  # dz^T H
        else:
            Hg, vT = g.neg(), dz.neg()
        # u = (dz - H dg) / (dz^T H dg), with H dg = H g + dz / s; written straight into its slot
        coef = self._inverse_or_zero(torch.linalg.vecdot(vT, dg), dz, dg).unsqueeze(-1)
        u_slot = state["U"][:, slot]
        dropped = u_slot * c[:, 0, slot:slot + 1] if count >= self.m else None  # the oldest pair leaves H
        if s == 1.0:
            torch.mul(Hg, coef.neg_(), out=u_slot)
        else:
            torch.mul(dz.mul(1.0 - 1.0 / s).sub_(Hg), coef, out=u_slot)
        state["V"][:, slot] = vT
        Hg_new = torch.addcmul(Hg, u_slot, torch.linalg.vecdot(vT, g).unsqueeze(-1))
        if dropped is not None:
            Hg_new.sub_(dropped)
        state["count"] = count + 1
        state["z"], state["g"] = z, g
        return torch.add(z, Hg_new, alpha=-s), state

    def _allocate(self, z: Tensor, state: dict) -> None:
        B, n = z.shape
        state["U"], state["V"] = z.new_empty(B, self.m, n), z.new_empty(B, self.m, n)
        state["full"] = None

    def _views(self, state: dict, h: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``U, V`` (B, h, n) and their transposes; made once for a full memory (every step
        from then on uses the same), on the fly before (each ``h`` is used once)."""
        if h == self.m and state["full"] is not None:
            return state["full"]
        U, V = state["U"][:, :h], state["V"][:, :h]
        views = (U, V, U.transpose(1, 2), V.transpose(1, 2))
        if h == self.m:
            state["full"] = views
        return views

    @staticmethod
    def _inverse_or_zero(denom: Tensor, dz: Tensor, dg: Tensor) -> Tensor:
        """``1 / denom`` per sample, ``0`` where ``denom = dz^T H dg`` vanishes (relative to
        ``||dz|| ||dg||``): the update would divide by zero, so it is skipped."""
        # out of place: the unrolled (autograd) path differentiates through it
        scale = torch.linalg.vector_norm(dz, dim=-1) * torch.linalg.vector_norm(dg, dim=-1)
        ok = denom.abs() > (1e-30 * scale).clamp_min(1e-300)
        return torch.where(ok, denom, 1.0).reciprocal() * ok
