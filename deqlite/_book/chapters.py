"""The chapter contract in code: which files are chapters, and the install cell they start with.

Used by ``scripts/sync_chapters.py`` (writes the install cell, pairs .md/.ipynb) and by
``tests/test_book.py`` (checks them). The repository URL lives in ONE place:
``repository.url`` in ``_config.yml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

INSTALL_CELL_TEMPLATE = '''\
# Colab or a fresh kernel: install deqlite when it is missing; does nothing otherwise.
import importlib.util
import subprocess
import sys

REPO_URL = "{repo_url}"  # written from _config.yml by scripts/sync_chapters.py
if importlib.util.find_spec("deqlite") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"deqlite[viz] @ git+{{REPO_URL}}"], check=True)
if "google.colab" in sys.modules:  # live sliders need Colab's custom widget manager
    from google.colab import output

    output.enable_custom_widget_manager()'''

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


def install_cell_source(root: Path = ROOT) -> str:
    return INSTALL_CELL_TEMPLATE.format(repo_url=repo_url(root))


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
