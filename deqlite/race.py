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
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from .problems import Problem
from .solvers import SolverTrace, StepInfo, solve

__all__ = ["slow_tanh", "spiral_2d", "race", "race_table", "evals_to", "anderson_conditioning",
           "race_figure", "race_animation", "DEFAULT_RACE"]

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


# --------------------------------------------------------------------------------------
# figures (plotly is imported only when one is drawn)
# --------------------------------------------------------------------------------------


def _check_traces(traces: Any) -> None:
    if not isinstance(traces, Mapping) or not traces:
        raise ValueError(f"traces must be a non-empty {{name: SolverTrace}} mapping (what race() "
                         f"returns), got {type(traces).__name__}{' (empty)' if isinstance(traces, Mapping) else ''}")
    for name, tr in traces.items():
        if not isinstance(tr, SolverTrace):
            raise TypeError(f"traces[{name!r}] must be a SolverTrace, got {type(tr).__name__}")


def race_figure(traces: Mapping[str, SolverTrace], *, tol: Optional[float] = None,
                title: Optional[str] = None, height: int = 420, max_steps: Optional[int] = None):
    """Residual per function evaluation, one line per solver (worst sample of the batch),
    on a log scale; a dashed line at ``tol``. Always one trace per solver (empty when a
    solver has no steps), so it can serve as the ``render`` of a :class:`deqlite.viz.Explorer`.
    ``max_steps`` fixes the x-range (useful when the budget is a slider)."""
    import plotly.graph_objects as go

    from .viz.figures import add_tol_line
    from .viz.theme import COLORWAY, register

    _check_traces(traces)
    fig = go.Figure()
    for i, (name, tr) in enumerate(traces.items()):
        worst = tr.residual.max(dim=1).values.clamp_min(1e-30)  # (T,)
        fig.add_trace(go.Scatter(
            x=list(range(1, len(worst) + 1)), y=[float(f"{v:.4g}") for v in worst.tolist()],
            mode="lines", name=name, line=dict(color=COLORWAY[i % len(COLORWAY)], width=2.5),
            hovertemplate=f"{name}<br>evaluation %{{x}}<br>residual %{{y:.2e}}<extra></extra>"))
    if tol is not None:
        add_tol_line(fig, tol)
    fig.update_layout(template=register(), title=title, height=height,
                      xaxis=dict(title="evaluations of f", range=[0, max_steps + 1] if max_steps else None),
                      yaxis=dict(type="log", title="relative residual (worst sample)", exponentformat="power"),
                      legend=dict(x=1.02, y=1, xanchor="left", yanchor="top"))
    return fig


def race_animation(traces: Mapping[str, SolverTrace], *, sample: int = 0, dims: tuple = (0, 1),
                   z_star: Optional[Tensor] = None, title: Optional[str] = None, frame_ms: int = 250,
                   height: int = 480):
    """Animate the iterates of several solvers in the same plane (traces made with
    ``return_iterates=True``): a play button and a step slider, baked into the figure.
    Frame ``k`` shows each solver's path ``z_0 .. z_k`` (a finished solver stays put)."""
    import plotly.graph_objects as go

    from .viz.theme import COLORWAY, register

    from .viz import _data

    _check_traces(traces)
    paths = {}
    for name, tr in traces.items():
        if not tr.iterates:
            raise ValueError(f"the trace of {name!r} holds no iterates: race(..., return_iterates=True)")
        z = _data.pick_sample(torch.stack(tr.iterates).reshape(len(tr.iterates), tr.iterates[0].shape[0], -1).numpy(),
                              sample)  # (T, D)
        d0, d1 = _data.check_dims(dims, z.shape[1])
        paths[name] = (z[:, d0].tolist(), z[:, d1].tolist())
    n = max(len(p[0]) for p in paths.values())
    colors = {name: COLORWAY[i % len(COLORWAY)] for i, name in enumerate(paths)}

    def frame_data(k: int) -> list:
        out = []
        for name, (xs, ys) in paths.items():
            j = min(k, len(xs) - 1)
            out.append(go.Scatter(x=xs[: j + 1], y=ys[: j + 1], mode="lines+markers", name=name,
                                  legendgroup=name, line=dict(color=colors[name], width=2),
                                  marker=dict(size=[4] * j + [11], color=colors[name])))
        return out

    data = frame_data(0)
    if z_star is not None:
        zs = z_star.reshape(z_star.shape[0], -1)[sample]
        data.append(go.Scatter(x=[float(zs[dims[0]])], y=[float(zs[dims[1]])], mode="markers", name="z*",
                               marker=dict(symbol="star", size=16, color="#808080")))
    fig = go.Figure(data)
    fig.frames = [go.Frame(name=str(k), data=frame_data(k), traces=list(range(len(paths)))) for k in range(n)]
    play = dict(frame=dict(duration=frame_ms, redraw=False), transition=dict(duration=0), fromcurrent=True,
                mode="immediate")
    now = dict(mode="immediate", frame=dict(duration=0, redraw=False), transition=dict(duration=0))
    xs_all = [v for xs, _ in paths.values() for v in xs]
    ys_all = [v for _, ys in paths.values() for v in ys]
    px = 0.08 * ((max(xs_all) - min(xs_all)) or 1.0)
    py = 0.08 * ((max(ys_all) - min(ys_all)) or 1.0)
    fig.update_layout(
        template=register(), title=title, height=height + 60, margin=dict(b=170),
        xaxis=dict(title=f"z[{dims[0]}]", range=[min(xs_all) - px, max(xs_all) + px]),
        yaxis=dict(title=f"z[{dims[1]}]", range=[min(ys_all) - py, max(ys_all) + py]),
        updatemenus=[dict(type="buttons", direction="left", x=0, y=-0.42, xanchor="left", yanchor="top",
                          buttons=[dict(label="▶ play", method="animate", args=[None, play]),
                                   dict(label="❚❚ pause", method="animate", args=[[None], now])])],
        sliders=[dict(active=0, x=0, len=1, y=-0.12, currentvalue=dict(prefix="step "),
                      steps=[dict(method="animate", label=str(k), args=[[str(k)], now]) for k in range(n)])])
    return fig
