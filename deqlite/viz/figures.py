"""Plotly figure builders that take solver traces.

Every builder returns a ``plotly.graph_objects.Figure`` whose interactivity (slider steps,
animation frames, play button) is baked into the figure, so it works in the static HTML
book with no kernel.
"""

from __future__ import annotations

import math

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import _data
from .theme import COLORWAY, register
from .._checks import check_number

TINY = 1e-30  # residuals of exactly 0 are drawn here (log axes cannot show 0)
MAX_SLIDER_STEPS = 60  # more steps only make the HTML larger


def _slider_positions(n: int, max_steps: int = MAX_SLIDER_STEPS) -> list[int]:
    if n <= max_steps:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_steps).round().astype(int).tolist()))


def residual_figure(
    traces: Any,
    *,
    kind: str = "rel",
    reduce: str | int = "max",
    title: str | None = None,
    slider: bool = True,
    show_tol: bool = True,
    height: int = 420,
) -> go.Figure:
    """Residual per solver step on a log scale, with a slider over the steps.

    Args:
        traces: one ``SolverTrace``, a list of them, or a mapping ``name -> SolverTrace``
            (``to_dict()`` outputs work too).
        kind: ``"rel"`` (||f(z)-z|| / ||f(z)||), ``"abs"`` (||f(z)-z||) or ``"stop"``.
        reduce: how to summarise the batch per step: ``"max"`` (slowest sample),
            ``"mean"``, ``"median"``, or an int sample index.
        slider: add a step slider; moving it draws each curve up to that step.

    Returns:
        A figure with, per trace, a faint full curve and a bold curve up to the slider's step.

    Example:
        >>> import torch, deqlite, deqlite.viz as viz
        >>> z, tr = deqlite.solve(lambda z: 0.5 * torch.tanh(z) + 1, torch.zeros(2, 3))  # doctest: +SKIP
        >>> fig = viz.residual_figure({"anderson": tr})                                   # doctest: +SKIP
    """
    named = _data.as_named(traces)
    curves = {name: _data.reduce_batch(_data.residual(tr, kind), reduce) for name, tr in named.items()}
    fig = go.Figure()
    for i, (name, y) in enumerate(curves.items()):
        color = COLORWAY[i % len(COLORWAY)]
        steps = np.arange(len(y))
        y = np.maximum(y, TINY)
        fig.add_trace(go.Scatter(x=steps, y=y, mode="lines", line=dict(color=color, width=1),
                                 opacity=0.35, name=name, legendgroup=name, showlegend=False,
                                 hovertemplate=f"{name}<br>step %{{x}}<br>residual %{{y:.3e}}<extra></extra>"))
        fig.add_trace(go.Scatter(x=steps, y=y, mode="lines+markers", line=dict(color=color, width=2.5),
                                 marker=dict(size=5), name=name, legendgroup=name,
                                 hovertemplate=f"{name}<br>step %{{x}}<br>residual %{{y:.3e}}<extra></extra>"))
    tols = {_data.field(tr, "tol") for tr in named.values()} - {None}
    stops = {_data.field(tr, "stop") for tr in named.values()}
    if show_tol and len(tols) == 1 and (kind == "stop" or stops == {kind}):
        # the tolerance is only meaningful on the residual used for stopping
        add_tol_line(fig, float(tols.pop()), side="right")
    n_steps = max(len(y) for y in curves.values())
    if slider and n_steps > 1:
        bold = list(range(1, 2 * len(curves), 2))
        steps = []
        for k in _slider_positions(n_steps):
            xs = [np.arange(min(k + 1, len(y))) for y in curves.values()]
            ys = [np.maximum(y[: k + 1], TINY) for y in curves.values()]
            steps.append(dict(method="restyle", label=str(k),
                              args=[{"x": [x.tolist() for x in xs], "y": [y.tolist() for y in ys]}, bold]))
        fig.update_layout(sliders=[dict(active=len(steps) - 1, steps=steps, currentvalue=dict(prefix="step "),
                                        pad=dict(t=45))])
    ylabel = {"rel": "relative residual ||f(z)-z|| / ||f(z)||", "abs": "residual ||f(z)-z||",
              "stop": "residual (stopping criterion)"}[kind]
    fig.update_layout(template=register(), title=title, height=height,
                      xaxis_title="solver step", yaxis=dict(type="log", title=ylabel, exponentformat="power"),
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    return fig


def add_tol_line(fig: go.Figure, tol: float, side: str = "left") -> go.Figure:
    """A dashed line at ``tol`` with its label on the line, on a log-scale y axis.

    The label goes in by hand: plotly's ``add_hline(annotation_text=...)`` places the label
    at ``y = tol`` while annotations on a log axis take ``log10(y)``, so it floated far above
    the line (190-280 px in the book's figures).
    """
    check_number("tol", tol, lo=0.0, low_open=True, hint="a positive tolerance for a log axis")
    fig.add_hline(y=tol, line=dict(dash="dash", color="rgba(128,128,128,0.8)", width=1))
    fig.add_annotation(x=0 if side == "left" else 1, xref="x domain", y=math.log10(tol), yref="y",
                       text="tol", showarrow=False, xanchor=side, yanchor="top")
    return fig


def convergence_animation(
    trace: Any,
    *,
    dims: tuple[int, int] = (0, 1),
    sample: int = 0,
    title: str | None = None,
    frame_ms: int = 150,
    height: int = 460,
) -> go.Figure:
    """Animate the iterates z_0, z_1, ... of one sample in the plane of two state dimensions.

    Args:
        trace: a ``SolverTrace`` made with ``return_iterates=True``, or the iterates as a
            (T, B, ...) array / list of (B, ...) tensors, or (T, D) for one sample.
        dims: the two state dimensions to plot.
        sample: which batch sample to follow.

    Returns:
        A figure with a play/pause button and a step slider (frames baked in).
    """
    z = _data.pick_sample(_data.iterates(trace), sample)  # (T, D)
    dims = _data.check_dims(dims, z.shape[1])
    x, y = z[:, dims[0]], z[:, dims[1]]
    n = len(x)
    path = dict(mode="lines+markers", line=dict(color=COLORWAY[0], width=2), marker=dict(size=5), name="iterates z_k")
    head = dict(mode="markers", marker=dict(size=13, color=COLORWAY[3], symbol="circle-open", line=dict(width=3)),
                name="current z_k")
    fig = go.Figure([go.Scatter(x=x[:1], y=y[:1], **path), go.Scatter(x=x[:1], y=y[:1], **head),
                     go.Scatter(x=[x[-1]], y=[y[-1]], mode="markers", name="last iterate",
                                marker=dict(symbol="star", size=14, color=COLORWAY[2]))])
    positions = _slider_positions(n, 120)
    fig.frames = [go.Frame(name=str(k), data=[go.Scatter(x=x[: k + 1], y=y[: k + 1]), go.Scatter(x=[x[k]], y=[y[k]])],
                           traces=[0, 1]) for k in positions]
    anim = dict(frame=dict(duration=frame_ms, redraw=False), transition=dict(duration=0), fromcurrent=True, mode="immediate")
    fig.update_layout(
        updatemenus=[dict(type="buttons", direction="left", x=0, y=-0.12, xanchor="left", yanchor="top",
                          buttons=[dict(label="▶ play", method="animate", args=[None, anim]),
                                   dict(label="❚❚ pause", method="animate",
                                        args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False))])])],
        sliders=[dict(active=0, x=0.2, len=0.8, y=-0.05, currentvalue=dict(prefix="step "),
                      steps=[dict(method="animate", label=str(k),
                                  args=[[str(k)], dict(mode="immediate", frame=dict(duration=0, redraw=False),
                                                       transition=dict(duration=0))]) for k in positions])],
    )
    pad_x = 0.08 * (np.ptp(x) or 1.0)
    pad_y = 0.08 * (np.ptp(y) or 1.0)
    fig.update_layout(template=register(), title=title, height=height,
                      xaxis=dict(title=f"z[{dims[0]}]", range=[x.min() - pad_x, x.max() + pad_x]),
                      yaxis=dict(title=f"z[{dims[1]}]", range=[y.min() - pad_y, y.max() + pad_y]),
                      margin=dict(b=110))
    return fig


