"""The one loop that runs every solver: :func:`solve`."""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_number
from .base import ConvergenceError, Solver, get_solver
from .trace import SolverTrace, StepInfo

__all__ = ["solve"]


# ufunc reductions called directly: ndarray.max() / .all() add a Python-level call each, and
# on a map that evicts the caches every step those small calls add up
_amax, _all = np.maximum.reduce, np.logical_and.reduce


def _to_device(a: np.ndarray, like: Tensor) -> Tensor:
    """A host array of residuals as a tensor with ``like``'s dtype and device."""
    return torch.from_numpy(a).to(device=like.device, dtype=like.dtype)


def _check_state(z0: Any) -> None:
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a torch.Tensor of shape (B, ...), got {type(z0).__name__}")
    if z0.dim() < 2:
        raise ValueError(
            f"z0 has shape {tuple(z0.shape)} but states must be batched as (B, ...): "
            f"for a single sample use z0.unsqueeze(0)")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}")
    if z0.shape[0] == 0:
        raise ValueError("z0 has an empty batch (B = 0)")


# --------------------------------------------------------------------------------------
# the per-sample bookkeeping, on the host
# --------------------------------------------------------------------------------------


class _Records:
    """Per-sample bookkeeping of one solve, on the host in numpy: the residual rows of the
    trace, the best iterate so far, divergence, the stopping test.

    The norms ``||g||`` and ``||f(z)||`` of a step arrive as one ``(2, B)`` array (on a CPU
    in float32/64 it shares memory with the buffer torch writes them to; elsewhere one copy
    per step, the only host sync of a step). A dozen tiny numpy operations cost less than
    the tensor operations they replace (each a kernel launch on a GPU). Values and
    comparisons use the state's dtype (half precision is held as float32).
    """

    def __init__(self, z: Tensor, tol: float, rel: bool, max_iter: int):
        B, dev = z.shape[0], z.device
        self.np_dtype = np.float64 if z.dtype == torch.float64 else (
            np.float16 if z.dtype == torch.float16 else np.float32)
        self.tiny = self.np_dtype(torch.finfo(z.dtype).tiny)
        self.tol = self.np_dtype(tol) if z.dtype != torch.bfloat16 else np.float32(
            torch.tensor(tol, dtype=z.dtype).item())
        self.norm_buf = torch.empty(2, B, dtype=z.dtype, device=dev)
        self.norm_g, self.norm_f = self.norm_buf[0], self.norm_buf[1]  # views made once
        if dev.type == "cpu" and z.dtype in (torch.float32, torch.float64, torch.float16):
            self.norm_host, self.norms = None, self.norm_buf.numpy()
        else:
            self.norm_host = torch.empty(2, B, dtype=torch.float32 if self.np_dtype is np.float32 else z.dtype,
                                         pin_memory=dev.type == "cuda")
            self.norms = self.norm_host.numpy()
        # the trace rows, preallocated (grown by doubling): no per-step allocation or stack
        rows = min(max_iter, 64)
        self.abs = np.empty((rows, B), dtype=self.np_dtype)
        self.rel = np.empty((rows, B), dtype=self.np_dtype)
        self.rel_stop = rel
        self.best_res = np.full(B, np.inf, dtype=self.np_dtype)
        self.best_step = np.full(B, -1, dtype=np.int64)
        self.diverged = np.zeros(B, dtype=bool)
        self.any_diverged = False
        self.n = 0
        # the best iterate is updated by torch.lerp(best, z, w) with w = 1 where a sample
        # improved, 0 elsewhere: exact, and 4x cheaper than torch.where with a broadcast mask
        # on a CPU. It needs z - best finite, so it is used only while every norm seen stays
        # below finfo.max / 8 (then every entry of z and best is below finfo.max / 4).
        self.safe = float(torch.finfo(z.dtype).max) / 8
        self.large = False  # a norm reached `safe`: torch.where from then on
        np_w = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}.get(z.dtype)
        if np_w is not None and dev.type == "cpu":
            self.w_host = np.empty((B, 1), dtype=np_w)
            self.w = torch.from_numpy(self.w_host)  # shares memory: no tensor per step
        else:
            self.w_host, self.w = None, None

    def record(self, k: int) -> Tuple[bool, Optional[np.ndarray]]:
        """Add the residuals of step ``k`` (already in ``norm_buf``). Returns ``(all_better,
        better)``: whether every sample improved on its best residual (then the new iterate
        is the best one for all and nothing diverged), else the per-sample mask."""
        if self.norm_host is not None:
            self.norm_host.copy_(self.norm_buf)
        norms = self.norms
        if k == self.abs.shape[0]:
            self.abs = np.concatenate([self.abs, np.empty_like(self.abs)])
            self.rel = np.concatenate([self.rel, np.empty_like(self.rel)])
        res_abs, res_rel = self.abs[k], self.rel[k]
        res_abs[:] = norms[0]
        self.n = k + 1
        res = res_rel if self.rel_stop else res_abs
        # one reduction over both norms (nan or inf anywhere fails it): the common case
        top = _amax(norms, None)
        if top >= self.safe:  # also true for inf; nan compares False, handled below
            self.large = True
        if not self.any_diverged and top < np.inf:
            np.divide(res_abs, np.maximum(norms[1], self.tiny), out=res_rel)
            if _all(np.less(res, self.best_res), None):
                self.best_res = res  # a row of the trace: never written again
                self.best_step.fill(k)
                return True, None
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                np.divide(res_abs, np.maximum(norms[1], self.tiny), out=res_rel)
            self._mark_nonfinite(norms, res_abs, res_rel)
        better = res < self.best_res  # False for nan: non-finite iterates are never "best"
        self.best_res = np.where(better, res, self.best_res)
        np.copyto(self.best_step, k, where=better)
        if not self.any_diverged and _all(np.isfinite(res), None):  # nothing new diverged (the usual case)
            return False, better
        new_div = ~np.isfinite(res) & ~self.diverged
        if new_div.any():
            # a sample produced inf/nan: it is frozen at its best finite iterate while the
            # others go on (samples never mix, so its NaNs cannot reach them)
            self.diverged |= new_div
            self.any_diverged = True
        return False, better

    def _mark_nonfinite(self, norms: np.ndarray, res_abs: np.ndarray, res_rel: np.ndarray) -> None:
        # an overflowing ||f(z)|| (inf, with finite entries) would make the relative residual 0
        # and a runaway sample look converged: a non-finite ||f(z)|| makes both residuals NaN.
        # z is finite (checked the step before), so a non-finite entry of f(z) or an
        # overflowing norm makes both residuals non-finite: no extra pass over the state.
        nan = self.np_dtype(np.nan)
        bad = ~np.isfinite(norms[1]) | self.diverged  # frozen samples: a gap, not a repeated residual
        res_abs[bad] = nan
        res_rel[bad] = nan

    def blend(self, better: np.ndarray, z: Tensor, best_z: Tensor) -> Tensor:
        """The best iterate after a step where only the samples in ``better`` improved."""
        if self.large or self.any_diverged:  # non-finite or huge values: where, never arithmetic
            return torch.where(torch.from_numpy(better).to(z.device)[:, None], z, best_z)
        if self.w is not None:
            np.copyto(self.w_host[:, 0], better)
            w = self.w
        else:
            w = torch.from_numpy(better.astype(np.float32)[:, None]).to(device=z.device, dtype=z.dtype)
        return torch.lerp(best_z, z, w)

    def done(self, all_better: bool) -> bool:
        """Every sample has met ``tol`` (or diverged)."""
        if all_better or not self.any_diverged:  # best_res is finite (all_better: this step's residuals)
            return bool(_amax(self.best_res, None) <= self.tol)
        return bool(((self.best_res <= self.tol) | self.diverged).all())

    def row(self, k: int, like: Tensor) -> Tuple[Tensor, Tensor]:
        """Step ``k``'s residuals as tensors (for a callback)."""
        return _to_device(self.abs[k].copy(), like), _to_device(self.rel[k].copy(), like)


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------


