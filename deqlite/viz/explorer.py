"""One figure, two front ends: a grid of slider values -> a static or a live explorer.

``Explorer(compute, grid, render)``:

- ``compute(**params)`` runs the experiment for one setting (e.g. returns a SolverTrace);
- ``render(result)`` turns its result into a plotly figure (same traces for every setting);
- ``grid`` maps each parameter name to the values the slider offers.

``explorer.figure()`` computes every setting of the grid once and bakes them into one
plotly figure (one slider step per setting): it works in the static HTML book with no kernel.
``explorer.widget()`` is the live front end (ipywidgets + plotly FigureWidget): it calls
``compute`` again whenever a slider moves. ``explorer.show()`` picks one of the two.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.basedatatypes import BaseFigure

from .theme import register

LIVE_ENV = "DEQLITE_LIVE"  # "1": show() returns the live widget; "0": always static


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN/inf replaced by None (a gap in plotly).

    A live FigureWidget sends its data to the front end as JSON, which has no NaN: without
    this, jupyter_client prints "Out of range float values are not JSON compliant" above the
    widget (the delta chapter's heatmap marks iterations that never ran with NaN).
    """
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
        return np.where(np.isfinite(value), value, None).tolist()
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def want_live() -> bool:
    """Whether :meth:`Explorer.show` should return the live widget.

    Live when the environment variable ``DEQLITE_LIVE=1`` is set or when running in
    Colab; static otherwise (book build, nbval, papermill, plain scripts).
    """
    flag = os.environ.get(LIVE_ENV, "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return "google.colab" in sys.modules


@dataclass
class Explorer:
    """A parameter explorer with a static (baked slider steps) and a live (ipywidgets) front end.

    Args:
        compute: ``compute(**params) -> result`` for one setting of the parameters.
        grid: ``{name: [values...]}``; the static figure holds every combination.
        render: ``render(result) -> plotly Figure``; every setting must give the same
            number of traces, in the same order.
        initial: the setting shown first (default: the first value of each parameter).
        live_grid: values offered by the live sliders (default: ``grid``); may be finer,
            since the live front end computes on demand.
        title: a format string filled with the parameters, e.g. ``"scale = {scale:.2f}"``.
        fixed_axes: keep the axis ranges fixed across the static figure's slider steps
            (the union over all settings), so settings can be compared by eye.

    Example:
        >>> ex = Explorer(lambda a: a, {"a": [1.0, 2.0]},
        ...               lambda a: go.Figure(go.Scatter(x=[0, 1], y=[0, a])))
        >>> len(ex.figure().layout.sliders[0].steps)
        2
    """

    compute: Callable[..., Any]
    grid: Mapping[str, Sequence[Any]]
    render: Callable[[Any], go.Figure]
    initial: Mapping[str, Any] | None = None
    live_grid: Mapping[str, Sequence[Any]] | None = None
    title: str | None = None
    fixed_axes: bool = True
    _cache: dict = field(default_factory=dict, init=False, repr=False)
    live_figure: Any = field(default=None, init=False, repr=False)
    live_widget: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError("grid is empty: pass {name: [values, ...]} with at least one parameter")
        for name, values in self.grid.items():
            if len(values) == 0:
                raise ValueError(f"grid[{name!r}] has no values; give at least one")
        initial = dict(self.initial or {})
        unknown = set(initial) - set(self.grid)
        if unknown:
            raise ValueError(f"initial has parameters {sorted(unknown)} not in grid {sorted(self.grid)}")
        for name, value in initial.items():
            if value not in list(self.grid[name]):
                raise ValueError(f"initial[{name!r}] = {value!r} is not one of the grid values "
                                 f"{list(self.grid[name])}; pick one of them")
        for name in ("compute", "render"):
            if not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable, got {type(getattr(self, name)).__name__}")
        self.initial = {name: initial.get(name, list(values)[0]) for name, values in self.grid.items()}

    # ---- computing -------------------------------------------------------------------
    def result(self, **params: Any) -> Any:
        """``compute(**params)``, cached per setting."""
        key = tuple(params[name] for name in self.grid)
        if key not in self._cache:
            self._cache[key] = self.compute(**params)
        return self._cache[key]

    def settings(self) -> list[dict[str, Any]]:
        names = list(self.grid)
        return [dict(zip(names, combo)) for combo in itertools.product(*self.grid.values())]

    def figure_for(self, **params: Any) -> go.Figure:
        """The figure of one setting (no slider)."""
        rendered = self.render(self.result(**params))
        if not isinstance(rendered, BaseFigure):
            raise TypeError(f"render must return a plotly go.Figure, got {type(rendered).__name__} "
                            f"(for the setting {dict(params)})")
        fig = go.Figure(rendered)
        if self.title:
            fig.update_layout(title_text=self.title.format(**params))
        if fig.layout.template is None or fig.layout.template.layout.colorway is None:
            fig.update_layout(template=register())
        return fig

    def _label(self, params: Mapping[str, Any]) -> str:
        if len(self.grid) == 1:
            return _fmt(next(iter(params.values())))
        return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())

    # ---- static front end ------------------------------------------------------------
    def figure(self) -> go.Figure:
        """A static figure with one slider step per setting (data baked in, no kernel needed)."""
        settings = self.settings()
        figs = [self.figure_for(**p) for p in settings]
        n_traces = {len(f.data) for f in figs}
        if len(n_traces) != 1:
            raise ValueError(
                f"render() returned figures with different numbers of traces {sorted(n_traces)} "
                "across the grid; return the same traces for every setting (use empty x/y for absent ones)"
            )
        labels = [self._label(p) for p in settings]
        active = settings.index(dict(self.initial)) if dict(self.initial) in settings else 0
        fig = go.Figure(figs[active])
        if self.fixed_axes:
            self._fix_axes(fig, figs)
        # Each slider step restyles every trace with that setting's full data (method
        # "update": synchronous, no animation machinery, so quick slider moves never leave
        # half-drawn traces behind).
        keys = sorted({k for f in figs for tr in f.data for k in tr.to_plotly_json()} - {"type", "uid"})
        steps = []
        for label, f in zip(labels, figs):
            traces = [tr.to_plotly_json() for tr in f.data]
            restyle = {k: [tr.get(k) for tr in traces] for k in keys}
            relayout = _layout_text(f)
            steps.append(dict(method="update", label=label, args=[restyle, relayout]))
        if len(self.grid) == 1:
            prefix = f"{next(iter(self.grid))} = "
            slider = dict(active=active, currentvalue=dict(prefix=prefix), pad=dict(t=50, l=20), steps=steps)
            fig.update_layout(sliders=[slider])
            fig.update_layout(margin=dict(b=(fig.layout.margin.b or 50) + 60))
            return fig
        return self._knob_sliders(fig, steps, settings[active])

    def _knob_sliders(self, fig: go.Figure, steps: list[dict[str, Any]], shown: Mapping[str, Any]) -> go.Figure:
        """One slider per parameter. Plotly sliders are independent, so each step only
        records its knob ("skip"); the combination's data (``steps``, in the order of
        :meth:`settings`) lives in ``layout.meta["deqlite_explorer"]``, and the book's
        script ``_static/deqlite/explorer.js`` (shipped by ``deqlite_book.sphinxext``,
        offline) applies the combination the sliders select together."""
        sliders, row = [], 90  # px per slider
        for name, values in self.grid.items():
            sliders.append(dict(
                active=list(values).index(shown[name]), currentvalue=dict(prefix=f"{name} = "),
                pad=dict(t=10, l=20, r=20), len=1.0, x=0, xanchor="left", y=0, yanchor="top",
                name=name, steps=[dict(method="skip", label=_fmt(v), args=[None]) for v in values]))
        height = fig.layout.height or 450
        n = len(sliders)
        fig.update_layout(height=height + row * n, margin=dict(b=(fig.layout.margin.b or 50) + row * n))
        # stack the sliders below the plot: y in paper units, measured from the plot's bottom
        plot_h = height - (fig.layout.margin.t or 80) - 50
        for i, sl in enumerate(sliders):
            sl["y"] = -(50 + row * i) / max(plot_h, 100)
        fig.update_layout(sliders=sliders, meta={"deqlite_explorer": {
            "sizes": [len(v) for v in self.grid.values()],
            "steps": [step["args"] for step in steps]}})
        return fig

    @staticmethod
    def _fix_axes(fig: go.Figure, figs: list[go.Figure]) -> None:
        """Set each axis range to the union of the data over all settings."""
        spans: dict[str, list[float]] = {}
        for f in figs:
            for tr in f.data:
                for letter in ("x", "y"):
                    values = getattr(tr, letter, None)
                    if values is None or not hasattr(tr, f"{letter}axis"):
                        continue
                    axis = (getattr(tr, f"{letter}axis") or letter).replace(letter, f"{letter}axis", 1)
                    try:
                        arr = np.asarray(values, dtype=float).ravel()
                    except (TypeError, ValueError):
                        continue  # categorical axis
                    log = getattr(fig.layout, axis, None) is not None and getattr(fig.layout, axis).type == "log"
                    arr = arr[np.isfinite(arr) & (arr > 0 if log else True)]
                    if arr.size == 0:
                        continue
                    if log:
                        arr = np.log10(arr)
                    lo, hi = spans.get(axis, [np.inf, -np.inf])
                    spans[axis] = [min(lo, arr.min()), max(hi, arr.max())]
        for axis, (lo, hi) in spans.items():
            pad = 0.05 * (hi - lo) if hi > lo else 0.5
            ax = getattr(fig.layout, axis, None)
            if ax is not None and ax.range is None:
                ax.range = [lo - pad, hi + pad]
                ax.autorange = False

    # ---- live front end --------------------------------------------------------------
    def widget(self) -> Any:
        """A live front end: one ipywidgets slider per parameter above a plotly FigureWidget.

        Moving a slider calls ``compute`` for the new setting and redraws. Needs a running
        kernel with widget support (Jupyter, JupyterLab, Colab with the custom widget
        manager enabled); the FigureWidget needs ``anywidget``.
        """
        import ipywidgets as widgets

        grid = self.live_grid or self.grid
        params = {name: (self.initial[name] if self.initial[name] in list(grid[name]) else list(grid[name])[0])
                  for name in self.grid}
        first = self.figure_for(**params)
        fw = go.FigureWidget(data=[_json_safe(tr.to_plotly_json()) for tr in first.data], layout=first.layout)
        self.live_figure = fw
        sliders = {
            name: widgets.SelectionSlider(
                options=[(_fmt(v), v) for v in grid[name]], value=params[name], description=name,
                continuous_update=False, layout=widgets.Layout(width="min(100%, 520px)"),
            )
            for name in self.grid
        }
        status = widgets.HTML(value="")

        def redraw(_change: Any = None) -> None:
            new = {name: s.value for name, s in sliders.items()}
            status.value = "<i>computing…</i>"
            fig = self.figure_for(**new)
            with fw.batch_update():
                if len(fig.data) == len(fw.data) and all(a.type == b.type for a, b in zip(fig.data, fw.data)):
                    for old, tr in zip(fw.data, fig.data):
                        old.update(_json_safe(tr.to_plotly_json()), overwrite=True)
                else:
                    fw.data = []
                    fw.add_traces([_json_safe(tr.to_plotly_json()) for tr in fig.data])
                fw.layout.title = fig.layout.title
                fw.layout.annotations = fig.layout.annotations  # subplot titles carry numbers too
            status.value = ""

        for s in sliders.values():
            s.observe(redraw, names="value")
        box = widgets.VBox([*sliders.values(), status, fw])
        box.sliders = sliders  # for tests and for readers who want to drive it from code
        box.figure = fw
        self.live_widget = box
        return box

    def show(self, live: bool | None = None) -> Any:
        """The live widget when ``live`` (default: :func:`want_live`), else the static figure.

        The live front end is displayed as a :class:`LiveFigure`: where the front end
        renders widgets (Jupyter, Colab with its widget manager) the sliders appear; where it
        cannot (a notebook viewer, a front end without widget support) the static figure
        appears instead, with a one-line note. When ipywidgets or anywidget is missing in
        the kernel, the static figure is returned and the note printed.
        """
        if live is None:
            live = want_live()
        if not live:
            return self.figure()
        try:
            box = self.widget()
        except ImportError as exc:  # no ipywidgets / anywidget in this kernel
            print(f"{FALLBACK_NOTE} ({exc.name or exc} is not installed)")
            return self.figure()
        return LiveFigure(box, self.figure)