def iterate_figure(
    trace: Any,
    *,
    dims: tuple[int, int] = (0, 1),
    sample: int = 0,
    kind: str = "rel",
    title: str | None = None,
    height: int = 400,
) -> go.Figure:
    """Two panels for one solve: the iterate path in a plane of the state (left) and the
    residual per step on a log scale (right). The building block of explorers.

    Args:
        trace: a ``SolverTrace`` made with ``return_iterates=True``.
        dims: the two state dimensions on the left panel.
        sample: which batch sample to show.
        kind: residual on the right panel, ``"rel"``, ``"abs"`` or ``"stop"``.
    """
    z = _data.pick_sample(_data.iterates(trace), sample)  # (T, D)
    dims = _data.check_dims(dims, z.shape[1])
    r = np.maximum(_data.pick_sample(_data.residual(trace, kind), sample), TINY)  # (T,)
    if len(r) != len(z):
        raise ValueError(f"the trace has {len(z)} iterates but {len(r)} residual rows: pass the "
                         f"SolverTrace of one solve made with return_iterates=True")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14,
                        subplot_titles=("iterates z_k in the state plane", "residual per step"))
    fig.add_trace(go.Scatter(x=z[:, dims[0]], y=z[:, dims[1]], mode="lines+markers", name="z_k",
                             line=dict(color=COLORWAY[0], width=1.5), marker=dict(size=4)), row=1, col=1)
    fig.add_trace(go.Scatter(x=z[:1, dims[0]], y=z[:1, dims[1]], mode="markers", name="z_0",
                             marker=dict(size=10, color=COLORWAY[1])), row=1, col=1)
    fig.add_trace(go.Scatter(x=z[-1:, dims[0]], y=z[-1:, dims[1]], mode="markers", name="last z_k",
                             marker=dict(size=13, symbol="star", color=COLORWAY[2])), row=1, col=1)
    fig.add_trace(go.Scatter(x=np.arange(len(r)), y=r, mode="lines+markers", name="residual",
                             line=dict(color=COLORWAY[3], width=2), marker=dict(size=4)), row=1, col=2)
    fig.update_xaxes(title_text=f"z[{dims[0]}]", row=1, col=1)
    fig.update_yaxes(title_text=f"z[{dims[1]}]", row=1, col=1)
    fig.update_xaxes(title_text="step k", row=1, col=2)
    fig.update_yaxes(title_text="relative residual" if kind == "rel" else "residual", type="log",
                     exponentformat="power", row=1, col=2)
    fig.update_layout(template=register(), title=dict(text=title, x=0, xanchor="left"), height=height,
                      legend=dict(orientation="h", y=1.12, yanchor="bottom", x=1, xanchor="right"),
                      margin=dict(t=100))
    return fig
