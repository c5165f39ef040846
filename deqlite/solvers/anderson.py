"""Anderson acceleration, and the history it shares with the neural solver.

:class:`AndersonHistory` owns what every Anderson-type method keeps: the last ``m`` images
``f(z_i)`` and residuals ``g_i = f(z_i) - z_i``, their Gram matrix ``H_ij = <g_i, g_j>``
and the least-squares weights. :class:`Anderson` mixes with those weights;
:class:`deqlite.hyper.HyperSolver` uses the same history and chooses the weights with a
network instead. In deqlite ``m`` is the number of iterates mixed (the papers' ``m`` is one
less: they mix ``m + 1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._checks import check_int, check_number
from .base import Solver, register_solver

__all__ = ["Anderson", "AndersonHistory", "least_squares_weights"]


def least_squares_weights(H: Tensor, ridge: float = 1e-4, scale_ridge: bool = True,
                          newest: int = -1) -> Tensor:
    """Anderson's weights from a Gram matrix: ``alpha`` (B, h), summing to one, minimising
    ``alpha^T (H + lam I) alpha`` with ``lam = ridge * mean_i H_ii`` (``scale_ridge``) or
    ``ridge``. ``H`` is (B, h, h), float64 recommended; differentiable.

    The solution is ``alpha = y / sum(y)`` with ``(H + lam I) y = 1`` (the bordered system
    ``[[0, 1^T], [1, H + lam I]]`` with its first row eliminated). A singular sample (only
    possible with ``ridge=0``) gets all its weight on row ``newest``.

    >>> least_squares_weights(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64))
    tensor([[0.5000, 0.5000]], dtype=torch.float64)
    """
    diag = torch.diagonal(H, dim1=1, dim2=2)  # ||g_i||^2
    if scale_ridge:
        lam = ridge * diag.mean(-1, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)
    else:
        lam = torch.full_like(diag[:, :1], ridge)
    y, info = torch.linalg.solve_ex(torch.diagonal_scatter(H, diag + lam, dim1=1, dim2=2),
                                    torch.ones_like(diag))
    alpha = y / y.sum(-1, keepdim=True)
    bad = (info != 0) | ~torch.isfinite(alpha).all(-1)
    if bool(bad.any()):
        fallback = torch.zeros_like(alpha)
        fallback[:, newest] = 1.0
        alpha = torch.where(bad[:, None], fallback, alpha)
    return alpha


def _least_squares_weights_host(H: np.ndarray, ridge: float, scale_ridge: bool, newest: int,
                                ones: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`least_squares_weights` for a float64 host array (no autograd): the system is a
    few numbers per sample, so one LAPACK call costs far less than a dozen tiny tensor
    operations (kernel launches on a GPU); on a GPU it costs one (B, h) transfer each way."""
    B, h, _ = H.shape
    A = H.copy()
    diag = A.reshape(B, h * h)[:, ::h + 1]  # a writable view of the diagonals, ||g_i||^2
    if scale_ridge:
        lam = np.add.reduce(diag, 1, keepdims=True)
        lam /= h  # the mean of ||g_i||^2
        np.maximum(lam, _TINY, out=lam)
        lam *= ridge
        diag += lam
    else:
        diag += ridge
    rhs = np.ones((B, h, 1)) if ones is None else ones
    try:
        # positive definite and finite: no singular sample, nothing for the wrapper to report
        if ridge > 0 and _gufunc_solve is not None and np.isfinite(np.add.reduce(diag, None)):
            y = _gufunc_solve(A, rhs, signature="dd->d")[..., 0]
        else:
            y = np.linalg.solve(A, rhs)[..., 0]
        bad = None
    except np.linalg.LinAlgError:  # a singular sample (only with ridge=0): per-sample info
        yt, info = torch.linalg.solve_ex(torch.from_numpy(A), torch.ones(B, h, dtype=torch.float64))
        y, bad = yt.numpy(), (info != 0).numpy()
    total = np.add.reduce(y, 1, keepdims=True)
    if bad is None and np.isfinite(np.add.reduce(total, None)) and np.logical_and.reduce(total, None):
        return np.divide(y, total, out=y)  # the common case
    with np.errstate(all="ignore"):  # the rare case: find the samples
        alpha = y / total
        bad = ~np.isfinite(alpha).all(-1) if bad is None else bad | ~np.isfinite(alpha).all(-1)
    alpha[bad] = 0.0
    alpha[bad, newest] = 1.0
    return alpha


_TINY = np.finfo(np.float64).tiny


def _find_gufunc_solve():
    """numpy's batched solve without its Python wrapper (which costs as much as the solve on
    Anderson's few-by-few systems), if this numpy has it and it agrees with the wrapper."""
    try:
        from numpy.linalg import _umath_linalg

        solve = _umath_linalg.solve
        A, b = np.array([[[2.0, 1.0], [1.0, 3.0]]]), np.ones((1, 2, 1))
        return solve if np.allclose(solve(A, b, signature="dd->d"), np.linalg.solve(A, b)) else None
    except Exception:  # a numpy without it: the public np.linalg.solve
        return None


