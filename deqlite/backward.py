"""Gradient strategies for a fixed point ``z* = f(z*, x)``.

All of them take the fixed point found by the forward solver (however it was found) and
return a tensor equal (up to the solver tolerance) to ``z*`` whose autograd graph
carries the chosen gradient:

- ``implicit``: the exact gradient by the implicit function theorem (Bai et al. 2019,
  Thm. 1), ``dL/dtheta = g^T df/dtheta`` where ``g = J^T g + dL/dz*`` is itself a
  fixed-point problem, solved with any registered solver.
- ``jacobian_free``: treat ``J`` as zero, ``g = dL/dz*`` (one step of ``f``; Fung et al. 2022).
- ``phantom``: ``k`` damped unrolled steps ``z <- (1 - tau) z + tau f(z, x)`` from ``z*``
  (Geng et al. 2021); approaches ``implicit`` as ``k`` grows.
- ``unrolled``: backprop through the forward solver's own iterations (memory grows with
  the number of steps; for teaching and tests).

No hooks are stored on modules: the implicit strategy is a custom autograd function.

Higher derivatives (``create_graph=True``): ``unrolled`` gives exact ones (autograd runs
through the iterations); ``implicit`` refuses with a ``RuntimeError`` (its adjoint solve has
no graph, so a second derivative would be silently wrong); ``jacobian_free`` and
``phantom`` differentiate their own surrogate graphs (approximations, like their gradients).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from .solvers import ConvergenceError, SolverTrace, get_solver, solve

__all__ = ["BackwardConfig", "BACKWARD_STRATEGIES", "FAILURE_POLICIES", "DEQConvergenceWarning",
           "attach_gradient", "implicit_adjoint", "report_failure"]

BACKWARD_STRATEGIES = ("implicit", "jacobian_free", "phantom", "unrolled")


@dataclass
class BackwardConfig:
    """Settings of the gradient strategy (see the module docstring)."""

    strategy: str = "implicit"
    solver: Any = "anderson"
    solver_options: Dict[str, Any] = field(default_factory=dict)
    tol: float = 1e-6
    max_iter: int = 50
    stop: str = "rel"
    phantom_k: int = 5
    phantom_tau: float = 0.5
    on_failure: str = "warn"

    def __post_init__(self):
        if self.strategy not in BACKWARD_STRATEGIES:
            raise ValueError(f"unknown backward strategy {self.strategy!r}; choose one of "
                             f"{', '.join(BACKWARD_STRATEGIES)}")
        get_solver(self.solver, **self.solver_options)  # validates name and options now
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"backward tol must be a positive finite number, got {self.tol!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"backward max_iter must be an integer >= 1, got {self.max_iter!r}")
        if isinstance(self.phantom_k, bool) or not isinstance(self.phantom_k, int) or self.phantom_k < 1:
            raise ValueError(f"phantom_k must be an integer >= 1, got {self.phantom_k!r}")
        if not (isinstance(self.phantom_tau, (int, float)) and 0 < self.phantom_tau <= 1):
            raise ValueError(f"phantom_tau must be in (0, 1], got {self.phantom_tau!r}")
        if self.on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure must be one of {', '.join(map(repr, FAILURE_POLICIES))}, "
                             f"got {self.on_failure!r}")


FAILURE_POLICIES = ("warn", "raise", "ignore")


class DEQConvergenceWarning(RuntimeWarning):
    """A DEQ's forward or backward (adjoint) solve stopped without meeting its tolerance.

    Silence it deliberately where a capped solve is intended:
    ``DEQ(..., on_failure="ignore")`` or ``warnings.simplefilter("ignore", DEQConvergenceWarning)``.
    """


def report_failure(trace: SolverTrace, policy: str, what: str, stacklevel: int = 3) -> None:
    """Apply a DEQ failure policy to a finished solve: warn or raise unless it converged.

    Unlike :func:`deqlite.solve` (whose ``"warn"`` only warns about non-finite values,
    since a budgeted solve that stops at ``max_iter`` is a normal result there), a DEQ is
    supposed to reach its fixed point, so ``"warn"`` also warns about ``"max_iter"``.
    """
    if trace.status == "converged" or policy == "ignore":
        return
    msg = (f"DEQ {what} solve did not converge: {trace.summary()}. Raise its max_iter or tol, "
           f"use another solver, or pass on_failure='ignore' if a capped solve is intended.")
    if what == "backward (adjoint)":
        msg += " The gradient is inexact."
    if policy == "raise":
        raise ConvergenceError(msg, trace)
    warnings.warn(msg, DEQConvergenceWarning, stacklevel=stacklevel)


def implicit_adjoint(vjp: Callable[[Tensor], Tensor], grad: Tensor, config: BackwardConfig,
                     callback: Optional[Callable[[SolverTrace], None]] = None) -> Tensor:
    """Solve the adjoint fixed point ``g = J^T g + grad`` (``vjp(y) = J^T y``), ``(B, ...)``."""
    g, trace = solve(lambda y: vjp(y) + grad, grad.detach().clone(), solver=config.solver,
                     tol=config.tol, max_iter=config.max_iter, stop=config.stop,
                     on_failure="ignore", **config.solver_options)
    trace.extra["kind"] = "backward"
    if callback is not None:
        callback(trace)
    report_failure(trace, config.on_failure, "backward (adjoint)")
    return g


class _ImplicitGrad(torch.autograd.Function):
    """Identity on ``fz = f(z, x)`` in the forward pass; in the backward pass replaces the
    incoming gradient ``dL/dz*`` by the adjoint ``g`` solving ``g = J^T g + dL/dz*``, which
    autograd then sends through ``f`` to its parameters and to ``x``."""

    @staticmethod
    def forward(ctx, fz: Tensor, z: Tensor, config: BackwardConfig, callback):  # type: ignore[override]
        ctx.config, ctx.callback = config, callback
        ctx.save_for_backward(fz, z)
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True: the adjoint g below is found by a solver without a graph, so
            # a second derivative through it would be silently wrong
            raise RuntimeError(
                "double backward (create_graph=True, e.g. a gradient penalty or Hessian-vector "
                "product) through DEQ(backward='implicit') is not supported: the adjoint solve "
                "is not differentiable. Use DEQ(backward='unrolled') for higher derivatives.")
        fz, z = ctx.saved_tensors

        def vjp(y: Tensor) -> Tensor:
            with torch.enable_grad():
                (out,) = torch.autograd.grad(fz, z, y, retain_graph=True)
            return out

        g = implicit_adjoint(vjp, grad, ctx.config, ctx.callback)
        return g, None, None, None


def attach_gradient(f: Callable[[Tensor], Tensor], z_star: Tensor, config: BackwardConfig,
                    callback: Optional[Callable[[SolverTrace], None]] = None) -> Tensor:
    """Return ``z*`` re-attached to autograd with the gradient of ``config.strategy``.

    ``f`` is the map with the input already bound (``z -> f(z, x)``). ``unrolled`` is
    handled by the caller (it needs the forward iterations), not here.
    """
    z_star = z_star.detach()
    if config.strategy == "implicit":
        z = z_star.clone().requires_grad_(True)
        fz = f(z)
        return _ImplicitGrad.apply(fz, z, config, callback)
    if config.strategy == "jacobian_free":
        return f(z_star)
    if config.strategy == "phantom":
        z = z_star
        for _ in range(config.phantom_k):
            z = torch.lerp(z, f(z), config.phantom_tau)
        return z
    raise ValueError(f"attach_gradient does not handle strategy {config.strategy!r}")
