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
# the loop
# --------------------------------------------------------------------------------------


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

    Example:
        >>> z, tr = solve(torch.cos, torch.zeros(1, 1, dtype=torch.float64), tol=1e-10)
        >>> round(z.item(), 6), tr.status
        (0.739085, 'converged')
    """
    slv = get_solver(solver, **solver_options)
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

    shape = z0.shape
    B = shape[0]

    flat = len(shape) == 2  # (B, D) states need no view / reshape around f (two ops a step)

    def f_flat(zf: Tensor) -> Tensor:
        return f(zf) if flat else f(zf.view(shape)).reshape(B, -1)

    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        z = z0.detach().reshape(B, -1).clone()
        state = slv.init(z)
        dev = z.device
        # The per-sample bookkeeping (best-so-far, divergence, stopping, the trace rows) runs
        # on the host in numpy: one (2, B) transfer per step instead of a dozen tiny tensor
        # operations (each a kernel launch on a GPU) and three host syncs. Values and
        # comparisons are those of the state's dtype (half precision is held as float32).
        np_dtype = np.float64 if z.dtype == torch.float64 else (
            np.float16 if z.dtype == torch.float16 else np.float32)
        tiny = np_dtype(torch.finfo(z.dtype).tiny)
        tol_np = np_dtype(tol) if z.dtype != torch.bfloat16 else np.float32(torch.tensor(tol, dtype=z.dtype).item())
        norm_buf = torch.empty(2, B, dtype=z.dtype, device=dev)
        if dev.type == "cpu" and z.dtype in (torch.float32, torch.float64, torch.float16):
            norm_host, norm_np = None, norm_buf.numpy()
        else:
            norm_host = torch.empty(2, B, dtype=torch.float32 if np_dtype is np.float32 else z.dtype,
                                    pin_memory=dev.type == "cuda")
            norm_np = norm_host.numpy()
        best_z = z
        best_res = np.full(B, np.inf, dtype=np_dtype)
        best_step = np.full(B, -1, dtype=np.int64)
        diverged = np.zeros(B, dtype=bool)
        any_diverged = False
        abs_rows: List[np.ndarray] = []
        rel_rows: List[np.ndarray] = []
        iterates: Optional[List[Tensor]] = [] if return_iterates else None
        nfe = 0
        autocast = False
        rel = stop == "rel"
        for k in range(max_iter):
            fz = f(z if flat else z.view(shape))
            nfe += 1
            if k == 0:
                if not isinstance(fz, Tensor) or fz.shape != shape:
                    got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
                    raise ValueError(
                        f"f must return the shape of its input: z has shape {tuple(shape)}, "
                        f"f(z) has shape {got}")
                autocast = fz.dtype != z.dtype and torch.is_autocast_enabled(z.device.type)
                if fz.dtype != z.dtype and not autocast:
                    raise TypeError(f"f changed the dtype: z is {z.dtype}, f(z) is {fz.dtype}; "
                                    f"start from z0.to({fz.dtype}) or make f keep its input's dtype")
            if autocast:  # under torch.autocast f may return another precision: the state keeps z0's
                fz = fz.to(z.dtype)
            if not flat:
                fz = fz.reshape(B, -1)
            g = fz - z  # the residual g(z), (B, n): also handed to the solver's step
            # both norms land in one buffer, allocated once; on a CPU in float32/64 its numpy
            # view shares the memory, elsewhere one (2, B) copy to the host per step
            gd, fd = (g.detach(), fz.detach()) if g.requires_grad else (g, fz)
            torch.linalg.vector_norm(gd, dim=1, out=norm_buf[0])
            torch.linalg.vector_norm(fd, dim=1, out=norm_buf[1])
            if norm_host is not None:
                norm_host.copy_(norm_buf)
            norms = norm_np  # (2, B): ||g||, ||f(z)||
            f_norm = norms[1]
            # an overflowing ||f(z)|| (inf, with finite entries) would make the relative
            # residual 0 and a runaway sample look converged: every non-finite ||f(z)|| makes
            # both residuals NaN, so the sample counts as diverged
            if f_norm.max() < np.inf:  # the common case, one reduction
                res_abs = norms[0].copy()
            else:
                res_abs = np.where(np.isfinite(f_norm), norms[0], np_dtype(np.nan))
            res_rel = res_abs / np.maximum(f_norm, tiny)
            # z is finite (checked last step), so a non-finite entry of f(z), or a norm
            # that overflows, makes both residuals non-finite: no extra pass over the state
            if any_diverged:  # frozen samples: record a gap, not a repeated residual
                res_abs = np.where(diverged, np_dtype(np.nan), res_abs)
                res_rel = np.where(diverged, np_dtype(np.nan), res_rel)
            res = res_rel if rel else res_abs
            abs_rows.append(res_abs)
            rel_rows.append(res_rel)
            if iterates is not None:
                iterates.append(z.view(shape).clone())
            better = res < best_res  # False for nan: non-finite iterates are never "best"
            all_better = bool(better.all())
            if all_better:  # the common case: no copy, z is never modified in place
                best_z, best_res = z, res
                best_step.fill(k)
            else:
                best_z = torch.where(torch.from_numpy(better).to(dev)[:, None], z, best_z)
                best_res = np.where(better, res, best_res)
                best_step[better] = k
            if callback is not None:
                callback(StepInfo(k, z.view(shape), fz.view(shape), _to_device(res_abs, z),
                                  _to_device(res_rel, z), nfe))
            if not all_better:  # every residual improved: all finite, nothing diverged
                new_div = ~np.isfinite(res) & ~diverged
                if new_div.any():
                    # a sample produced inf/nan: freeze it at its best finite iterate and let
                    # the others go on (samples never mix, so its NaNs cannot reach them)
                    diverged = diverged | new_div
                    any_diverged = True
            if all_better:  # best_res is res, all finite
                stop_now = bool(res.max() <= tol_np)
            else:
                stop_now = bool(((best_res <= tol_np) | diverged).all())
            if k == max_iter - 1 or stop_now:
                break
            z_next, state = slv.step_residual(f_flat, z, fz, g, state)
            if any_diverged:
                z_next = torch.where(torch.from_numpy(diverged).to(dev)[:, None], best_z, z_next)
            z = z_next
        wall = time.perf_counter() - t0

    converged = best_res <= tol_np
    if diverged.any():
        status = "diverged"
    elif converged.all():
        status = "converged"
    else:
        status = "max_iter"
    extra: Dict[str, Any] = {}
    if isinstance(state, dict) and "jacobian_evals" in state:
        extra["jacobian_evals"] = state["jacobian_evals"]
    abs_rows = _to_device(np.stack(abs_rows), z)  # type: ignore[assignment]
    rel_rows = _to_device(np.stack(rel_rows), z)  # type: ignore[assignment]
    converged = torch.from_numpy(converged).to(dev)
    best_step = torch.from_numpy(best_step).to(dev)
    diverged = torch.from_numpy(diverged).to(dev)
    trace = SolverTrace(
        abs_residual=abs_rows, rel_residual=rel_rows, nfe=nfe,
        converged=converged, status=status, solver=getattr(slv, "name", type(slv).__name__),
        stop=stop, tol=float(tol), wall_time=wall, best_step=best_step, diverged=diverged,
        iterates=iterates, extra=extra)
    if status != "converged" and on_failure != "ignore":
        msg = (f"solve did not converge: {trace.summary()}. Call deqlite.diagnose(f, z0, trace) "
               f"for an explanation.")
        if on_failure == "raise":
            raise ConvergenceError(msg, trace)
        if on_failure == "warn" and status == "diverged":
            warnings.warn(msg + " Non-finite values appeared; the best finite iterate is returned.",
                          RuntimeWarning, stacklevel=2)
    return best_z.view(shape).to(z0.dtype), trace
