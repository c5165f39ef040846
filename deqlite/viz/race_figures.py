"""Figures of solver races (chapter 3): residual per evaluation, and the iterates of several
solvers animated in one plane. The races themselves are :func:`deqlite.race.race`."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import plotly.graph_objects as go
import torch
from torch import Tensor

from ..solvers import SolverTrace
from . import _data
from .figures import add_tol_line
from .theme import COLORWAY, register

__all__ = ["race_figure", "race_animation"]



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
