#!/usr/bin/env python
"""Keep every chapter in _toc.yml in the chapter format (see CONTRIBUTING.md).

For each notebook chapter (a MyST .md with a kernelspec):
  1. set its first code cell to the install cell built from repository.url in _config.yml
     (tagged remove-cell), inserting it when missing;
  2. pair it with jupytext (formats md:myst,ipynb) and write the .ipynb WITHOUT outputs,
     its markdown rewritten for readers outside the book (no raw MyST roles: citations,
     cross-references and glued numbers become links into the online book; see
     deqlite_book.chapters.ReaderMarkdown). This script is the one place that writes both.

Usage:  python scripts/sync_chapters.py [book/foo.md ...]   (default: every chapter in _toc.yml)
        python scripts/sync_chapters.py --check               (exit 1 if anything would change)
"""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "book-tools")]

from deqlite_book.chapters import (INSTALL_CELL_MARKER, INSTALL_CELL_TAGS, chapters,  # noqa: E402
                                   install_cell_source, reader_notebook)


def synced(md: Path) -> tuple[nbformat.NotebookNode, str, str]:
    nb = jupytext.read(md)
    nb.metadata.setdefault("jupytext", {})["formats"] = "md:myst,ipynb"
    source = install_cell_source(ROOT)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    if code and INSTALL_CELL_MARKER in nb.cells[code[0]].source:
        cell = nb.cells[code[0]]
        cell.source = source
    else:
        cell = nbformat.v4.new_code_cell(source)
        nb.cells.insert(0, cell)
    cell.metadata["tags"] = list(dict.fromkeys([*cell.metadata.get("tags", []), *INSTALL_CELL_TAGS]))
    md_text = jupytext.writes(nb, fmt="md:myst")
    paired = md.with_suffix(".ipynb")
    nb = reader_notebook(nb, md.stem, ROOT)
    if paired.exists():  # keep the cell ids of the committed .ipynb (stable diffs)
        old = jupytext.read(paired)
        if [c.cell_type for c in old.cells] == [c.cell_type for c in nb.cells]:
            for new_cell, old_cell in zip(nb.cells, old.cells):
                if "id" in old_cell:
                    new_cell["id"] = old_cell["id"]
    for c in nb.cells:  # committed notebooks carry no outputs
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    ipynb = jupytext.writes(nb, fmt="ipynb")
    return nb, md_text, ipynb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [Path(a).resolve() for a in argv if not a.startswith("--")] or chapters(ROOT)
    stale = []
    for md in paths:
        _, md_text, ipynb_text = synced(md)
        ipynb = md.with_suffix(".ipynb")
        for path, text in ((md, md_text), (ipynb, ipynb_text)):
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.relative_to(ROOT))
                if not check:
                    path.write_text(text, encoding="utf-8")
    verb = "out of date" if check else "updated"
    for path in stale:
        print(f"{verb}: {path}")
    if not stale:
        print(f"{len(paths)} chapter(s) in sync")
    return 1 if (check and stale) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
