"""One plotly template for the whole book, readable on light and dark pages.

Backgrounds are transparent (the page shows through), text and grid lines are mid-grey
with alpha, and the colour cycle is Okabe-Ito (colour-blind safe) without its yellow,
which vanishes on white.
"""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

TEMPLATE_NAME = "deqlite"
COLORWAY = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#999999"]
_TEXT = "#808080"  # contrast >= 3.9:1 on white and >= 5:1 on the dark theme's background
_GRID = "rgba(128,128,128,0.25)"
_LINE = "rgba(128,128,128,0.6)"


def _axis() -> dict:
    return dict(
        gridcolor=_GRID,
        zerolinecolor=_LINE,
        linecolor=_LINE,
        tickcolor=_LINE,
        showline=True,
        ticks="outside",
        title=dict(standoff=8),
    )


def make_template() -> go.layout.Template:
    """The ``deqlite`` template (also registered in ``plotly.io.templates``)."""
    return go.layout.Template(
        layout=dict(
            colorway=COLORWAY,
            font=dict(family="Inter, Helvetica, Arial, sans-serif", size=13, color=_TEXT),
            paper_bgcolor="rgba(0,0,0,0)",
            plot_bgcolor="rgba(0,0,0,0)",
            xaxis=_axis(),
            yaxis=_axis(),
            legend=dict(bgcolor="rgba(0,0,0,0)", bordercolor=_GRID),
            hoverlabel=dict(font=dict(color="#222")),
            margin=dict(l=60, r=20, t=50, b=50),
            sliderdefaults=dict(
                bgcolor="rgba(128,128,128,0.35)",
                activebgcolor="#0072B2",
                bordercolor=_LINE,
                tickcolor=_LINE,
                font=dict(color=_TEXT),
            ),
            updatemenudefaults=dict(
                bgcolor="rgba(128,128,128,0.15)", bordercolor=_LINE, font=dict(color=_TEXT)
            ),
        )
    )


def register() -> str:
    """Register the template under ``"deqlite"`` (idempotent) and return its name."""
    if TEMPLATE_NAME not in pio.templates:
        pio.templates[TEMPLATE_NAME] = make_template()
    return TEMPLATE_NAME


def use_as_default() -> None:
    """Make ``deqlite`` plotly's default template (figures made outside deqlite.viz too)."""
    pio.templates.default = register()
