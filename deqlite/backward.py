"""Gradient strategies for a fixed point ``z* = f(z*, x)``: small objects, chosen per layer.

Every strategy takes the fixed point found by the forward solver (however it was found)
and returns a tensor equal (up to the solver tolerance) to ``z*`` whose autograd graph
carries its gradient. Like optimistix's "adjoints", a strategy holds only its own settings
and is passed to :class:`deqlite.DEQ` next to the forward solver:

- :class:`Implicit` (``"implicit"``): the exact gradient by the implicit function theorem
  (Bai et al. 2019, Thm. 1), ``dL/dtheta = g^T df/dtheta`` where ``g = J^T g + dL/dz*`` is
  itself a fixed-point problem, solved with any registered solver.
- :class:`JacobianFree` (``"jacobian_free"``): treat ``J`` as zero, ``g = dL/dz*`` (one
  application of ``f``; Fung et al. 2022).
- :class:`Phantom` (``"phantom"``): ``k`` damped unrolled steps
  ``z <- (1 - tau) z + tau f(z, x)`` from ``z*`` (Geng et al. 2021); approaches
  ``implicit`` as ``k`` grows.
- :class:`Unrolled` (``"unrolled"``): backprop through the forward solver's own
  iterations (memory grows with the number of steps; for teaching and tests).

A new strategy is a frozen dataclass with an ``attach`` method, registered with
:func:`register_gradient` (see CONTRIBUTING.md). No hooks are stored on modules: the
implicit strategy is a custom autograd function.

Higher derivatives (``create_graph=True``): ``unrolled`` gives exact ones (autograd runs
through the iterations); ``implicit`` refuses with a ``RuntimeError`` (its adjoint solve has
no graph, so a second derivative would be silently wrong); ``jacobian_free`` and
``phantom`` differentiate their own surrogate graphs (approximations, like their gradients).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Type, Union

import torch
from torch import Tensor

from .solvers import ConvergenceError, Solver, SolverTrace, get_solver, solve
from ._checks import check_int, check_number

__all__ = ["GradientStrategy", "Implicit", "JacobianFree", "Phantom", "Unrolled", "GRADIENTS",
           "BACKWARD_STRATEGIES", "FAILURE_POLICIES", "DEQConvergenceWarning", "register_gradient",
           "available_gradients", "get_gradient", "implicit_adjoint", "report_failure"]

GRADIENTS: Dict[str, Type["GradientStrategy"]] = {}
FAILURE_POLICIES = ("warn", "raise", "ignore")
Callback = Optional[Callable[[SolverTrace], None]]


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


def register_gradient(name: str) -> Callable[[Type["GradientStrategy"]], Type["GradientStrategy"]]:
    """Class decorator: make a :class:`GradientStrategy` available as ``DEQ(backward=name)``."""

    def wrap(cls: Type[GradientStrategy]) -> Type[GradientStrategy]:
        if not (isinstance(cls, type) and issubclass(cls, GradientStrategy)):
            raise TypeError(f"register_gradient expects a GradientStrategy subclass, got {cls!r}")
        GRADIENTS[name] = cls
        cls.name = name
        return cls

    return wrap


@dataclass(frozen=True)
class GradientStrategy:
    """Base class: how a DEQ's output ``z*`` gets its gradient.

    ``attach(f, z_star, on_failure, callback)`` returns ``z*`` re-attached to autograd;
    ``f`` is the map with the input bound (``z -> f(z, x)``, on flat ``(B, n)`` states).
    ``through_solver = True`` means the forward solve itself records the graph (then
    ``attach`` is not called).
    """

    name: ClassVar[str] = "gradient"
    through_solver: ClassVar[bool] = False

    def attach(self, f: Callable[[Tensor], Tensor], z_star: Tensor, on_failure: str = "warn",
               callback: Callback = None) -> Tensor:
        raise NotImplementedError

    @classmethod
    def options(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]


@register_gradient("implicit")
@dataclass(frozen=True, eq=False)
class Implicit(GradientStrategy):
    """The exact gradient from the implicit function theorem.

    The adjoint ``g = J^T g + dL/dz*`` is solved by ``solver`` (any registered name or a
    :class:`~deqlite.solvers.Solver`) to ``tol`` within ``max_iter`` steps.

    Example:
        >>> Implicit(solver="broyden", tol=1e-8).tol
        1e-08
    """

    solver: Union[str, Solver] = "anderson"
    tol: float = 1e-6
    max_iter: int = 50
    solver_options: Dict[str, Any] = field(default_factory=dict)
    stop: str = "rel"

    def __post_init__(self) -> None:
        get_solver(self.solver, **self.solver_options)  # validates name and options now
        check_number("backward tol", self.tol, lo=0.0, low_open=True)
        check_int("backward max_iter", self.max_iter)
        if self.stop not in ("abs", "rel"):
            raise ValueError(f"stop must be 'abs' or 'rel', got {self.stop!r}")

    def attach(self, f, z_star, on_failure="warn", callback=None):
        z = z_star.detach().clone().requires_grad_(True)
        fz = f(z)
        return _ImplicitGrad.apply(fz, z, self, on_failure, callback)


@register_gradient("jacobian_free")
@dataclass(frozen=True)
class JacobianFree(GradientStrategy):
    """Treat the Jacobian as zero: the gradient of one application of ``f`` at ``z*``."""

    def attach(self, f, z_star, on_failure="warn", callback=None):
        return f(z_star.detach())


@register_gradient("phantom")
@dataclass(frozen=True)
class Phantom(GradientStrategy):
    """``k`` damped steps ``z <- (1 - tau) z + tau f(z)`` from ``z*``, backpropagated."""

    k: int = 5
    tau: float = 0.5

    def __post_init__(self) -> None:
        check_int("phantom_k", self.k)
        check_number("phantom_tau", self.tau, lo=0.0, hi=1.0, low_open=True)

    def attach(self, f, z_star, on_failure="warn", callback=None):
        z = z_star.detach()
        for _ in range(self.k):
            z = torch.lerp(z, f(z), self.tau)
        return z


@register_gradient("unrolled")
@dataclass(frozen=True)
class Unrolled(GradientStrategy):
    """Backpropagate through the forward solver's iterations (``solve(grad=True)``)."""

    through_solver: ClassVar[bool] = True

    def attach(self, f, z_star, on_failure="warn", callback=None):
        raise RuntimeError("Unrolled takes its graph from the forward solve; DEQ handles it")


