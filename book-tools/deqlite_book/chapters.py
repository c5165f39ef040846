"""The chapter contract in code: which files are chapters, and the install cell they start with.

Used by ``scripts/sync_chapters.py`` (writes the install cell, pairs .md/.ipynb) and by
``tests/test_book.py`` (checks them). The repository URL lives in ONE place:
``repository.url`` in ``_config.yml``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# The first code cell of every chapter (tagged remove-cell). It installs what the chapters
# import (the viz and data extras), pins the released deqlite (git tag v<version>, the
# version in deqlite/__init__.py), never touches torch (Colab's own torch satisfies
# deqlite's range), and takes an override of the package spec: DEQLITE_SPEC (tests install
# a local wheel with it, tests/test_colab.py).
INSTALL_CELL_TEMPLATE = """\
# Colab or a fresh kernel: install deqlite when it is missing; does nothing otherwise.
import importlib.util
import os
import subprocess
import sys

REPO_URL = "{repo_url}"  # written from _config.yml by scripts/sync_chapters.py
VERSION = "{version}"  # the release this chapter was written for (git tag v{version})
SPEC = os.environ.get("DEQLITE_SPEC", f"deqlite[viz,data] @ git+{{REPO_URL}}@v{{VERSION}}")
if importlib.util.find_spec("deqlite") is None:  # torch is left as it is
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", SPEC], check=True)
if "google.colab" in sys.modules:  # live sliders need Colab's custom widget manager
    from google.colab import output

    output.enable_custom_widget_manager()"""

INSTALL_CELL_MARKER = 'importlib.util.find_spec("deqlite")'
INSTALL_CELL_TAGS = ["remove-cell"]
PARAMETERS_TAG = "parameters"


def _yaml(path: Path) -> Any:
    import yaml

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def repo_url(root: Path = ROOT) -> str:
    """``repository.url`` from ``_config.yml``."""
    url = (_yaml(root / "_config.yml").get("repository") or {}).get("url")
    if not url:
        raise ValueError("_config.yml has no repository.url; set it to the repository's https URL")
    return str(url).rstrip("/")


def repo_branch(root: Path = ROOT) -> str:
    return str((_yaml(root / "_config.yml").get("repository") or {}).get("branch") or "main")


def pages_url(repository: str) -> str:
    """The GitHub Pages address of a ``https://github.com/<owner>/<name>`` repository."""
    m = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?", repository)
    if not m:
        raise ValueError(f"repository.url is {repository!r}; expected https://github.com/<owner>/<name> "
                         "(the book is published with GitHub Pages)")
    owner, name = m.groups()
    if name.lower() == f"{owner.lower()}.github.io":
        return f"https://{name.lower()}/"
    return f"https://{owner.lower()}.github.io/{name}/"


