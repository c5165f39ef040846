"""deqlite: a small, tested library of deep equilibrium models (DEQs).

``import deqlite`` imports only torch; ``deqlite.viz`` (plotly, ipywidgets) and the
larger submodules load on first access.
"""
from __future__ import annotations

import importlib
from typing import Any

from .solvers import (ConvergenceError, Solver, SolverTrace, StepInfo, available_solvers,
                      get_solver, register_solver, solve)

__version__ = "0.1.0"

_LAZY_SUBMODULES = {"viz", "delta", "hyper", "analysis", "models", "data", "backward", "deq",
                    "diagnostics", "regularize", "problems", "training", "race"}
_LAZY_ATTRS = {
    "DEQ": "deq",
    "Implicit": "backward",
    "JacobianFree": "backward",
    "Phantom": "backward",
    "Unrolled": "backward",
    "GradientStrategy": "backward",
    "register_gradient": "backward",
    "available_gradients": "backward",
    "diagnose": "diagnostics",
    "spectral_radius": "diagnostics",
    "jacobian_frobenius": "regularize",
    "make_contractive": "regularize",
    "DeltaLinear": "delta",
    "DeltaConv2d": "delta",
    "DeltaConfig": "delta",
    "delta_mode": "delta",
    "mac_summary": "delta",
    "HyperSolver": "hyper",
    "train_hypersolver": "hyper",
    "hyper_solve": "hyper",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f".{_LAZY_ATTRS[name]}", __name__), name)
    raise AttributeError(f"module 'deqlite' has no attribute {name!r}")


__all__ = ["solve", "SolverTrace", "StepInfo", "Solver", "ConvergenceError", "available_solvers",
           "get_solver", "register_solver", "DEQ", "Implicit", "JacobianFree", "Phantom", "Unrolled",
           "GradientStrategy", "register_gradient", "available_gradients", "diagnose", "spectral_radius",
           "jacobian_frobenius", "make_contractive", "DeltaLinear", "DeltaConv2d", "DeltaConfig", "delta_mode",
           "mac_summary", "HyperSolver", "train_hypersolver", "hyper_solve"]
