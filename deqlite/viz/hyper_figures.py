"""Figures of chapter 4 (neural equilibrium solvers), on the book's theme.

- :func:`steps_figure`: every solver after a budget of evaluations (a
  :func:`deqlite.race.budget_snapshot` or :func:`deqlite.race.race_snapshot`);
- :func:`pareto_figure`: accuracy and residual against evaluations and time
  (:func:`deqlite.race.budget_curve`, :func:`deqlite.race.budget_times`);
- :func:`ablation_figure`: residuals of ablation variants relative to a reference.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .theme import COLORWAY, register

__all__ = ["steps_figure", "pareto_figure", "ablation_figure"]


def steps_figure(snapshot: Dict[str, Dict[str, Any]], height: int = 380):
    """Box plot of the per-sample relative residual (log) and bars of the accuracy of every
    solver after the same number of evaluations (one :func:`budget_snapshot`)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("relative residual per sample", "test accuracy (%)"))
    names = list(snapshot)
    for name in names:
        fig.add_trace(go.Box(y=snapshot[name]["rel_residual"], name=name, boxpoints=False,
                             showlegend=False), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[snapshot[n]["accuracy"] for n in names], showlegend=False,
                         text=[f"{snapshot[n]['accuracy']:.1f}" for n in names], textposition="inside",
                         insidetextanchor="end"),
                  row=1, col=2)
    fig.update_yaxes(type="log", exponentformat="power", row=1, col=1)
    fig.update_yaxes(range=[0, 100], row=1, col=2)  # labels sit inside the bars, clear of the title
    fig.update_layout(height=height, margin=dict(t=80, b=40), template=register())
    return fig


def pareto_figure(curves: Dict[str, Dict[str, List[float]]], times: Optional[Dict[str, List[float]]] = None,
                  converged_accuracy: Optional[float] = None, height: int = 620):
    """Accuracy and median relative residual against evaluations (and wall time, when
    ``times`` is given) for each solver: the speed/accuracy trade-off of Fig. 1 / 4 of the paper.
    ``curves[name]`` is a :func:`budget_curve`, ``times[name]`` a :func:`budget_times`."""
    cols = 2 if times else 1
    titles = ["accuracy vs evaluations of f"] + (["accuracy vs wall time"] if times else []) + \
             ["residual vs evaluations of f"] + (["residual vs wall time"] if times else [])
    fig = make_subplots(rows=2, cols=cols, subplot_titles=titles, vertical_spacing=0.14)
    for i, (name, c) in enumerate(curves.items()):
        color = COLORWAY[i % len(COLORWAY)]
        xs = [("nfe", c["nfe"], 1)]
        if times:
            xs.append(("ms", [1e3 * t for t in times[name]], 2))
        for _label, x, col in xs:
            for row, key in ((1, "accuracy"), (2, "rel_residual")):
                fig.add_trace(go.Scatter(x=x, y=c[key], mode="lines+markers", name=name, legendgroup=name,
                                         line=dict(color=color), marker=dict(size=5),
                                         showlegend=(row == 1 and col == 1)), row=row, col=col)
    if converged_accuracy is not None:  # zoom on the converged accuracy (the start is at chance)
        for col in range(1, cols + 1):
            fig.add_hline(y=converged_accuracy, line_dash="dot", row=1, col=col)
            fig.update_yaxes(range=[converged_accuracy - 8, min(100.0, converged_accuracy + 2)], row=1, col=col)
    for col in range(1, cols + 1):
        fig.update_yaxes(type="log", exponentformat="power", row=2, col=col)
        fig.update_xaxes(title_text="evaluations of f" if col == 1 else "milliseconds", row=2, col=col)
    fig.update_layout(height=height, margin=dict(t=60), template=register())
    return fig


def ablation_figure(residuals: Dict[str, float], reference: str, height: int = 420,
                    title: str = "Ablations: median relative residual, relative to ours"):
    """Bars of each variant's residual divided by ``residuals[reference]`` (log scale), each
    labelled with its absolute value; a dotted line marks 1 (as good as the reference)."""
    if reference not in residuals:
        raise ValueError(f"reference {reference!r} is not one of the variants {sorted(residuals)}")
    ref = residuals[reference]
    fig = go.Figure(go.Bar(x=list(residuals), y=[v / ref for v in residuals.values()],
                           text=[f"{v:.1e}" for v in residuals.values()], textposition="inside"))
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(template=register(), height=height, margin=dict(t=50, b=120), title=title,
                      yaxis=dict(type="log", title=f"residual / {reference}"))
    return fig
