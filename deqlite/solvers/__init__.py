"""Fixed-point solvers and the one loop that runs them.

A *solver* only proposes the next iterate. The loop in :func:`solve` owns everything
else: evaluating ``f`` once per step, the residuals, per-sample stopping, best-so-far
tracking, divergence detection and the :class:`SolverTrace`. So every solver stops,
fails and reports the same way, and a new solver is ~30 lines (see :class:`Picard`).

Residuals follow one definition everywhere (per sample, flattened over trailing dims)::

    abs = ||f(z) - z||        rel = abs / ||f(z)||

Modules: ``base`` (the :class:`Solver` protocol, the registry, :class:`ConvergenceError`),
``trace`` (:class:`SolverTrace`, :class:`StepInfo`), ``loop`` (:func:`solve`),
``fixed_point`` (:class:`Picard`, :class:`KrasnoselskiiMann`), ``anderson``
(:class:`Anderson` and its history, shared with the neural solver), ``broyden``, ``newton``.
Every name is importable from ``deqlite.solvers``:

>>> import torch
>>> from deqlite.solvers import Anderson, solve
>>> z, trace = solve(torch.cos, torch.zeros(2, 1, dtype=torch.float64), solver=Anderson(m=3), tol=1e-10)
>>> round(z[0, 0].item(), 6), trace.status
(0.739085, 'converged')
"""
from __future__ import annotations

from .anderson import Anderson
from .base import _DEFERRED as _DEFERRED  # noqa: F401  (name -> module of solvers registered on first use)
from .base import STATUSES as STATUSES  # noqa: F401
from .base import SOLVERS, ConvergenceError, Solver, available_solvers, get_solver, register_solver
from .broyden import Broyden
from .fixed_point import KrasnoselskiiMann, Picard
from .loop import solve
from .newton import Newton
from .trace import SolverTrace, StepInfo

__all__ = [
    "solve", "SolverTrace", "StepInfo", "Solver", "Picard", "KrasnoselskiiMann", "Anderson",
    "Broyden", "Newton", "register_solver", "get_solver", "available_solvers",
    "ConvergenceError", "SOLVERS",
]
