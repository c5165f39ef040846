"""The solver protocol and the registry that maps names to solvers.

A :class:`Solver` is a small frozen dataclass holding only hyperparameters; it proposes
the next iterate, and :func:`deqlite.solvers.solve` does everything else.
:func:`register_solver` makes a subclass known by name; :func:`get_solver` turns a name
(plus options) or an object into a solver object, with errors that list what is valid.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Tuple, Type, Union

from torch import Tensor

__all__ = ["Solver", "register_solver", "get_solver", "available_solvers", "ConvergenceError",
           "SOLVERS"]

SOLVERS: Dict[str, Type["Solver"]] = {}
# solvers defined in modules that ``import deqlite`` does not load eagerly: the name is known
# from the start, and its module is imported the first time the name is asked for
_DEFERRED: Dict[str, str] = {"hyper": "deqlite.hyper"}
STATUSES = ("converged", "max_iter", "diverged")


class ConvergenceError(RuntimeError):
    """Raised by :func:`~deqlite.solvers.solve` with ``on_failure="raise"`` when a solve
    does not converge; ``trace`` holds the :class:`~deqlite.solvers.SolverTrace`."""

    def __init__(self, message: str, trace: Any):
        super().__init__(message)
        self.trace = trace


@dataclass(frozen=True)
class Solver:
    """Base class. A solver proposes ``z_{k+1}`` from ``z_k`` and ``f(z_k)``.

    Subclasses implement ``setup(z0) -> state`` (the per-solve memory, e.g. a history; default
    ``None``) and ``step(f, z, fz, state) -> (z_next, state)``.
    States and iterates inside ``step`` are flattened to ``(B, n)``; ``f`` also takes and
    returns ``(B, n)`` there.
    """

    name: ClassVar[str] = "solver"
    evals_per_step: ClassVar[int] = 1
    # options that were renamed: old name -> new name (refused with a message naming the new one)
    renamed_options: ClassVar[Dict[str, str]] = {}

    def setup(self, z0: Tensor) -> Any:
        return None

    def step(self, f: Callable[[Tensor], Tensor], z: Tensor, fz: Tensor, state: Any) -> Tuple[Tensor, Any]:
        raise NotImplementedError

    def step_residual(self, f: Callable[[Tensor], Tensor], z: Tensor, fz: Tensor, g: Tensor,
                      state: Any) -> Tuple[Tensor, Any]:
        """``step`` when the loop already holds the residual ``g = fz - z`` (B, n).
        Solvers that need ``g`` override this to save a pass over the state; the default
        ignores ``g`` and calls ``step``."""
        return self.step(f, z, fz, state)

    @classmethod
    def options(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _refuse_renamed(cls: Type[Solver], options: Dict[str, Any]) -> None:
    """A ``TypeError`` naming the new option when an old (renamed) one is passed."""
    for old, new in cls.renamed_options.items():
        if old in options:
            raise TypeError(f"{cls.__name__}'s option {old!r} is now called {new!r}: use "
                            f"{cls.__name__}({new}={options[old]!r}) (or {new}={options[old]!r} "
                            f"next to solver={cls.name!r}), not {old}={options[old]!r}")


def register_solver(name: str) -> Callable[[Type[Solver]], Type[Solver]]:
    """Class decorator: make a :class:`Solver` subclass available to ``solve(..., solver=name)``."""

    def wrap(cls: Type[Solver]) -> Type[Solver]:
        if not (isinstance(cls, type) and issubclass(cls, Solver)):
            raise TypeError(f"register_solver expects a Solver subclass, got {cls!r}")
        if "init" in vars(cls):
            raise TypeError(f"{cls.__name__} defines init(z0): the hook is now called setup(z0) "
                            f"(it returns the solver's per-solve state); rename the method")
        SOLVERS[name] = cls
        cls.name = name
        return cls

    return wrap


def available_solvers() -> List[str]:
    """Names accepted by ``solve(..., solver=...)``."""
    return sorted(set(SOLVERS) | set(_DEFERRED))


def _lookup(name: str) -> Type[Solver]:
    if name not in SOLVERS and name in _DEFERRED:
        importlib.import_module(_DEFERRED[name])  # registers the name
    return SOLVERS[name]


def get_solver(solver: Union[str, Solver, Type[Solver]], **options: Any) -> Solver:
    """Turn a name (plus options) or a solver object into a solver object.

    >>> get_solver("anderson", m=3)
    Anderson(m=3, beta=1.0, ridge=0.0001, scale_ridge=True)
    """
    if isinstance(solver, Solver):
        if options:
            raise TypeError(
                f"options {sorted(options)} were passed next to a {type(solver).__name__} object; "
                f"set them on the object instead, e.g. {type(solver).__name__}({', '.join(f'{k}=...' for k in options)})")
        return solver
    if isinstance(solver, type) and issubclass(solver, Solver):
        solver = solver.name
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a name or a Solver object, got {type(solver).__name__}")
    if solver not in SOLVERS and solver not in _DEFERRED:
        raise ValueError(f"unknown solver {solver!r}; registered solvers: {', '.join(available_solvers())}")
    cls = _lookup(solver)
    _refuse_renamed(cls, options)
    valid = cls.options()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for solver {solver!r}; valid options: "
            f"{', '.join(valid) if valid else '(none)'}")
    return cls(**options)
