"""Plotly figures and explorers for deqlite solver traces: one figure, two front ends.

- :func:`residual_figure`: residual per step (log scale) with a step slider;
- :func:`convergence_animation`: iterates moving in the state plane, play button + slider;
- :func:`iterate_figure`: iterate path and residual of one solve, side by side;
- :class:`Explorer` / :func:`explore`: a compute function and a grid of slider values give
  a static figure with the slider steps baked in (works in the HTML book) and a live
  ipywidgets front end that recomputes when a slider moves (Jupyter, Colab);
- chapter figures by topic: :mod:`~deqlite.viz.race_figures` (solver races),
  :mod:`~deqlite.viz.hyper_figures` (neural solvers), :mod:`~deqlite.viz.delta_figures`
  (DeltaDEQ);
- the ``"deqlite"`` plotly template (:mod:`deqlite.viz.theme`), readable in light and dark.

This subpackage imports plotly (and ipywidgets, only when a live widget is made);
``import deqlite`` alone imports neither.
"""

from .book import glue, load_record
from .explorer import LIVE_ENV, Explorer, explore, want_live
from .figures import convergence_animation, iterate_figure, residual_figure
from .theme import TEMPLATE_NAME, make_template, register, use_as_default

register()

__all__ = [
    "Explorer",
    "LIVE_ENV",
    "TEMPLATE_NAME",
    "convergence_animation",
    "explore",
    "glue",
    "iterate_figure",
    "load_record",
    "make_template",
    "register",
    "residual_figure",
    "use_as_default",
    "want_live",
]
