"""Solver races: the same fixed-point problem handed to several solvers, side by side.

Chapter 3 of the book runs its comparisons through these helpers, so the static figure,
the live explorer and the asserted claims all come from the same code:

- :func:`slow_tanh`: a map ``tanh(W z + x)`` whose contraction factor you choose; plain
  iteration needs many steps as the factor approaches 1;
- :func:`spiral_2d`: a two-dimensional map whose iterates can be watched (animated);
- :func:`race`: solve one problem with several solvers, keep each :class:`SolverTrace`;
- :func:`race_table`: evaluations to a tolerance, wall time and status, one row a solver;
- :func:`anderson_conditioning`: condition numbers of Anderson's Gram matrix along a solve;
- :func:`race_figure`, :func:`race_animation`: residual curves, and iterates animated in a plane.

Budgets and timing (chapter 4 races a learned solver against Anderson with them):

- :func:`budget_curve`: what a solve returns after each budget of evaluations, from one run;
- :func:`matched_nfe`: the budget from which a curve stays within a target;
- :func:`budget_snapshot`, :func:`race_snapshot`: every solver after its budget (the computes
  of the steps sliders; :func:`deqlite.viz.hyper_figures.steps_figure` draws them);
- :func:`median_times`, :func:`median_time`, :func:`budget_times`: medians of interleaved
  wall-clock and CPU timings.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._checks import check_int
from .problems import Problem
from .solvers import SolverTrace, StepInfo, solve

__all__ = ["slow_tanh", "spiral_2d", "race", "race_table", "evals_to", "anderson_conditioning",
           "DEFAULT_RACE", "budget_curve", "matched_nfe",
           "median_times", "median_time", "budget_times", "budget_snapshot", "race_snapshot"]

#: The line-up of chapter 3 (plain and damped iteration, Anderson, Broyden, Newton).
DEFAULT_RACE: Dict[str, Dict[str, Any]] = {
    "picard": {"solver": "picard"},
    "km (beta=0.5)": {"solver": "km", "beta": 0.5},
    "anderson (m=5)": {"solver": "anderson", "m": 5},
    "broyden": {"solver": "broyden"},
    "newton": {"solver": "newton"},
}


def slow_tanh(contraction: float = 0.95, D: int = 64, B: int = 8, input_scale: float = 0.1,
              seed: int = 0, dtype: torch.dtype = torch.float64) -> Problem:
    """``f(z) = tanh(W z + x)`` with ``W`` symmetric, eigenvalues evenly spread in
    ``[-contraction, contraction]``.

    Since ``|tanh'| <= 1`` and ``||W||_2 = contraction``, ``f`` is a contraction with
    factor at most ``contraction``; with a small input (``input_scale``) ``tanh`` stays
    near its linear range and the factor is nearly attained, so plain iteration needs
    about ``log(tol) / log(contraction)`` steps. Shapes: ``z0`` is ``(B, D)``.

    Example:
        >>> p = slow_tanh(0.9, D=8, B=2)
        >>> p.z0.shape, p.f(p.z0).shape
        (torch.Size([2, 8]), torch.Size([2, 8]))
    """
    if not (0.0 < contraction < float("inf")):
        raise ValueError(f"contraction must be a positive number, got {contraction!r}")
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    eig = torch.linspace(-contraction, contraction, D, dtype=torch.float64)
    W = ((Q * eig) @ Q.T).to(dtype)  # Q diag(eig) Q^T, (D, D)
    x = (input_scale * torch.randn(B, D, generator=g, dtype=torch.float64)).to(dtype)  # (B, D)

    def f(z: Tensor) -> Tensor:
        return torch.tanh(z @ W.T + x)

    return Problem("slow_tanh", f, torch.zeros(B, D, dtype=dtype), None,
                   f"tanh(Wz + x), W symmetric with eigenvalues in [-{contraction}, {contraction}]")


def spiral_2d(contraction: float = 0.9, angle: float = 1.0, offset: tuple = (0.6, -0.4),
              dtype: torch.dtype = torch.float64) -> Problem:
    """A two-dimensional map ``f(z) = tanh(c R(angle) z + b)``: ``R`` a rotation, ``c``
    the contraction factor. Plain iteration spirals into the fixed point (slowly when
    ``c`` is near 1); the state has two entries, so the iterates can be drawn in the plane.
    ``z0`` is ``(1, 2)``.

    Example:
        >>> p = spiral_2d()
        >>> p.f(p.z0).shape
        torch.Size([1, 2])
    """
    c, s = math.cos(angle), math.sin(angle)
    A = contraction * torch.tensor([[c, -s], [s, c]], dtype=dtype)
    b = torch.tensor([list(offset)], dtype=dtype)

    def f(z: Tensor) -> Tensor:
        return torch.tanh(z @ A.T + b)

    return Problem("spiral_2d", f, torch.zeros(1, 2, dtype=dtype), None,
                   f"tanh({contraction} R({angle}) z + b)")


def race(f, z0: Tensor, entrants: Optional[Mapping[str, Mapping[str, Any]]] = None, *,
         tol: float = 1e-6, max_iter: int = 200, stop: str = "rel", return_iterates: bool = False,
         repeats: int = 1) -> Dict[str, SolverTrace]:
    """Solve ``f(z) = z`` from ``z0`` with each entrant; return ``{name: trace}``.

    ``entrants`` maps a display name to the keyword arguments of :func:`deqlite.solve`
    (``{"solver": "anderson", "m": 5}``); default :data:`DEFAULT_RACE`. With
    ``repeats > 1`` each entrant runs that many times and the trace of the fastest run is
    kept (the iterations are identical; only the wall time varies with machine load).

    Example:
        >>> p = slow_tanh(0.9, D=8, B=2)
        >>> traces = race(p.f, p.z0, {"picard": {"solver": "picard"}}, tol=1e-8)
        >>> traces["picard"].status
        'converged'
    """
    entrants = DEFAULT_RACE if entrants is None else entrants
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    out: Dict[str, SolverTrace] = {}
    for name, kwargs in entrants.items():
        kwargs = dict(kwargs)
        if "solver" not in kwargs:
            raise ValueError(f"entrant {name!r} has no 'solver' key: give e.g. {{'solver': 'anderson', 'm': 5}}")
        best: Optional[SolverTrace] = None
        for _ in range(repeats):
            _, tr = solve(f, z0, tol=tol, max_iter=max_iter, stop=stop, return_iterates=return_iterates,
                          on_failure="ignore", **kwargs)
            if best is None or tr.wall_time < best.wall_time:
                best = tr
        out[name] = best
    return out


def evals_to(trace: SolverTrace, tol: float) -> int:
    """Function evaluations until *every* sample's stopping residual first met ``tol``
    (``-1`` if some sample never did). Newton's Jacobians are not counted here; they are
    in ``trace.extra["jacobian_evals"]``."""
    steps = trace.steps_to(tol)  # (B,)
    if bool((steps < 0).any()):
        return -1
    return int(steps.max())


def race_table(traces: Mapping[str, SolverTrace], tol: float) -> List[Dict[str, Any]]:
    """One row per solver: evaluations to ``tol`` (-1: never), Jacobian evaluations,
    best residual reached, status, wall time in milliseconds."""
    rows = []
    for name, tr in traces.items():
        rows.append({
            "solver": name,
            "evals to tol": evals_to(tr, tol),
            "jacobians": int(tr.extra.get("jacobian_evals", 0)),
            "best residual": float(tr.best_residual.max()),
            "status": tr.status,
            "wall ms": 1e3 * tr.wall_time,
        })
    return rows


def anderson_conditioning(f, z0: Tensor, *, m: int = 5, max_iter: int = 50, tol: float = 1e-12,
                          **options: Any) -> Dict[str, Any]:
    """Solve with Anderson and record, per step, the condition number of the Gram matrix
    ``G G^T`` of the stored residuals (sample 0), which the weights are solved against.

    Returns ``{"trace": SolverTrace, "cond": [float, ...]}``: a condition number per step
    from the step where two residuals are stored (``nan`` before). The history is rebuilt
    here from the callback, in the same ring-buffer order as :class:`deqlite.solvers.Anderson`.
    """
    history: List[Tensor] = []
    cond: List[float] = []

    def watch(info: StepInfo) -> None:
        g = (info.fz - info.z).reshape(info.z.shape[0], -1)[0].double()  # sample 0, (n,)
        history.append(g)
        del history[:-m]
        if len(history) < 2:
            cond.append(float("nan"))
            return
        G = torch.stack(history)  # (h, n)
        cond.append(float(torch.linalg.cond(G @ G.T)))

    t0 = time.perf_counter()
    _, tr = solve(f, z0, solver="anderson", m=m, tol=tol, max_iter=max_iter, callback=watch,
                  on_failure="ignore", **options)
    return {"trace": tr, "cond": cond, "seconds": time.perf_counter() - t0}


# the race figures live in deqlite.viz.race_figures (plotly loads only when one is drawn);
# deqlite.race.race_figure / race_animation stay importable from here


def __getattr__(name: str) -> Any:
    if name in ("race_figure", "race_animation"):
        from .viz import race_figures
        return getattr(race_figures, name)
    raise AttributeError(f"module 'deqlite.race' has no attribute {name!r}")


# --------------------------------------------------------------------------------------
# budgets and timing
# --------------------------------------------------------------------------------------


def budget_curve(f: Callable[[Tensor], Tensor], z0: Tensor, solver: Any, max_nfe: int, *,
                 z_star: Optional[Tensor] = None, readout: Optional[Callable[[Tensor], Tensor]] = None,
                 labels: Optional[Tensor] = None, **solver_options: Any) -> Dict[str, List[float]]:
    """What a solve returns after each budget of ``1..max_nfe`` evaluations, from one run.

    ``solve(f, z0, solver=..., max_iter=K)`` returns the best-so-far iterate per sample; this
    reproduces that for every ``K`` from a single run with ``return_iterates=True``. Returns
    lists indexed by ``K - 1``: ``"nfe"``, ``"rel_residual"`` (median over samples of the
    returned iterate), ``"error"`` (median ``||z - z*|| / ||z*||``, if ``z_star``) and
    ``"accuracy"`` (% of ``argmax readout(z) == labels``, if both are given).
    """
    _, tr = solve(f, z0, solver=solver, tol=1e-30, max_iter=max_nfe, return_iterates=True,
                  on_failure="ignore", **solver_options)
    res = tr.residual  # (T, B)
    its = torch.stack(tr.iterates)  # (T, B, ...)
    T, B = res.shape
    out: Dict[str, List[float]] = {"nfe": [], "rel_residual": [], "error": [], "accuracy": []}
    best = torch.full((B,), math.inf, dtype=res.dtype, device=res.device)
    best_z = its[0].clone()
    if z_star is not None:
        z_star = z_star.to(its.device)
    if labels is not None:
        labels = labels.to(its.device)
    rel = tr.rel_residual
    best_rel = torch.full((B,), math.inf, dtype=res.dtype, device=res.device)
    for k in range(T):
        better = torch.isfinite(res[k]) & (res[k] < best)
        best = torch.where(better, res[k], best)
        best_rel = torch.where(better, rel[k], best_rel)
        best_z = torch.where(better.view((B,) + (1,) * (its.dim() - 2)), its[k], best_z)
        out["nfe"].append(k + 1)
        out["rel_residual"].append(float(best_rel.median()))
        if z_star is not None:
            d = (best_z - z_star).reshape(B, -1).norm(dim=1) / z_star.reshape(B, -1).norm(dim=1).clamp_min(1e-30)
            out["error"].append(float(d.median()))
        if readout is not None and labels is not None:
            with torch.no_grad():
                pred = readout(best_z).argmax(-1)
            out["accuracy"].append(100.0 * float((pred == labels).double().mean()))
    return out


def matched_nfe(values: Sequence[float], target: float, tol: float, higher_is_better: bool = True) -> Optional[int]:
    """Smallest budget (1-based index) from which ``values`` stays within ``tol`` of ``target``
    (``values[k] >= target - tol`` for accuracy, ``<= target + tol`` otherwise) for every
    larger budget too; ``None`` if it never does. Staying, not touching once, keeps a noisy
    curve from claiming an early match."""
    ok = [(v >= target - tol) if higher_is_better else (v <= target + tol) for v in values]
    if not ok or not ok[-1]:
        return None
    k = len(ok)
    while k > 0 and ok[k - 1]:
        k -= 1
    return k + 1


def median_times(fns: Dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> Dict[str, Dict[str, float]]:
    """Median wall-clock *and* CPU seconds (``time.process_time``) of each ``fns[name]()``.

    The runs are interleaved (round ``r`` runs every function once), so load from other
    processes on a shared machine falls on all of them alike; ratios taken from one call
    are the numbers to quote. Returns ``{name: {"wall": s, "cpu": s}}``."""
    check_int("repeats", repeats)
    check_int("warmup", warmup, lo=0)
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)

    def med(v: List[float]) -> float:
        v = sorted(v)
        mid = len(v) // 2
        return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])

    return {name: {"wall": med(wall[name]), "cpu": med(cpu[name])} for name in fns}



def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    check_int("repeats", repeats)
    check_int("warmup", warmup, lo=0)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])


def budget_times(f: Callable[[Tensor], Tensor], z0: Tensor, solver: Any, max_nfe: int, *,
                 repeats: int = 3, start: Optional[Callable[[], Tensor]] = None) -> List[float]:
    """Wall-clock seconds until each budget ``1..max_nfe`` of one solve (median of ``repeats``
    runs after a warm-up), read from per-step timestamps. ``start()`` (e.g. the hypersolver's
    initializer) is timed too and replaces ``z0``."""
    check_int("max_nfe", max_nfe)
    check_int("repeats", repeats)
    runs: List[List[float]] = []
    for r in range(repeats + 1):
        stamps: List[float] = []
        t0 = time.perf_counter()
        with torch.no_grad():
            z_first = start() if start is not None else z0
        solve(f, z_first, solver=solver, tol=1e-30, max_iter=max_nfe, on_failure="ignore",
              callback=lambda info: stamps.append(time.perf_counter() - t0))
        if r:
            runs.append(stamps)
    return [sorted(col)[len(col) // 2] for col in zip(*runs)]


def budget_snapshot(f: Callable[[Tensor], Tensor], starts: Dict[str, Tuple[Any, Tensor]], K: int, *,
                    readout: Callable[[Tensor], Tensor], labels: Tensor) -> Dict[str, Dict[str, Any]]:
    """Each solver after ``K`` evaluations: ``{name: {"rel_residual": (B,) numpy, "accuracy": %}}``.

    ``starts`` maps a name to ``(solver, z0)``. This is the ``compute`` of the chapter's steps
    slider (:func:`steps_figure` draws it)."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, (solver, z0) in starts.items():
        z, tr = solve(f, z0, solver=solver, tol=1e-30, max_iter=K, on_failure="ignore")
        with torch.no_grad():
            acc = 100.0 * float((readout(z).argmax(-1) == labels).double().mean())
        out[name] = {"rel_residual": tr.best_residual.detach().cpu().numpy(), "accuracy": acc, "K": K}
    return out



def race_snapshot(f: Callable[[Tensor], Tensor], starts: Dict[str, Tuple[Any, Tensor]], budgets: Dict[str, int], *,
                  readout: Callable[[Tensor], Tensor], labels: Tensor) -> Dict[str, Dict[str, Any]]:
    """Like :func:`budget_snapshot`, but each solver gets its own budget: ``budgets[name]``
    evaluations of ``f``. Keys of the result read ``"name (K)"``; the compute of the chapter's
    "Anderson's steps vs the neural solver's steps" slider."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, (solver, z0) in starts.items():
        if name not in budgets:
            raise ValueError(f"no budget for solver {name!r}: budgets has {sorted(budgets)}")
        check_int(f"budgets[{name!r}]", budgets[name])
        snap = budget_snapshot(f, {name: (solver, z0)}, budgets[name], readout=readout, labels=labels)[name]
        out[f"{name} ({budgets[name]})"] = snap
    return out

