"""Digits DEQs built to be slow to solve: the models of chapter 4 (neural solvers).

- :func:`slow_digits_deq`: a :class:`~deqlite.models.mlp.DEQClassifier` whose ``W`` starts as
  ``gain`` times an orthogonal matrix, so Anderson needs tens of evaluations;
- :func:`frozen_map`: its map ``f(z, x)`` (or ``f(z)`` for given inputs), frozen.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from .._checks import check_int, check_number
from .mlp import DEQClassifier

__all__ = ["slow_digits_deq", "frozen_map"]


def slow_digits_deq(width: int = 256, gain: float = 1.1, *, seed: int = 0, inject_scale: float = 0.3,
                    **deq_options: Any) -> nn.Module:
    """An untrained digits :class:`~deqlite.models.mlp.DEQClassifier` whose map is *slow*:
    ``W`` starts as ``gain`` times a random orthogonal matrix and is left unconstrained.

    Its Jacobian at the fixed point, ``diag(1 - z*^2) W``, has eigenvalues spread around a
    circle of radius close to 1, so plain iteration gains little per step and Anderson needs
    15-30 evaluations to a relative residual of 1e-3-1e-4: the regime of the paper's DEQs,
    which need tens of solver steps. (A spectrally normalised ``W``, as in chapter 3, gives
    a map Anderson solves in 6-7 steps: nothing left to accelerate.) The injection starts
    scaled by ``inject_scale`` so the model leans on its equilibrium. Its solves are capped
    at 40 steps with ``on_failure="ignore"`` (pass ``on_failure="warn"`` to see each one).
    """
    check_int("width", width)
    check_number("gain", gain, lo=0.0, low_open=True)  # 0.9-1.3 gives a slow map
    # the map is slow on purpose: training runs capped solves (40 steps), so the DEQ's
    # non-convergence warning would fire every step; its traces still record each status
    opts: Dict[str, Any] = dict(tol=1e-4, max_iter=40, backward="jacobian_free", on_failure="ignore")
    opts.update(deq_options)
    torch.manual_seed(seed)
    model = DEQClassifier(64, width, 10, radius=None, **opts)
    with torch.no_grad():
        q, r = torch.linalg.qr(torch.randn(width, width))
        model.cell.W.weight.copy_(gain * q * torch.sign(torch.diagonal(r))[None, :])
        model.inject.weight.mul_(inject_scale)
    return model


def frozen_map(model: nn.Module, x: Optional[Tensor] = None) -> Callable[..., Tensor]:
    """The map of a trained :class:`DEQClassifier`, frozen: ``f(z, x) = tanh(W z + inject(x))``,
    or, given inputs ``x`` ``(B, 64)``, ``f(z)`` for those inputs with the injection computed
    once (what a solver race needs). ``W`` is read once (a spectral-norm parametrisation would
    otherwise recompute an SVD per call). Freezes the model (``eval()``, no gradients).

    >>> model = slow_digits_deq(16, seed=0)
    >>> x = torch.randn(3, 64)
    >>> torch.allclose(frozen_map(model)(torch.zeros(3, 16), x), frozen_map(model, x)(torch.zeros(3, 16)))
    True
    """
    model.eval().requires_grad_(False)
    W = model.cell.W.weight.detach().clone()
    inject = model.inject

    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ W.T + inject(x))

    if x is None:
        return f
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a batch of inputs (B, features), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    with torch.no_grad():
        u = inject(x)

    def f_x(z: Tensor) -> Tensor:
        return torch.tanh(z @ W.T + u)

    return f_x
