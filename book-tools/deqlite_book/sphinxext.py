"""Sphinx extension for the deqlite book (listed in ``_config.yml`` under ``sphinx.extra_extensions``).

It makes the build work with no network and no CDN in the HTML:

- copies ``plotly.min.js`` from the installed ``plotly`` package into ``_static/deqlite/``
  and adds it to every page that contains a plotly figure (figures are rendered by
  :mod:`deqlite_book.plotly_mime`);
- serves MathJax 3 and require.js from files vendored in this package
  (``static/deqlite/vendor``, see VENDOR.md) instead of their CDNs;
- adds the ``deqlite-api`` directive, which documents every public module of ``deqlite``
  found on disk, so modules added later appear in the API page without editing it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

STATIC = Path(__file__).parent / "static"
PLOTLY_JS = "deqlite/plotly.min.js"
MATHJAX_JS = "deqlite/vendor/mathjax/es5/tex-chtml.js"
REQUIRE_JS = "deqlite/vendor/requirejs/require.js"
EXPLORER_JS = "deqlite/explorer.js"  # joins an Explorer's per-parameter sliders
# A page needs plotly.js when its body holds one of these (written by plotly.io.to_html).
PLOTLY_MARKERS = ("plotly-graph-div", "Plotly.newPlot")


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "//"))


def _plotly_static_dir(app: Sphinx) -> Path:
    """A build-local static folder holding plotly.min.js copied from the plotly package."""
    import plotly

    src = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not src.is_file():
        raise FileNotFoundError(
            f"plotly.min.js not found at {src}; the installed plotly ({plotly.__version__}) "
            "does not ship it. Reinstall plotly (pip install 'deqlite[book]')."
        )
    dest_root = Path(app.outdir).parent / ".deqlite_static"
    dest = dest_root / PLOTLY_JS
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists() or dest.stat().st_size != src.stat().st_size:
        shutil.copyfile(src, dest)
    return dest_root


def _config_inited(app: Sphinx, config: Config) -> None:
    config.html_static_path = [*config.html_static_path, str(STATIC), str(_plotly_static_dir(app))]
    # html.baseurl follows repository.url (GitHub Pages address) unless _config.yml sets it
    repository = (getattr(config, "html_theme_options", None) or {}).get("repository_url", "")
    if not getattr(config, "html_baseurl", "") and repository:
        from .chapters import pages_url

        config.html_baseurl = pages_url(repository)
    if not config.mathjax_path or _is_remote(config.mathjax_path):
        config.mathjax_path = MATHJAX_JS
    # myst-nb loads these on pages with embedded widget state; keep them local. The
    # widget manager (html-manager embed-amd.js) only exists on a CDN, so it is left out:
    # live widgets are for kernels, the book shows static plotly figures instead.
    if hasattr(config, "nb_ipywidgets_js"):
        config.nb_ipywidgets_js = {REQUIRE_JS: {}}


def _page_context(app: Sphinx, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    body = context.get("body") or ""
    if any(marker in body for marker in PLOTLY_MARKERS):
        # priority < 500: before require.js, so plotly.js sets window.Plotly instead of
        # registering itself as an anonymous AMD module.
        app.add_js_file(PLOTLY_JS, priority=200)
        if "deqlite_explorer" in body:  # one slider per parameter (deqlite.viz.Explorer)
            app.add_js_file(EXPLORER_JS, priority=800)


def _dedupe_assets(app: Sphinx, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Drop repeated <script>/<link> entries (Jupyter Book 1 + Sphinx 7 register some
    extension scripts twice; a repeated `const THEBE_JS_URL` is a JavaScript error)."""
    for key in ("script_files", "css_files"):
        files = context.get(key)
        if not isinstance(files, list):
            continue
        seen, unique = set(), []
        for item in files:
            attrs = getattr(item, "attributes", {}) or {}
            name = getattr(item, "filename", item) or ""  # inline scripts: None or ""
            ident = (str(name), tuple(sorted((k, str(v)) for k, v in attrs.items())))
            if ident not in seen:
                seen.add(ident)
                unique.append(item)
        files[:] = unique