def _check_inputs(f: Any, z0: Any, tol: Any, max_iter: Any, stop: Any, on_failure: Any, callback: Any) -> None:
    _check_state(z0)
    check_number("tol", tol, 0.0, low_open=True)
    check_int("max_iter", max_iter)
    check_choice("stop", stop, ("abs", "rel"))
    check_choice("on_failure", on_failure, ("warn", "raise", "ignore"))
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it receives a StepInfo each step) or None, "
                        f"got {type(callback).__name__}")


def _check_first_output(fz: Any, z: Tensor, shape: torch.Size) -> bool:
    """Shape and dtype of the first ``f(z)``; returns whether autocast changed its dtype."""
    if not isinstance(fz, Tensor) or fz.shape != shape:
        got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
        raise ValueError(f"f must return the shape of its input: z has shape {tuple(shape)}, "
                         f"f(z) has shape {got}")
    autocast = fz.dtype != z.dtype and torch.is_autocast_enabled(z.device.type)
    if fz.dtype != z.dtype and not autocast:
        raise TypeError(f"f changed the dtype: z is {z.dtype}, f(z) is {fz.dtype}; "
                        f"start from z0.to({fz.dtype}) or make f keep its input's dtype")
    return autocast


def _finish(rec: _Records, slv: Solver, state: Any, z: Tensor, nfe: int, stop: str, tol: float,
            wall: float, iterates: Optional[List[Tensor]], on_failure: str) -> SolverTrace:
    """The trace, and the failure policy."""
    converged = rec.best_res <= rec.tol
    if rec.diverged.any():
        status = "diverged"
    elif converged.all():
        status = "converged"
    else:
        status = "max_iter"
    extra: Dict[str, Any] = {}
    if isinstance(state, dict) and "jacobian_evals" in state:
        extra["jacobian_evals"] = state["jacobian_evals"]
    dev = z.device
    trace = SolverTrace(
        abs_residual=_to_device(rec.abs[:rec.n], z), rel_residual=_to_device(rec.rel[:rec.n], z), nfe=nfe,
        converged=torch.from_numpy(converged).to(dev), status=status,
        solver=getattr(slv, "name", type(slv).__name__), stop=stop, tol=float(tol), wall_time=wall,
        best_step=torch.from_numpy(rec.best_step).to(dev), diverged=torch.from_numpy(rec.diverged).to(dev),
        iterates=iterates, extra=extra)
    if status != "converged" and on_failure != "ignore":
        msg = (f"solve did not converge: {trace.summary()}. Call deqlite.diagnose(f, z0, trace) "
               f"for an explanation.")
        if on_failure == "raise":
            raise ConvergenceError(msg, trace)
        if on_failure == "warn" and status == "diverged":
            warnings.warn(msg + " Non-finite values appeared; the best finite iterate is returned.",
                          RuntimeWarning, stacklevel=3)
    return trace


