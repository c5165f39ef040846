"""deqlite.viz (figures, explorer, template) and the book machinery in deqlite_book."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import deqlite
from conftest import ROOT

W = torch.tensor([[0.0, -1.0], [1.0, 0.0]])


def two_neuron(s: float):
    return lambda z: torch.tanh(s * z @ W.T + torch.tensor([[0.3, 0.1]]))


def run(s: float, **kw):
    torch.manual_seed(0)
    return deqlite.solve(two_neuron(s), torch.randn(3, 2), solver="picard", tol=1e-6, max_iter=40,
                         return_iterates=True, on_failure="ignore", **kw)[1]


def test_import_deqlite_does_not_import_plotly_or_ipywidgets():
    code = ("import sys, deqlite; bad = [m for m in ('plotly', 'ipywidgets', 'anywidget') if m in sys.modules];"
            "assert not bad, bad; import deqlite.viz; assert 'plotly' in sys.modules;"
            "assert 'ipywidgets' not in sys.modules, 'viz imports ipywidgets only for live widgets'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_residual_figure_log_scale_and_slider_restyles_data():
    import deqlite.viz as viz

    traces = {"s=0.5": run(0.5), "s=2": run(2.0)}
    fig = viz.residual_figure(traces)
    assert fig.layout.yaxis.type == "log"
    assert len(fig.data) == 4  # faint full curve + bold curve per trace
    steps = fig.layout.sliders[0].steps
    first, last = steps[0].args[0], steps[-1].args[0]
    assert len(first["x"][0]) == 1 and len(last["x"][1]) == traces["s=2"].n_steps
    assert first["y"] != last["y"], "moving the slider changes the plotted data"
    # no padding: each curve has exactly the steps its trace took
    assert len(fig.data[0].x) == traces["s=0.5"].n_steps
    json.dumps(fig.to_plotly_json(), cls=__import__("plotly").utils.PlotlyJSONEncoder)


def test_residual_figure_accepts_to_dict_and_lists():
    import deqlite.viz as viz

    tr = run(0.5)
    fig = viz.residual_figure([tr.to_dict(), tr], kind="abs", reduce=0)
    assert len(fig.data) == 4
    with pytest.raises(ValueError, match="kind must be one of"):
        viz.residual_figure(tr, kind="bogus")
    with pytest.raises(ValueError, match="reduce must be"):
        viz.residual_figure(tr, reduce="bogus")


def test_convergence_animation_has_frames_and_play_button():
    import deqlite.viz as viz

    tr = run(0.5)
    fig = viz.convergence_animation(tr)
    assert len(fig.frames) == tr.n_steps
    assert fig.layout.updatemenus[0].buttons[0].method == "animate"
    assert len(fig.frames[-1].data[0].x) == tr.n_steps
    with pytest.raises(ValueError, match="return_iterates=True"):
        viz.convergence_animation(deqlite.solve(two_neuron(0.5), torch.zeros(1, 2))[1])
    with pytest.raises(ValueError, match="dims="):
        viz.convergence_animation(tr, dims=(0, 5))


def test_explorer_static_figure_bakes_every_setting():
    import deqlite.viz as viz

    scales = [0.5, 1.0, 2.0]
    ex = viz.Explorer(run, {"s": scales}, viz.iterate_figure, initial={"s": 1.0}, title="s = {s}")
    fig = ex.figure()
    slider = fig.layout.sliders[0]
    assert [st.label for st in slider.steps] == ["0.5", "1", "2"]
    assert slider.active == 1
    ys = [json.dumps(st.args[0]["y"], default=lambda a: np.asarray(a).tolist()) for st in slider.steps]
    assert len(set(ys)) == 3, "each slider step carries its own data"
    assert slider.steps[2].args[1]["title.text"] == "s = 2.0"
    assert fig.layout.yaxis2.range is not None, "axes fixed across settings"


def test_explorer_rejects_bad_input():
    import deqlite.viz as viz

    with pytest.raises(ValueError, match="grid is empty"):
        viz.Explorer(run, {}, viz.iterate_figure)
    with pytest.raises(ValueError, match="not in grid"):
        viz.Explorer(run, {"s": [1.0]}, viz.iterate_figure, initial={"t": 1})
    import plotly.graph_objects as go

    ex = viz.Explorer(lambda n: n, {"n": [1, 2]}, lambda n: go.Figure([go.Scatter(y=[0])] * n))
    with pytest.raises(ValueError, match="same traces"):
        ex.figure()


def test_explorer_live_widget_recomputes_on_slider_move():
    pytest.importorskip("ipywidgets")
    pytest.importorskip("anywidget")
    import deqlite.viz as viz

    calls = []

    def compute(s):
        calls.append(s)
        return run(s)

    ex = viz.Explorer(compute, {"s": [0.5, 2.0]}, viz.iterate_figure, live_grid={"s": [0.5, 0.75, 2.0]})
    box = ex.widget()
    before = list(box.figure.data[3].y)
    box.sliders["s"].value = 0.75  # a value only the live grid has: computed on demand
    assert calls[-1] == 0.75
    assert list(box.figure.data[3].y) != before


def test_show_picks_front_end(monkeypatch):
    import deqlite.viz as viz

    monkeypatch.setenv(viz.LIVE_ENV, "0")
    assert not viz.want_live()
    monkeypatch.setenv(viz.LIVE_ENV, "1")
    assert viz.want_live()


def test_template_is_transparent_and_registered():
    import plotly.io as pio

    import deqlite.viz as viz

    assert viz.TEMPLATE_NAME in pio.templates
    layout = pio.templates[viz.TEMPLATE_NAME].layout
    assert layout.paper_bgcolor == "rgba(0,0,0,0)" and layout.plot_bgcolor == "rgba(0,0,0,0)"


def test_glue_converts_scalars():
    from deqlite.viz import glue

    assert glue("x", np.float64(0.5)) == 0.5 and type(glue("x", torch.tensor(3))) is int


def test_plotly_mime_renderer_emits_html_without_plotlyjs():
    import plotly.graph_objects as go

    from deqlite_book.plotly_mime import PLOTLY_MIME, PlotlyMimeRenderer

    class Data:
        mime_type = PLOTLY_MIME
        content = go.Figure(go.Scatter(y=[1, 2])).to_plotly_json()

    nodes = PlotlyMimeRenderer.handle_mime(None, Data, False)
    html = nodes[0].astext()
    assert "Plotly.newPlot" in html and "cdn" not in html.lower() and "<script src" not in html


def test_api_page_lists_public_modules():
    from deqlite_book.sphinxext import public_modules

    mods = public_modules("deqlite")
    assert "deqlite.solvers" in mods and "deqlite.viz" in mods
    assert not any(part.startswith("_") for m in mods for part in m.split("."))


def test_mime_renderer_entry_point_registered():
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="myst_nb.mime_renderers")}
    assert "deqlite_book.plotly_mime:PlotlyMimeRenderer" in names, "pip install -e ./book-tools (make setup) registers it"


def test_live_widget_sends_no_nan():
    """NaN cannot travel in a widget's JSON message (it printed a warning above the delta explorer)."""
    pytest.importorskip("ipywidgets")
    pytest.importorskip("anywidget")
    import json

    import plotly.graph_objects as go

    import deqlite.viz as viz

    def render(k):
        z = np.full((3, 4), np.nan)
        z[:k] = 0.5
        return go.Figure(go.Heatmap(z=z))

    box = viz.Explorer(lambda k: k, {"k": [1, 2]}, render).widget()
    for k in (1, 2):
        box.sliders["k"].value = k
        z = box.figure.data[0].z
        json.dumps(z, allow_nan=False)  # raises ValueError on NaN
        assert z[0][0] == 0.5 and z[-1][-1] is None, "NaN becomes a gap (None), finite values stay"