def public_modules(package: str = "deqlite") -> list[str]:
    """Dotted names of the public modules of ``package`` found on disk (no import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    names: list[str] = []
    for root in map(Path, spec.submodule_search_locations):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
                if not parts:
                    continue
            if any(p.startswith("_") for p in parts):
                continue
            names.append(".".join([package, *parts]))
    return sorted(set(names))


class DeqliteApiDirective(SphinxDirective):
    """``{deqlite-api}``: one section per public module of deqlite, via autodoc."""

    has_content = False
    option_spec = {}

    def run(self) -> list[nodes.Node]:
        lines: list[str] = []
        for name in public_modules("deqlite"):
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin:
                self.env.note_dependency(spec.origin)
            lines += [
                f"``{name}``",
                "-" * (len(name) + 4),
                "",
                f".. automodule:: {name}",
                "   :members:",
                "   :show-inheritance:",
            ]
            if spec is not None and spec.submodule_search_locations is not None:
                # a package: its __all__ re-exports names documented in their own modules;
                # documenting them twice would make every reference to them ambiguous
                lines.append("   :ignore-module-all:")
            lines.append("")
        if not lines:
            return [nodes.paragraph(text="deqlite has no public modules yet.")]
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source="deqlite-api"), node)
        return node.children


# ---- references to re-exported names (deqlite.solve -> deqlite.solvers.solve) ----------------
def _real_name(target: str) -> str | None:
    """``deqlite.X`` re-exported from a submodule -> its defining ``module.qualname``."""
    import importlib

    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        return f"{module}.{qualname}" if module and qualname else None
    return None


def _missing_reference(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    domain = env.get_domain("py")
    real = None
    if target.startswith("deqlite."):
        real = _real_name(target)
    elif target and "." not in target:  # a bare name documented once in deqlite: SolverTrace
        hits = [name for name in domain.objects if name.startswith("deqlite.") and name.endswith("." + target)]
        real = hits[0] if len(hits) == 1 else None
    if not real or real == target or real not in domain.objects:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, "obj", real, node, contnode)


# ---- docstring problems: fatal under -W; DEQLITE_LENIENT_DOCSTRINGS=1 only reports them ------
class _DocstringWarningFilter:
    """With DEQLITE_LENIENT_DOCSTRINGS=1 (for drafting a module), keep warnings raised inside
    deqlite docstrings (API page) from failing a -W build. They are still printed (as
    "deqlite-api docstring: ...") and counted at the end. By default they are errors.
    """

    def __init__(self) -> None:
        self.seen: list[str] = []

    def filter(self, record: Any) -> bool:
        import logging
        import sys

        if record.levelno < logging.WARNING:
            return True
        location = getattr(record, "location", None)
        if location is not None and not isinstance(location, (str, tuple)):
            from sphinx.util.logging import get_node_location

            location = get_node_location(location)
        text = ":".join(map(str, location)) if isinstance(location, tuple) else str(location or "")
        if "docstring of" not in text and "deqlite-api" not in text:
            return True
        message = f"{text}: {record.getMessage()}"
        self.seen.append(message)
        print(f"deqlite-api docstring (not fatal): {message}", file=sys.stderr)
        return False


_DOCSTRING_FILTER = _DocstringWarningFilter()


def _install_docstring_filter(app: Sphinx) -> None:
    import logging
    import os

    from sphinx.util.logging import NAMESPACE, WarningStreamHandler

    if os.environ.get("DEQLITE_LENIENT_DOCSTRINGS", "").lower() not in ("1", "true", "yes"):
        return
    for handler in logging.getLogger(NAMESPACE).handlers:
        if isinstance(handler, WarningStreamHandler) and _DOCSTRING_FILTER not in handler.filters:
            handler.filters.insert(0, _DOCSTRING_FILTER)


def _report_docstrings(app: Sphinx, exception: Exception | None) -> None:
    if _DOCSTRING_FILTER.seen:
        import sys

        print(f"deqlite-api: {len(_DOCSTRING_FILTER.seen)} docstring problem(s) reported above "
              "(not fatal because DEQLITE_LENIENT_DOCSTRINGS=1)", file=sys.stderr)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("config-inited", _config_inited, priority=900)
    app.connect("builder-inited", _install_docstring_filter)
    app.connect("missing-reference", _missing_reference)
    app.connect("build-finished", _report_docstrings)
    app.connect("html-page-context", _page_context)
    app.connect("html-page-context", _dedupe_assets, priority=100)
    app.add_directive("deqlite-api", DeqliteApiDirective)
    app.add_css_file("deqlite/deqlite.css")
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