def solve(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    solver: Union[str, Solver] = "anderson",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    return_iterates: bool = False,
    callback: Optional[Callable[[StepInfo], Any]] = None,
    on_failure: str = "warn",
    grad: bool = False,
    **solver_options: Any,
) -> Tuple[Tensor, SolverTrace]:
    """Find ``z_star`` with ``f(z_star) = z_star`` for a batch of states.

    Args:
        f: the map, ``(B, ...) -> (B, ...)`` (same shape). Samples should not interact.
        z0: starting point, ``(B, ...)`` with any trailing shape, on any device; float32,
            float64, or half precision (bfloat16 / float16: Anderson's weights and Newton's
            linear solve are computed in float64 / float32 and cast back). The state keeps
            ``z0``'s dtype and device; under ``torch.autocast``, ``f(z)`` is cast to it.
        solver: a registered name (``available_solvers()``) or a :class:`Solver` object.
        tol: stop when every sample's residual (``stop="rel"`` or ``"abs"``) is ``<= tol``.
        max_iter: the maximum number of steps (= function evaluations, except Newton).
        return_iterates: keep every iterate in ``trace.iterates`` (memory!).
        callback: called after each step with a :class:`StepInfo` (e.g. to animate).
        on_failure: ``"warn"`` (default: warn when non-finite values appear),
            ``"raise"`` (raise :class:`ConvergenceError` unless converged) or ``"ignore"``.
        grad: record the iterations for autograd (backprop through the solver, the
            ``unrolled`` strategy). Off by default: DEQ gradients come from the fixed point.
        **solver_options: hyperparameters of the named solver, e.g. ``m=5, beta=1.0``.

    Returns:
        ``(z_star, trace)``: the best iterate per sample (lowest stopping residual seen,
        non-finite iterates never chosen) and its :class:`SolverTrace`.

    Runs under ``torch.no_grad()`` unless ``grad=True``; gradients are the job of
    :class:`deqlite.DEQ`.

    Each step: evaluate ``f`` once, compute the residual ``g = f(z) - z`` and both norms
    (into one buffer), record them on the host (``_Records``: best iterate,
    divergence, stopping, one host sync), then let the solver propose the next iterate.

    Example:
        >>> z, tr = solve(torch.cos, torch.zeros(1, 1, dtype=torch.float64), tol=1e-10)
        >>> round(z.item(), 6), tr.status
        (0.739085, 'converged')
    """
    slv = get_solver(solver, **solver_options)
    _check_inputs(f, z0, tol, max_iter, stop, on_failure, callback)
    shape = z0.shape
    dims = tuple(shape)  # view(*dims) costs a third of view(torch.Size) on a CPU
    B = shape[0]
    flat = len(shape) == 2  # (B, D) states need no view / reshape around f (two ops a step)

    def f_flat(zf: Tensor) -> Tensor:
        return f(zf) if flat else f(zf.view(*dims)).reshape(B, -1)

    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        # -- set up
        z = z0.detach().reshape(B, -1).clone()
        state = slv.setup(z)
        rec = _Records(z, tol, stop == "rel", max_iter)
        norm_g, norm_f = rec.norm_g, rec.norm_f
        best_z = z
        iterates: Optional[List[Tensor]] = [] if return_iterates else None
        nfe, autocast, dev = 0, False, z.device
        in_autocast = torch.is_autocast_enabled(dev.type)
        if in_autocast:
            ac_dtype = torch.get_autocast_dtype(dev.type)

            def f_autocast(zf: Tensor) -> Tensor:
                with torch.autocast(dev.type, dtype=ac_dtype):
                    return f_flat(zf).to(zf.dtype)
        # bound once: the loop below runs a few hundred times a second on small maps
        record, done, blend, step = rec.record, rec.done, rec.blend, slv.step_residual
        vector_norm, last = torch.linalg.vector_norm, max_iter - 1
        watched = iterates is not None or callback is not None
        for k in range(max_iter):
            # -- evaluate f and the residual
            fz = f(z if flat else z.view(*dims))
            nfe += 1
            if k == 0:
                autocast = _check_first_output(fz, z, shape)
            if autocast:  # under torch.autocast f may return another precision: the state keeps z0's
                fz = fz.to(z.dtype)
            if not flat:
                fz = fz.reshape(B, -1)
            g = fz - z  # the residual g(z), (B, n): also handed to the solver's step
            if g.requires_grad:
                vector_norm(g.detach(), dim=1, out=norm_g)
                vector_norm(fz.detach(), dim=1, out=norm_f)
            else:
                vector_norm(g, dim=1, out=norm_g)
                vector_norm(fz, dim=1, out=norm_f)
            # -- record: residual rows, best iterate, divergence (on the host)
            all_better, better = record(k)
            # the common case: no copy, z is never modified in place
            best_z = z if all_better else blend(better, z, best_z)
            if watched:
                if iterates is not None:
                    iterates.append(z.view(*dims).clone())
                if callback is not None:
                    callback(StepInfo(k, z.view(*dims), fz.view(*dims), *rec.row(k, z), nfe))
            # -- stop, or step
            if k == last or done(all_better):
                break
            if in_autocast:  # the solver's own arithmetic stays in the state's dtype (f keeps autocast)
                with torch.autocast(dev.type, enabled=False):
                    z_next, state = step(f_autocast, z, fz, g, state)
            else:
                z_next, state = step(f_flat, z, fz, g, state)
            if rec.any_diverged:
                z_next = torch.where(torch.from_numpy(rec.diverged).to(dev)[:, None], best_z, z_next)
            z = z_next
        wall = time.perf_counter() - t0
    trace = _finish(rec, slv, state, z, nfe, stop, tol, wall, iterates, on_failure)
    return (best_z if flat else best_z.view(*dims)).to(z0.dtype), trace