def package_version(root: Path = ROOT) -> str:
    """``__version__`` in ``deqlite/__init__.py`` (the one place the version is written)."""
    tree = ast.parse((root / "deqlite" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(node.value.value)
    raise ValueError("deqlite/__init__.py defines no __version__ = \"x.y.z\"")


def install_cell_source(root: Path = ROOT) -> str:
    return INSTALL_CELL_TEMPLATE.format(repo_url=repo_url(root), version=package_version(root))


def colab_url(md: Path, root: Path = ROOT) -> str:
    """The Colab address of a chapter's paired notebook (what the book's launch button links)."""
    owner_name = repo_url(root).split("github.com/", 1)[-1]
    rel = md.with_suffix(".ipynb").resolve().relative_to(root.resolve()).as_posix()
    return f"https://colab.research.google.com/github/{owner_name}/blob/{repo_branch(root)}/{rel}"


# ---- what a Colab / Jupyter reader sees: MyST roles -> plain Markdown ----------------------
ROLE = re.compile(r"\{([A-Za-z][\w:.-]*)\}`([^`]*)`")
DIRECTIVE = re.compile(r"^(?P<fence>`{3,}|:{3,})\{(?P<name>[\w:-]+)\}[ \t]*(?P<arg>.*)$")


class ReaderMarkdown:
    """Rewrites a chapter's markdown for readers of the ``.ipynb`` (Colab, Jupyter).

    Citations become author-year text linked to the online references page, ``{doc}`` and
    ``{ref}`` cross-references become links into the online book, ``{glue:text}`` numbers
    become a link to the online page that shows them (the notebook computes the value in
    the cell above), exercises become bold headings and solutions collapsible ``<details>``.
    """

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.base = pages_url(repo_url(root))
        self._bib: dict[str, str] | None = None
        self._labels: dict[str, tuple[str, str]] | None = None

    # -- sources ---------------------------------------------------------------------------
    def bib(self) -> dict[str, str]:
        if self._bib is None:
            from pybtex.database import parse_file

            self._bib = {}
            for path in (self.root / "book").glob("*.bib"):
                for key, entry in parse_file(str(path)).entries.items():
                    people = entry.persons.get("author") or entry.persons.get("editor") or []
                    names = [" ".join(p.prelast_names + p.last_names).replace("{", "").replace("}", "")
                             for p in people]
                    who = (names[0] if len(names) == 1 else f"{names[0]} and {names[1]}" if len(names) == 2
                           else f"{names[0]} et al." if names else key)
                    self._bib[key] = f"{who} {entry.fields.get('year', 'n.d.')}"
        return self._bib

    def labels(self) -> dict[str, tuple[str, str]]:
        """``{label: (page, text)}`` for ``(label)=`` targets and ``:label:`` options in book/*.md."""
        if self._labels is None:
            self._labels = {}
            for md in sorted((self.root / "book").glob("*.md")):
                lines = md.read_text(encoding="utf-8").splitlines()
                for i, line in enumerate(lines):
                    eq = re.search(r"\$\$\s*\(([\w-]+)\)\s*$", line)  # a labelled equation: $$ (name)
                    if eq:
                        self._labels[eq.group(1)] = (md.stem, "the equation")
                        continue
                    fig = re.fullmatch(r"\s+name:\s*(fig-[\w-]+)\s*", line)  # mystnb figure: name:
                    if fig:
                        self._labels[fig.group(1)] = (md.stem, "the figure")
                        continue
                    m = re.fullmatch(r"\(([\w-]+)\)=\s*", line) or re.fullmatch(r":label:\s*([\w-]+)\s*", line)
                    if m:
                        nxt = next((x for x in lines[i + 1:] if x.strip()), "")
                        text = nxt.lstrip("#").strip() if nxt.startswith("#") else m.group(1)
                        self._labels[m.group(1)] = (md.stem, text)
        return self._labels

    def title(self, page: str) -> str:
        path = self.root / "book" / f"{page}.md"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
        return page

    def page_url(self, page: str, anchor: str = "") -> str:
        return f"{self.base}book/{page}.html" + (f"#{anchor}" if anchor else "")

    # -- roles -------------------------------------------------------------------------------
    def role(self, name: str, content: str, page: str) -> str:
        text, target = content, content
        m = re.fullmatch(r"(.*?)\s*<([^>]+)>", content, re.S)
        if m:
            text, target = m.group(1), m.group(2)
        if name.startswith("cite"):
            keys = [k.strip() for k in content.split(",") if k.strip()]
            unknown = [k for k in keys if k not in self.bib()]
            if unknown:
                raise ValueError(f"{page}.md cites {unknown}, not in book/*.bib; add the entries or fix the keys")
            refs = "; ".join(self.bib()[k] for k in keys)
            return f"([{refs}]({self.page_url('references')}))"
        if name == "doc":
            target = target.removesuffix(".md").removesuffix(".ipynb")
            return f"[{text if m else self.title(target)}]({self.page_url(target)})"
        if name in ("ref", "numref", "eq"):
            where = self.labels().get(target)
            if where is None:
                raise ValueError(f"{page}.md refers to label {target!r}, defined nowhere in book/*.md")
            return f"[{text if m else where[1]}]({self.page_url(where[0], target)})"
        if name.startswith("glue"):
            key = content.split(":", 1)[0].strip()
            return f"[`{key}`]({self.page_url(page)} \"computed by this notebook; the online book shows the value\")"
        if name == "math":
            return f"${content}$"
        # any other role (py:func, term, abbr, ...): its text as code
        return f"`{text}`"

    def __call__(self, source: str, page: str) -> str:
        out: list[str] = []
        stack: list[tuple[str, str]] = []  # open directive fences: (fence, closing html)
        in_options = False  # just after a directive's opening line: skip its :option: lines
        for line in source.splitlines():
            if in_options and re.fullmatch(r":[\w-]+:.*", line.strip()):
                continue
            in_options = False
            m = DIRECTIVE.match(line)
            if m and m.group("name") != "code-cell":
                name, arg = m.group("name"), m.group("arg").strip()
                if name == "solution":
                    out += ["<details><summary>Solution</summary>", ""]
                    stack.append((m.group("fence"), "</details>"))
                else:  # exercise, note, ...: a bold heading, then the body as it is
                    out.append(f"**{name.capitalize()}{': ' + arg if arg and name != 'exercise' else ''}**")
                    stack.append((m.group("fence"), ""))
                in_options = True
                continue
            if stack and line.strip() == stack[-1][0]:
                closing = stack.pop()[1]
                if closing:
                    out += ["", closing]
                continue
            if re.fullmatch(r"\([\w-]+\)=\s*", line):
                continue  # a MyST target: links go to the online page instead
            out.append(ROLE.sub(lambda r: self.role(r.group(1), r.group(2), page), line))
        return "\n".join(out)


def reader_notebook(nb: Any, page: str, root: Path = ROOT) -> Any:
    """A copy of ``nb`` whose markdown cells read cleanly outside the book (see ReaderMarkdown)."""
    import copy

    rewrite = ReaderMarkdown(root)
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = rewrite(cell.source, page)
    return nb


def toc_files(root: Path = ROOT) -> list[str]:
    """Every ``file:`` entry of ``_toc.yml`` (root first), in reading order, without extension."""
    toc = _yaml(root / "_toc.yml")
    out: list[str] = [toc["root"]]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node and node is not toc:
                out.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(toc)
    return [str(Path(f).with_suffix("")) if Path(f).suffix in (".md", ".ipynb") else f for f in out]


def is_notebook_md(path: Path) -> bool:
    """A MyST markdown file that jupytext/myst-nb treat as a notebook (has a kernelspec)."""
    if not path.is_file():
        return False
    head = path.read_text(encoding="utf-8").split("\n---", 2)[0]
    return path.read_text(encoding="utf-8").startswith("---") and "kernelspec" in head


def chapters(root: Path = ROOT) -> list[Path]:
    """The notebook chapters listed in ``_toc.yml``: their ``.md`` sources, in reading order."""
    found = []
    for name in toc_files(root):
        md = root / f"{name}.md"
        if is_notebook_md(md):
            found.append(md)
    return found
