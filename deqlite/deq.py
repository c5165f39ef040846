"""The DEQ layer: ``z* = f(z*, x)`` as an ``nn.Module``, with a forward solver and a
gradient strategy chosen independently."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .backward import BackwardConfig, attach_gradient, report_failure
from .regularize import weight_cache
from .solvers import Solver, SolverTrace, get_solver, solve

__all__ = ["DEQ", "DEQOutput"]


class DEQOutput(NamedTuple):
    """What :class:`DEQ` returns: the fixed point (with gradients attached) and the
    forward solver's trace."""

    z_star: Tensor
    trace: SolverTrace


class DEQ(nn.Module):
    """A deep equilibrium layer: returns ``z*`` with ``z* = f(z*, x)``.

    Args:
        f: an ``nn.Module`` (or callable) ``f(z, x) -> z``; ``z`` is ``(B, ...)``.
        solver, tol, max_iter, stop, solver_options: the forward solve in training mode
            (see :func:`deqlite.solve`).
        eval_solver, eval_tol, eval_max_iter, eval_solver_options: the same in eval mode
            (default: the training values). Eval mode changes *only* these: if the input
            or a parameter requires grad and grad mode is on, gradients still flow.
        backward: ``"implicit"`` | ``"jacobian_free"`` | ``"phantom"`` | ``"unrolled"``.
        backward_solver, backward_tol, backward_max_iter, backward_solver_options:
            the adjoint solve of the implicit strategy.
        phantom_k, phantom_tau: the phantom strategy's steps and damping.
        init: ``x -> z0`` for the default start; otherwise ``f.init_state(x)`` if ``f``
            has it, else ``zeros_like(x)``.
        warm_start: reuse the previous call's fixed point as the start when its shape
            matches (fixed-point reuse across training steps or a sequence of inputs).
        on_failure: what happens when the forward solve, or the adjoint solve of the
            implicit backward pass, stops without meeting its tolerance (status
            ``"max_iter"`` or ``"diverged"``): ``"warn"`` (default) issues a
            :class:`deqlite.backward.DEQConvergenceWarning` naming the solve and its
            residual, ``"raise"`` raises :class:`deqlite.ConvergenceError` (which carries
            the trace), ``"ignore"`` only records it in the trace (use it where a capped
            solve is intended, e.g. a fixed small ``max_iter`` during training).
        backward_callback: called with the adjoint solve's :class:`SolverTrace`.

    After a backward pass, ``last_backward_trace`` holds the adjoint solve's trace.

    Example:
        >>> lin = nn.Linear(4, 4); f = lambda z, x: torch.tanh(0.5 * lin(z) + x)
        >>> deq = DEQ(f, tol=1e-6)
        >>> z, trace = deq(torch.randn(2, 4))
        >>> trace.status
        'converged'
    """

    def __init__(
        self,
        f: Callable[[Tensor, Tensor], Tensor],
        *,
        solver: Union[str, Solver] = "anderson",
        tol: float = 1e-4,
        max_iter: int = 30,
        stop: str = "rel",
        solver_options: Optional[Dict[str, Any]] = None,
        eval_solver: Union[str, Solver, None] = None,
        eval_tol: Optional[float] = None,
        eval_max_iter: Optional[int] = None,
        eval_solver_options: Optional[Dict[str, Any]] = None,
        backward: str = "implicit",
        backward_solver: Union[str, Solver] = "anderson",
        backward_tol: float = 1e-6,
        backward_max_iter: int = 50,
        backward_solver_options: Optional[Dict[str, Any]] = None,
        phantom_k: int = 5,
        phantom_tau: float = 0.5,
        init: Optional[Callable[[Tensor], Tensor]] = None,
        warm_start: bool = False,
        on_failure: str = "warn",
        backward_callback: Optional[Callable[[SolverTrace], None]] = None,
    ):
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be an nn.Module or callable f(z, x), got {type(f).__name__}")
        self.f = f
        self.train_solve = dict(solver=solver, tol=tol, max_iter=max_iter, stop=stop,
                                options=dict(solver_options or {}))
        self.eval_solve = dict(
            solver=solver if eval_solver is None else eval_solver,
            tol=tol if eval_tol is None else eval_tol,
            max_iter=max_iter if eval_max_iter is None else eval_max_iter, stop=stop,
            options=dict(solver_options or {}) if eval_solver_options is None and eval_solver is None
            else dict(eval_solver_options or {}))
        for cfg in (self.train_solve, self.eval_solve):  # fail now, not at the first call
            get_solver(cfg["solver"], **cfg["options"])
            if not (isinstance(cfg["tol"], (int, float)) and math.isfinite(cfg["tol"]) and cfg["tol"] > 0):
                raise ValueError(f"tol must be a positive finite number, got {cfg['tol']!r}")
            if isinstance(cfg["max_iter"], bool) or not isinstance(cfg["max_iter"], int) or cfg["max_iter"] < 1:
                raise ValueError(f"max_iter must be an integer >= 1, got {cfg['max_iter']!r}")
        if backward == "unrolled" and get_solver(solver, **(solver_options or {})).name == "newton":
            raise ValueError("backward='unrolled' cannot run through newton (its steps detach); "
                             "use another forward solver or backward='implicit'")
        self.backward_config = BackwardConfig(
            strategy=backward, solver=backward_solver, solver_options=dict(backward_solver_options or {}),
            tol=backward_tol, max_iter=backward_max_iter, stop="rel", phantom_k=phantom_k,
            phantom_tau=phantom_tau, on_failure=on_failure)
        self.init = init
        self.warm_start = warm_start
        self.on_failure = on_failure  # validated by BackwardConfig above
        self.backward_callback = backward_callback
        self.last_backward_trace: Optional[SolverTrace] = None
        self._last_z: Optional[Tensor] = None

    @property
    def backward(self) -> str:  # type: ignore[override]
        return self.backward_config.strategy

    def extra_repr(self) -> str:
        t, e = self.train_solve, self.eval_solve
        return (f"solver={t['solver']!r}, tol={t['tol']}, max_iter={t['max_iter']}, "
                f"eval_max_iter={e['max_iter']}, backward={self.backward!r}")

    def initial_state(self, x: Tensor) -> Tensor:
        if self.init is not None:
            return self.init(x)
        if hasattr(self.f, "init_state"):
            return self.f.init_state(x)  # type: ignore[union-attr]
        return torch.zeros_like(x)

    def _record_backward(self, trace: SolverTrace) -> None:
        self.last_backward_trace = trace
        if self.backward_callback is not None:
            self.backward_callback(trace)

    def forward(self, x: Tensor, z0: Optional[Tensor] = None,
                callback: Optional[Callable[..., Any]] = None) -> DEQOutput:
        """Solve for ``z*`` given the input ``x``; ``z0`` overrides the start (warm start)."""
        cfg = self.train_solve if self.training else self.eval_solve
        if z0 is None and self.warm_start and self._last_z is not None:
            guess = self.initial_state(x)
            z0 = self._last_z if self._last_z.shape == guess.shape else guess
        if z0 is None:
            z0 = self.initial_state(x)
        z0 = z0.detach()

        def fx(z: Tensor) -> Tensor:
            return self.f(z, x)

        with weight_cache():  # contractive weights: one SVD per grad mode, not one per step
            needs_grad = self._needs_grad(fx, z0, x)
            unrolled = needs_grad and self.backward == "unrolled"
            # a user's enclosing torch `parametrize.cached()` block would keep the weight the
            # no-grad solve computed and hand it to the gradient step: drop what the solve added
            torch_cache = dict(parametrize._cache) if parametrize._cache_enabled else None
            z_star, trace = solve(fx, z0, solver=cfg["solver"], tol=cfg["tol"], max_iter=cfg["max_iter"],
                                  stop=cfg["stop"], callback=callback, on_failure="ignore",
                                  grad=unrolled, **cfg["options"])
            if torch_cache is not None and not unrolled:
                parametrize._cache.clear()
                parametrize._cache.update(torch_cache)
            report_failure(trace, self.on_failure, "forward", stacklevel=5)  # -> the caller of deq(x)
            if self.warm_start:
                self._last_z = z_star.detach()
            if needs_grad and not unrolled:
                z_star = attach_gradient(fx, z_star, self.backward_config, self._record_backward)
        return DEQOutput(z_star, trace)

    def _needs_grad(self, fx: Callable[[Tensor], Tensor], z0: Tensor, x: Any) -> bool:
        """Whether the output must carry a gradient: grad mode is on and ``f`` depends on
        something that requires grad (``x``, this module's parameters, or tensors that a
        plain function captured in a closure, found by one probing evaluation of ``f``)."""
        if not torch.is_grad_enabled():
            return False
        if (isinstance(x, Tensor) and x.requires_grad) or any(p.requires_grad for p in self.parameters()):
            return True
        with torch.enable_grad():
            probe = fx(z0)
        return isinstance(probe, Tensor) and probe.requires_grad
