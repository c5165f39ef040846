"""Render plotly's mime bundle (``application/vnd.plotly.v1+json``) in the built book.

plotly >= 6 puts a figure in a notebook only as this mime type; myst-nb drops mime types it
does not know, so without this plugin plotly figures silently vanish from the HTML. The
plugin is found by myst-nb through the ``myst_nb.mime_renderers`` entry point; the plotly.js
it needs is shipped by :mod:`deqlite_book.sphinxext` (no CDN).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Sequence

PLOTLY_MIME = "application/vnd.plotly.v1+json"
HTML_BUILDERS = ("html", "dirhtml", "singlehtml", "readthedocs", "readthedocsdirhtml")
# Interaction defaults for every figure in the book.
PLOTLY_CONFIG: dict[str, Any] = {"responsive": True, "displaylogo": False}


def figure_html(spec: dict[str, Any] | str) -> str:
    """HTML (a div and an inline script, no plotly.js) drawing the figure ``spec``."""
    import plotly.io as pio

    if isinstance(spec, (str, bytes)):
        spec = json.loads(spec)
    spec = dict(spec)
    spec.pop("config", None)
    return pio.to_html(
        spec,
        include_plotlyjs=False,
        full_html=False,
        config=PLOTLY_CONFIG,
        validate=False,
        default_width="100%",
    )


class PlotlyMimeRenderer:
    """myst-nb ``MimeRenderPlugin`` for plotly figures."""

    # Prefer the plotly mime type over text/html and images in every HTML builder.
    mime_priority_overrides: ClassVar[Sequence[tuple[str, str, int | None]]] = [
        (builder, PLOTLY_MIME, 1) for builder in HTML_BUILDERS
    ]

    @staticmethod
    def handle_mime(renderer: Any, data: Any, inline: bool) -> list | None:
        if inline or data.mime_type != PLOTLY_MIME:
            return None
        from docutils import nodes

        html = figure_html(data.content)
        return [nodes.raw(text=html, format="html", classes=["output", "deqlite-plotly"])]
