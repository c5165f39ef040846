"""Newton's method with the exact Jacobian (for teaching, small states)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_int
from .base import Solver, register_solver

__all__ = ["Newton"]


@register_solver("newton")
@dataclass(frozen=True)
class Newton(Solver):
    """Newton's method on ``g(z) = f(z) - z`` with the exact Jacobian from autograd.

    Each step builds the per-sample Jacobian ``J_f`` (``n`` vector-Jacobian products,
    recorded in the trace as ``jacobian_evals``) and solves ``(J_f - I) dz = -g``.
    Quadratic convergence near the fixed point, at ``O(n^2)`` memory and ``O(n^3)`` work
    per step: it is here to teach, for states up to ``max_dim`` entries. Assumes the
    samples of a batch do not interact inside ``f``.
    """

    max_dim: int = 1024

    def __post_init__(self):
        check_int("max_dim", self.max_dim)

    def setup(self, z0):
        if z0.shape[1] > self.max_dim:
            raise ValueError(
                f"newton builds the full ({z0.shape[1]} x {z0.shape[1]}) Jacobian per sample; "
                f"the state has {z0.shape[1]} entries > max_dim={self.max_dim}. Use "
                f"solver='broyden' (its low-rank cousin) or raise max_dim.")
        return {"jacobian_evals": 0}

    def step(self, f, z, fz, state):
        B, n = z.shape
        with torch.enable_grad():
            zr = z.detach().requires_grad_(True)
            fzr = f(zr)
            eye = torch.eye(n, dtype=z.dtype, device=z.device)
            # rows: d f_i / d z for each output coordinate i, all samples at once
            (jac,) = torch.autograd.grad(
                fzr, zr, grad_outputs=eye.unsqueeze(1).expand(n, B, n).contiguous(),
                is_grads_batched=True)  # (n, B, n): jac[i, b, j] = d f_bi / d z_bj
        state["jacobian_evals"] += 1
        J = jac.permute(1, 0, 2)  # (B, n, n)
        g = (fz - z).unsqueeze(-1)
        A = J - eye
        finite = torch.isfinite(A).flatten(1).all(1)  # (B,)
        A = torch.where(finite[:, None, None], A, -eye)  # a broken Jacobian -> a plain step
        if A.dtype not in (torch.float32, torch.float64):
            # torch.linalg has no half-precision LU ("lu_cpu" not implemented for 'BFloat16'):
            # solve the n x n system in float32, keep the state in its own dtype
            A, g = A.float(), g.float()
        dz, info = torch.linalg.solve_ex(A, -g)
        ok = finite & (info == 0) & torch.isfinite(dz).flatten(1).all(1)
        # singular (J - I): fall back to the plain step f(z) - z for that sample
        dz = torch.where(ok[:, None], dz.squeeze(-1), g.squeeze(-1))
        return z + dz.to(z.dtype), state
