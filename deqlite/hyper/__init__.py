"""Neural deep equilibrium solvers: a learned initializer and HyperAnderson iterations.

Bai, Koltun & Kolter, *Neural Deep Equilibrium Solvers* (ICLR 2022). A DEQ solves
the same kind of fixed-point problem ``z = f(z, x)`` for every input ``x``; a tiny network
can learn to solve *this* ``f`` faster than a generic method. The solver has two parts:

* an **initializer** ``z0 = h_phi(x)`` (Sec. 4.1, Eq. 3): a shallow layer + ReLU +
  projection that guesses the fixed point from the input;
* **HyperAnderson iterations** (Alg. 2): keep the last ``m`` iterates ``z_i``, their
  images ``f(z_i)`` and residuals ``g_i = f(z_i) - z_i``; compress each residual (Eq. 4:
  global pooling over the spatial dimensions of a ``(B, C, H, W)`` state, a small linear
  projection for a flat ``(B, D)`` state); a 2-layer temporal convolution over this short
  history predicts ``alpha_hat`` (one weight per iterate kept) and ``beta``; then::

      alpha  = alpha_hat + (1 - sum(alpha_hat)) / (m_k + 1)        # sums to one, may be < 0
      z_next = beta * sum_i alpha_i f(z_i) + (1 - beta) * sum_i alpha_i z_i

  which is Anderson's update (Alg. 1) with learned instead of least-squares weights.

Training (Sec. 4.2, Fig. 3) keeps the DEQ frozen and uses no labels: fixed points ``z*``
come from a classic solver run to high precision, and the solver is unrolled for ``K``
steps and trained by backpropagation through them on three losses::

    L_conv  = sum_k w_k ||z_k - z*||        (w_k increasing, sum to one; Eq. 7: w_k ~ k)
    L_init  = ||h_phi(x) - z*||              (the only loss the initializer sees)
    L_alpha = sum_k ||G_k alpha_k||           (Anderson's objective, Eq. 2; weight decayed to ~0)

The code lives in :mod:`deqlite.hyper.nets` (initializers, mixing networks),
:mod:`deqlite.hyper.solver` (:class:`HyperSolver`) and :mod:`deqlite.hyper.train` (losses,
training, inference); everything is importable from here, together with the budget and
timing helpers of :mod:`deqlite.race`, the slow digits DEQ of :mod:`deqlite.models.digits`
and (lazily, they need plotly) the figures of :mod:`deqlite.viz.hyper_figures`.

The trained solver is a :class:`deqlite.solvers.Solver`, so ``solve`` and ``DEQ`` run it
through the same loop, with the same stopping rules and :class:`~deqlite.SolverTrace`, as
every classic solver. The mixing network sees only the iteration history, never ``x``;
the initializer needs ``x`` and so runs *before* the solve::

    hyper = HyperSolver.build(state_dim=256, input_dim=64)
    train_hypersolver(hyper, deq_f, x_train)           # f(z, x), frozen
    z_star, trace = hyper_solve(hyper, deq_f, x)        # = solve(f(., x), hyper.initial_state(x), solver=hyper)

The defaults follow the paper: compressed residuals as the network's features (pooling for
images, a learned projection for flat states), the shifted normalisation, ``w_k ~ k`` and the
loss weights ``lambda = (0.1, 0.05, 1e-4)`` of its App. A (:func:`train_hypersolver`).
Choices the paper leaves open, and options that depart from it (chapter 4 says why it uses
them), are documented where they are made:

* every history slot is also described by its log-norm, and all features are divided by the
  largest norm in the window: residuals shrink by orders of magnitude during a solve, and
  the network should see the *shape* of the history;
* ``gram=True`` (not the paper's) adds each slot's row of the Gram matrix ``<g_i, g_j>``
  (what Anderson's least squares looks at; size-independent, no parameters), and with
  ``compress_dim=0`` replaces the projection, whose ``D x c`` weights would exceed the
  paper's 1-3% budget on a small flat DEQ;
* the weights start at "take the newest iterate" (a damped plain step), not at a uniform
  average;
* ``conv_loss="log"`` (optional) puts ``log ||z_k - z*||`` in ``L_conv`` so that late steps
  still get gradient; ``"l2"`` (default) is the paper's;
* the initializer may train with its own learning rate and batch (it needs no unrolling).
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..models.digits import frozen_map, slow_digits_deq
from ..race import (budget_curve, budget_snapshot, budget_times, matched_nfe, median_time, median_times,
                    race_snapshot)
from ..training import count_params
from .nets import (ALPHA_MODES, LOSS_WEIGHTS, ConvInitializer, HyperAndersonNet, LeastSquaresMixer,
                   MLPInitializer, anderson_weights, loss_weights, normalize_alpha)
from .solver import HyperSolver
from .train import TrainLog, fixed_points, hyper_losses, hyper_solve, train_hypersolver, unroll

__all__ = [
    "ALPHA_MODES", "LOSS_WEIGHTS", "MLPInitializer", "ConvInitializer", "HyperAndersonNet",
    "LeastSquaresMixer", "HyperSolver", "normalize_alpha", "anderson_weights", "loss_weights",
    "unroll", "hyper_losses", "fixed_points", "train_hypersolver", "TrainLog", "hyper_solve",
    "budget_curve", "matched_nfe", "count_parameters", "median_time", "budget_times",
    "budget_snapshot", "race_snapshot", "steps_figure", "pareto_figure", "ablation_figure",
    "slow_digits_deq", "frozen_map", "median_times",
]

_FIGURES = ("steps_figure", "pareto_figure", "ablation_figure")


def count_parameters(*modules: Optional[nn.Module]) -> int:
    """All parameter entries of ``modules``, trainable or frozen (``None`` counts as 0):
    :func:`deqlite.training.count_params` with ``trainable_only=False``.

    >>> count_parameters(nn.Linear(3, 2), None)
    8
    """
    return count_params(*modules, trainable_only=False)


def __getattr__(name: str) -> Any:
    """The figures load on first use: ``import deqlite.hyper`` must not need plotly."""
    if name in _FIGURES:
        from ..viz import hyper_figures
        return getattr(hyper_figures, name)
    raise AttributeError(f"module 'deqlite.hyper' has no attribute {name!r}")
