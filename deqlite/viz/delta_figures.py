"""Figures of the DeltaDEQ chapter: heterogeneous convergence of a recurrent cell, and one
INR inference under the delta rule (reconstruction, fired fraction, savings against PSNR).

Both take results computed by :mod:`deqlite.analysis`, :mod:`deqlite.models` and
:mod:`deqlite.delta`; they compute nothing themselves. Drawn on the ``deqlite`` template.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .._checks import check_int
from .theme import register

__all__ = ["delta_threshold_figure", "heterogeneous_convergence_figure"]


def _np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def heterogeneous_convergence_figure(x: Any, target: Any, outputs: Any, trajectory: Any,
                                     pca: Any, mean_delta: Any, counts: Any, *,
                                     sample: int = 100, n_neighbours: int = 5,
                                     steps_shown: Sequence[int] = (1, 5, 10, 15),
                                     height: int = 680) -> go.Figure:
    """Six panels of a recurrent cell iterated on constant inputs (DeltaDEQ, Fig. 1):
    (a) the read-out after ``t`` steps against the target, (b) the first two principal
    components of ``n_neighbours`` neighbouring inputs' trajectories, (c) the cumulative
    variance explained, (d) every dimension of ``h_t`` for one input, (e) the mean change
    per dimension and step (log scale), (f) at which step the (input, dimension) pairs
    settle.

    Args:
        x, target: ``(N, 1)`` inputs and targets.
        outputs: ``(T, N, 1)`` read-out after each step.
        trajectory: ``(T + 1, N, D)`` states ``h_0 ... h_T``.
        pca: a :class:`deqlite.analysis` PCA result (``projected`` ``(T + 1, N, 2)``,
            ``cumulative`` ``(D,)``).
        mean_delta: ``(T, D)`` mean ``|h_{t+1} - h_t|``.
        counts: ``(T,)`` pairs settling at each step.
        sample: the input of panel (d) and the first of panel (b).
    """
    traj, outs, x, target = _np(trajectory), _np(outputs), _np(x), _np(target)
    T, N, D = traj.shape[0] - 1, traj.shape[1], traj.shape[2]
    check_int("sample", sample, lo=0, hi=N - n_neighbours)
    check_int("n_neighbours", n_neighbours, hi=N)
    mean_delta, counts = _np(mean_delta), _np(counts)
    fig = make_subplots(rows=2, cols=3, vertical_spacing=0.2, horizontal_spacing=0.09, subplot_titles=(
        "(a) read-out after t steps", f"(b) {n_neighbours} inputs, PCA", "(c) variance explained",
        "(d) h_t, one input", "(e) mean |h_t+1 - h_t|", "(f) step where |dh| < 0.01"))
    for k in steps_shown:
        fig.add_trace(go.Scatter(x=x[:, 0], y=outs[k - 1, :, 0], name=f"t = {k}"), 1, 1)
    fig.add_trace(go.Scatter(x=x[:, 0], y=target[:, 0], name="sin(x)", line={"dash": "dot"}), 1, 1)
    projected = _np(pca.projected)
    for i in range(sample, sample + n_neighbours):  # neighbouring inputs
        fig.add_trace(go.Scatter(x=projected[:, i, 0], y=projected[:, i, 1], mode="lines+markers",
                                 showlegend=False, marker={"size": 4}), 1, 2)
    fig.add_trace(go.Scatter(x=np.arange(1, D + 1), y=_np(pca.cumulative), showlegend=False), 1, 3)
    for d in range(D):
        fig.add_trace(go.Scatter(x=np.arange(T + 1), y=traj[:, sample, d], showlegend=False,
                                 line={"width": 1}), 2, 1)
        fig.add_trace(go.Scatter(x=np.arange(1, T + 1), y=mean_delta[:, d], showlegend=False,
                                 line={"width": 1}), 2, 2)
    fig.add_trace(go.Bar(x=np.arange(1, len(counts) + 1), y=counts, showlegend=False), 2, 3)
    fig.update_yaxes(type="log", row=2, col=2)
    for (r, c), (xt, yt) in {(1, 1): ("x", "output"), (1, 2): ("PC 1", "PC 2"),
                             (1, 3): ("components", "cumulative"), (2, 1): ("step t", "h_t"),
                             (2, 2): ("step t", "mean |change|"),
                             (2, 3): ("step", "(input, dim.) pairs")}.items():
        fig.update_xaxes(title_text=xt, row=r, col=c)
        fig.update_yaxes(title_text=yt, row=r, col=c)
    fig.update_annotations(font_size=13)
    fig.update_layout(template=register(), height=height,
                      title_text=f"Heterogeneous convergence in a {D}-unit RNN cell",
                      legend={"orientation": "h", "y": -0.12})
    return fig


def delta_threshold_figure(ev: Any, dense: Any, sweep: Sequence[tuple[float, float]], *,
                           size: int, iterations_shown: int = 30, height: int = 400) -> go.Figure:
    """One INR inference under the delta rule, three panels: the reconstruction (titled
    with its PSNR and iterations), the fraction of pixels whose entry fired per state
    dimension and iteration (iterations that never ran stay blank), and the MACs saved
    against PSNR, the run as a star on the ``sweep`` curve.

    Args:
        ev: a :class:`deqlite.delta.DeltaEval` recorded with ``record_fired=True``.
        dense: the dense run's :class:`~deqlite.delta.DeltaEval` (the savings' baseline).
        sweep: ``(fraction of MACs saved, PSNR)`` pairs of the threshold sweep.
        size: the image side (the output has ``size * size`` rows).
        iterations_shown: columns of the heatmap.
    """
    check_int("size", size)
    check_int("iterations_shown", iterations_shown)
    if ev.fired_per_dim is None:
        raise ValueError("ev has no fired_per_dim: run evaluate_delta(..., record_fired=True)")
    saved = ev.reduction_vs(dense)
    fig = make_subplots(rows=1, cols=3, column_widths=[0.28, 0.36, 0.36], horizontal_spacing=0.12,
                        subplot_titles=(f"{ev.psnr:.2f} dB, {ev.iterations} it.",
                                        "fired per dimension", f"{saved:.1%} MACs saved"))
    img = _np(ev.output).reshape(size, size)
    fig.add_trace(go.Heatmap(z=img[::-1], colorscale="gray", zmin=-1, zmax=1, showscale=False), 1, 1)
    fired_per_dim = _np(ev.fired_per_dim)
    fired = np.full((iterations_shown, fired_per_dim.shape[1]), np.nan)  # never ran: blank
    fired[:fired_per_dim.shape[0]] = fired_per_dim[:iterations_shown]
    fig.add_trace(go.Heatmap(z=fired.T, x=np.arange(1, iterations_shown + 1), zmin=0, zmax=1,
                             colorscale="Viridis",
                             colorbar={"title": "fired", "x": 1.02, "len": 0.9, "thickness": 10}), 1, 2)
    fig.add_trace(go.Scatter(x=[100 * r for r, _ in sweep], y=[p for _, p in sweep],
                             mode="lines+markers", name="reset sweep", showlegend=False), 1, 3)
    fig.add_trace(go.Scatter(x=[100 * saved], y=[ev.psnr], mode="markers",
                             marker={"size": 14, "symbol": "star"}, showlegend=False), 1, 3)
    fig.update_xaxes(visible=False, row=1, col=1)
    fig.update_yaxes(visible=False, scaleanchor="x", row=1, col=1)
    fig.update_xaxes(title_text="iteration", row=1, col=2)
    fig.update_yaxes(title_text="state dimension", row=1, col=2)
    fig.update_xaxes(title_text="MACs saved (%)", row=1, col=3)
    fig.update_yaxes(title_text="PSNR (dB)", row=1, col=3)
    fig.update_layout(template=register(), height=height)
    return fig