FALLBACK_NOTE = "Static figure: live sliders need Jupyter widgets, which this front end cannot display."


class LiveFigure:
    """A live explorer widget that carries its static figure as the fallback representation.

    Its mime bundle holds the widget view (shown wherever widgets render) and, as
    ``text/html``, the static figure with every slider step baked in plus a one-line note
    (shown by front ends that cannot render widgets). ``.widget``, ``.sliders`` and
    ``.figure`` give the live parts.
    """

    def __init__(self, widget: Any, static: Callable[[], go.Figure]) -> None:
        self.widget = widget
        self.sliders = widget.sliders
        self.figure = widget.figure
        self._static = static

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        import plotly.io as pio

        html = pio.to_html(self._static(), include_plotlyjs="cdn", full_html=False)
        model_id = getattr(self.widget, "model_id", None) or self.widget._model_id
        return {
            "text/plain": f"{FALLBACK_NOTE}\n{self.widget!r}",
            "text/html": f"<p><i>{FALLBACK_NOTE}</i></p>{html}",
            "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0,
                                                          "model_id": model_id},
        }


def _layout_text(fig: go.Figure) -> dict[str, Any]:
    """The parts of a setting's layout that hold text computed from it: the title and the
    annotations (``make_subplots`` puts subplot titles there). A slider step sets them
    all, so every number a figure shows belongs to the slider position shown."""
    out: dict[str, Any] = {}
    if fig.layout.title.text is not None:
        out["title.text"] = fig.layout.title.text
    if fig.layout.annotations:
        out["annotations"] = [a.to_plotly_json() for a in fig.layout.annotations]
    return out


def explore(
    compute: Callable[..., Any],
    grid: Mapping[str, Sequence[Any]],
    render: Callable[[Any], go.Figure],
    **options: Any,
) -> Explorer:
    """Shorthand for ``Explorer(compute, grid, render, **options)``."""
    return Explorer(compute, grid, render, **options)