def test_show_live_falls_back_to_static(monkeypatch, capsys):
    pytest.importorskip("ipywidgets")
    pytest.importorskip("anywidget")
    import sys

    import plotly.graph_objects as go

    import deqlite.viz as viz
    from deqlite.viz.explorer import FALLBACK_NOTE, LiveFigure

    ex = viz.Explorer(lambda s: s, {"s": [1.0, 2.0]}, lambda s: go.Figure(go.Scatter(y=[0, s])))
    live = ex.show(live=True)
    assert isinstance(live, LiveFigure)
    bundle = live._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == live.widget.model_id
    assert FALLBACK_NOTE in bundle["text/html"] and "plotly-graph-div" in bundle["text/html"], \
        "front ends without widgets show the static figure with a one-line note"
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # a kernel without ipywidgets
    static = ex.show(live=True)
    assert isinstance(static, go.Figure) and len(static.layout.sliders[0].steps) == 2
    assert FALLBACK_NOTE in capsys.readouterr().out


def test_explorer_subplot_titles_follow_the_slider():
    """Regression: subplot titles (layout annotations) were baked in for the initial setting
    only, so the delta chapter showed threshold-0 numbers at every threshold."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from deqlite.viz import Explorer

    def render(a):
        fig = make_subplots(rows=1, cols=2, subplot_titles=(f"{a:.1f} dB", f"{10 * a:.0f}% saved"))
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, a]), 1, 1)
        fig.add_trace(go.Scatter(x=[0, 1], y=[a, 0]), 1, 2)
        return fig

    ex = Explorer(lambda a: a, {"a": [1.0, 2.0, 3.0]}, render)
    steps = ex.figure().layout.sliders[0].steps
    for step, a in zip(steps, [1.0, 2.0, 3.0]):
        texts = [ann["text"] for ann in step.args[1]["annotations"]]
        assert texts == [f"{a:.1f} dB", f"{10 * a:.0f}% saved"]
    box = ex.widget()
    box.sliders["a"].value = 3.0
    assert [ann.text for ann in box.figure.layout.annotations] == ["3.0 dB", "30% saved"]
