"""Book machinery for the deqlite book (not part of the library API).

- :mod:`deqlite_book.sphinxext` -- Sphinx extension: ships plotly.min.js, MathJax and
  require.js locally (no CDN), and provides the ``deqlite-api`` directive.
- :mod:`deqlite_book.plotly_mime` -- myst-nb mime renderer for plotly figures
  (registered through the ``myst_nb.mime_renderers`` entry point in pyproject.toml).

Nothing here is imported by ``import deqlite``.
"""