_gufunc_solve = _find_gufunc_solve()


class AndersonHistory:
    """The last ``m`` pairs ``(f(z_i), g_i)`` of an Anderson-type iteration (``g_i = f(z_i) - z_i``),
    their Gram matrix and the least-squares mixing weights. States are flattened ``(B, n)``.

    Without autograd (inside :func:`deqlite.solve`) the pairs live in ring buffers ``(B, m, n)``
    allocated at the first :meth:`push` and written in place (one ``(B, n)`` copy each per
    step), the Gram matrix (float64) on the host with one new row per step. Under autograd
    (the ``unrolled`` strategy, training a neural solver) the history is re-stacked every step,
    oldest first, and never written in place. The mode is fixed by the first :meth:`push`.

    >>> hist = AndersonHistory(2)
    >>> with torch.no_grad():  # the ring buffer
    ...     for v in (1.0, 2.0, 3.0):
    ...         hist.push(torch.full((1, 2), v), torch.full((1, 2), 1.0 / v))
    >>> hist.size, hist.newest, hist.order().tolist()  # rows oldest to newest: 1, then 0
    (2, 0, [1, 0])
    >>> round(hist.gram()[0, 0, 0].item(), 6)  # ||g_3||^2 = 2 * (1/3)^2
    0.222222
    """

    def __init__(self, m: int):
        self.m = check_int("m", m)
        self.k = 0  # pairs pushed so far
        self.grad: Optional[bool] = None
        self.F: Optional[Tensor] = None  # (B, m, n) images f(z_i) (the first `size` rows used)
        self.G: Optional[Tensor] = None  # (B, m, n) residuals g_i
        self.H = None  # Gram matrix: (B, m, m) float64 numpy array, or a (B, h, h) tensor under autograd

    @property
    def size(self) -> int:
        """Number of pairs held, ``h = min(k, m)``."""
        return min(self.k, self.m)

    @property
    def newest(self) -> int:
        """Row of the newest pair."""
        return (self.k - 1) % self.m if not self.grad else self.size - 1

    def push(self, fz: Tensor, g: Tensor) -> None:
        """Add the pair ``(f(z), g)`` (both (B, n)), dropping the oldest once ``m`` are held."""
        if self.grad is None:
            self.grad = torch.is_grad_enabled()
        if self.grad:
            self._push_stacked(fz, g)
        else:
            self._push_ring(fz, g)
        self.k += 1

    def _push_stacked(self, fz: Tensor, g: Tensor) -> None:
        keep = self.m - 1
        if self.F is None or keep == 0:
            self.F, self.G = fz.unsqueeze(1), g.unsqueeze(1)
        else:
            self.F = torch.cat([self.F[:, -keep:], fz.unsqueeze(1)], 1)
            self.G = torch.cat([self.G[:, -keep:], g.unsqueeze(1)], 1)
        h = self.F.shape[1]
        dots = (self.G * g.unsqueeze(1)).sum(-1).double()  # (B, h)
        if self.H is None or h == 1:
            self.H = dots.unsqueeze(-1)
        else:
            prev = self.H[:, -(h - 1):, -(h - 1):]
            self.H = torch.cat([torch.cat([prev, dots[:, :-1, None]], 2), dots[:, None, :]], 1)

    def _push_ring(self, fz: Tensor, g: Tensor) -> None:
        if self.F is None:
            self._allocate(fz)
        slot, h = self.k % self.m, min(self.k + 1, self.m)
        slots = self._slots.get(slot)
        if slots is None:
            slots = self._slots[slot] = (self.F[:, slot], self.G[:, slot])
        slots[0].copy_(fz)
        slots[1].copy_(g)
        # one new row of H as a row-vector product (B, 1, n) @ (B, n, h): no (B, h, n)
        # temporary (42 MB at B=64, m=20, n=8192), and the fast layout on a CPU; the host
        # array is float64, so float32 states cannot make the small system singular
        Gt = self._G_t.get(h)
        if Gt is None:
            Gt = self._G_t[h] = self.G[:, :h].transpose(1, 2)
        dots = self._host(torch.bmm(g.unsqueeze(1), Gt))[:, 0]  # (B, h)
        self.H[:, slot, :h] = dots
        self.H[:, :h, slot] = dots

    def _allocate(self, z: Tensor) -> None:
        """Ring buffers and the views every step uses, made once."""
        B, n = z.shape
        m = self.m
        self.F, self.G = z.new_empty(B, m, n), z.new_empty(B, m, n)
        self.H = np.zeros((B, m, m))
        self._slots: dict = {}  # slot -> (F[:, slot], G[:, slot]), made on first use
        self._G_t: dict = {}  # h -> G[:, :h] transposed, made on first use
        self._rows: dict = {}  # h -> (F[:, :h], G[:, :h])
        self._ones: dict = {}  # h -> the right-hand side of the weight solve
        # on a CPU in float32/64 a tensor's numpy view costs nothing; elsewhere one copy
        self._shares = z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64)
        self._np_dtype = np.float64 if z.dtype == torch.float64 else np.float32

    def _host(self, t: Tensor) -> np.ndarray:
        return t.numpy() if self._shares else t.to("cpu", torch.float64).numpy()

    def rows(self):
        """``(F, G)``, each ``(B, h, n)``: the pairs held, in storage order (see :meth:`order`)."""
        h = self.size
        if self.grad:
            return self.F[:, :h], self.G[:, :h]
        rows = self._rows.get(h)
        if rows is None:
            rows = self._rows[h] = (self.F[:, :h], self.G[:, :h])
        return rows

    def gram(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``G G^T`` ``(B, h, h)`` in storage order, as a tensor on the states' device."""
        h = self.size
        H = self.H if self.grad else torch.from_numpy(self.H[:, :h, :h]).to(self.G.device)
        return H if dtype is None else H.to(dtype)

    def order(self) -> Optional[Tensor]:
        """Storage rows oldest to newest once the ring has wrapped (``None`` while rows are in order)."""
        if self.grad or self.k <= self.m:
            return None
        slot = self.newest
        return (torch.arange(1, self.m + 1, device=self.G.device) + slot) % self.m

    def least_squares(self, ridge: float = 1e-4, scale_ridge: bool = True) -> Tensor:
        """Anderson's weights ``alpha`` ``(B, h)`` in storage order, in the states' dtype."""
        if self.grad:
            alpha = least_squares_weights(self.H, ridge, scale_ridge, self.newest)
            return alpha.to(self.G.dtype)
        return self._least_squares_rows(ridge, scale_ridge)[:, 0]

    def _least_squares_rows(self, ridge: float, scale_ridge: bool) -> Tensor:
        """The weights as a ``(B, 1, h)`` row per sample (no autograd), ready for ``bmm``."""
        h = self.size
        ones = self._ones.get(h)
        if ones is None:
            ones = self._ones[h] = np.ones((self.H.shape[0], h, 1))
        alpha = _least_squares_weights_host(self.H[:, :h, :h], ridge, scale_ridge, self.newest, ones)
        alpha = torch.from_numpy(alpha.astype(self._np_dtype, copy=False)[:, None, :])
        if not self._shares:
            alpha = alpha.to(device=self.G.device, dtype=self.G.dtype)
        return alpha

    def combine(self, alpha: Tensor, rows: Tensor) -> Tensor:
        """``sum_i alpha_i rows_i``: (B, h) weights and (B, h, n) rows -> (B, n), as a
        (B, 1, h) @ (B, h, n) product (no (B, h, n) temporary)."""
        return torch.bmm(alpha.unsqueeze(1), rows).squeeze(1)


@register_solver("anderson")
@dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration (type II) with memory ``m`` (Walker & Ni 2011; Alg. 1 of
    Bai, Koltun & Kolter 2022).

    Keeps the last ``m`` pairs ``(z_i, f(z_i))``, finds weights ``alpha`` (sum 1) minimising
    ``||sum_i alpha_i g(z_i)||`` with ``g = f - id``, and mixes
    ``z_{k+1} = beta * sum alpha_i f(z_i) + (1 - beta) * sum alpha_i z_i``
    (computed as ``sum alpha_i f(z_i) - (1 - beta) sum alpha_i g_i``).

    The weights solve the bordered system ``[[0, 1^T], [1, G G^T + lam I]] [nu, alpha] = [1, 0]``.
    The ridge ``lam = ridge * mean_i ||g_i||^2`` is scaled to the residual size: a fixed ridge
    (``1e-4`` in the 2019 reference code) swamps ``G G^T`` once residuals fall below ~1e-2
    and stalls convergence. Pass ``scale_ridge=False`` to see that happen. The history is an
    :class:`AndersonHistory`.
    """

    m: int = 5
    beta: float = 1.0
    ridge: float = 1e-4
    scale_ridge: bool = True

    def __post_init__(self):
        check_int("m", self.m)
        check_number("beta", self.beta, 0.0, 1.0, low_open=True)
        check_number("ridge", self.ridge, 0.0)

    def setup(self, z0):
        return AndersonHistory(self.m)

    def step(self, f, z, fz, state):
        return self.step_residual(f, z, fz, fz - z, state)

    def step_residual(self, f, z, fz, g, state):
        state.push(fz, g)
        if state.size == 1:  # nothing to mix yet: a (damped) plain step
            return (fz if self.beta == 1.0 else torch.lerp(z, fz, self.beta)), state
        F, G = state.rows()
        if state.grad:
            alpha = state.least_squares(self.ridge, self.scale_ridge).unsqueeze(1)
        else:
            alpha = state._least_squares_rows(self.ridge, self.scale_ridge)  # (B, 1, h)
        mixed_f = torch.bmm(alpha, F).squeeze(1)
        if self.beta == 1.0:
            return mixed_f, state
        return mixed_f - (1.0 - self.beta) * torch.bmm(alpha, G).squeeze(1), state