BACKWARD_STRATEGIES = tuple(GRADIENTS)  # the registered names, in registration order


def available_gradients() -> List[str]:
    """Names accepted by ``DEQ(backward=...)``."""
    return list(GRADIENTS)


def get_gradient(backward: Union[str, GradientStrategy], **options: Any) -> GradientStrategy:
    """A strategy object from a registered name (plus its options) or an object.

    >>> get_gradient("phantom", k=8)
    Phantom(k=8, tau=0.5)
    """
    if isinstance(backward, GradientStrategy):
        if options:
            raise TypeError(f"options {sorted(options)} were passed next to a {type(backward).__name__} "
                            f"object; set them on the object instead")
        return backward
    if isinstance(backward, type) and issubclass(backward, GradientStrategy):
        backward = backward.name
    if not isinstance(backward, str):
        raise TypeError(f"backward must be a strategy name or a GradientStrategy object (e.g. "
                        f"deqlite.Implicit(tol=1e-6)), got {type(backward).__name__}")
    if backward not in GRADIENTS:
        raise ValueError(f"unknown backward strategy {backward!r}; choose one of {', '.join(GRADIENTS)}")
    cls = GRADIENTS[backward]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for backward strategy {backward!r}; valid "
                        f"options: {', '.join(cls.options()) or '(none)'}")
    return cls(**options)


def implicit_adjoint(vjp: Callable[[Tensor], Tensor], grad: Tensor, strategy: Implicit,
                     on_failure: str = "warn", callback: Callback = None) -> Tensor:
    """Solve the adjoint fixed point ``g = J^T g + grad`` (``vjp(y) = J^T y``), ``(B, ...)``."""
    g, trace = solve(lambda y: vjp(y) + grad, grad.detach().clone(), solver=strategy.solver,
                     tol=strategy.tol, max_iter=strategy.max_iter, stop=strategy.stop,
                     on_failure="ignore", **strategy.solver_options)
    trace.extra["kind"] = "backward"
    if callback is not None:
        callback(trace)
    report_failure(trace, on_failure, "backward (adjoint)")
    return g


class _ImplicitGrad(torch.autograd.Function):
    """Identity on ``fz = f(z, x)`` in the forward pass; in the backward pass replaces the
    incoming gradient ``dL/dz*`` by the adjoint ``g`` solving ``g = J^T g + dL/dz*``, which
    autograd then sends through ``f`` to its parameters and to ``x``."""

    @staticmethod
    def forward(ctx, fz: Tensor, z: Tensor, strategy: Implicit, on_failure: str, callback):  # type: ignore[override]
        ctx.strategy, ctx.on_failure, ctx.callback = strategy, on_failure, callback
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

        g = implicit_adjoint(vjp, grad, ctx.strategy, ctx.on_failure, ctx.callback)
        return g, None, None, None, None
