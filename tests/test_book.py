"""Every chapter listed in _toc.yml is a test.

For each notebook chapter (book/<name>.md paired with book/<name>.ipynb):
- the pair has not drifted, and the .ipynb carries no outputs;
- the chapter follows the format (install cell, parameters cell, asserts, glue, exercises,
  citations; see CONTRIBUTING.md);
- it runs under nbval (lax: the asserts in its cells carry the checks) within 60 s of CPU
  time on one thread (load-independent: wall time on a shared machine is not);
- it runs once more through papermill with the parameter `seed` overridden, within 60 s;
and the whole book runs under nbval within 5 minutes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

sys.path[:0] = [str(ROOT), str(ROOT / "book-tools")]
from deqlite_book.chapters import (INSTALL_CELL_TAGS, PARAMETERS_TAG, ROLE, chapters,  # noqa: E402
                                   colab_url, install_cell_source, reader_notebook)

CHAPTER_BUDGET_S = 60.0
BOOK_BUDGET_S = 300.0
CHAPTERS = chapters(ROOT)
IDS = [str(p.relative_to(ROOT).with_suffix("")) for p in CHAPTERS]
NBVAL_TIMES: dict[str, float] = {}  # chapter -> CPU seconds under nbval
CHAPTER_TIMES: dict[str, dict[str, dict[str, float]]] = {}  # chapter -> runner -> cpu/wall

pytestmark = pytest.mark.book


def _read(path: Path):
    import jupytext

    return jupytext.read(path)


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]


def _env() -> dict[str, str]:
    # one kernel, one thread (so its CPU time is the time a quiet machine would take);
    # never go live in tests
    return {**os.environ, "DEQLITE_LIVE": "0", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            "OMP_NUM_THREADS": "1"}


def _children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process, and theirs, so far.

    The budget is checked on the chapter's CPU time, not its wall time: on a shared 2-core
    machine another process can stretch the wall time of an unchanged chapter past the
    budget (a chapter once took 61.8 s of wall time under load), while its CPU time, with
    one thread, is what it costs on a quiet machine.
    """
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _record(md: Path, runner: str, cpu: float, wall: float) -> None:
    """Keep every chapter's figures for the summary and test-artifacts/chapter-times.json."""
    import json

    CHAPTER_TIMES.setdefault(md.stem, {})[runner] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / "chapter-times.json").write_text(json.dumps(CHAPTER_TIMES, indent=2) + "\n")


def test_toc_lists_chapters():
    assert CHAPTERS, "_toc.yml lists no notebook chapter (book/<name>.md with a kernelspec)"
    assert IDS[0] == "book/intro", "the introduction is the root of _toc.yml"


@pytest.mark.parametrize("md", CHAPTERS, ids=IDS)
def test_pair_in_sync(md: Path):
    ipynb = md.with_suffix(".ipynb")
    fix = "run `make sync-chapters` (or `jupytext --sync " + str(md.relative_to(ROOT)) + "`)"
    assert ipynb.is_file(), f"{ipynb.relative_to(ROOT)} is missing: {fix}"
    text_nb, ipynb_nb = _read(md), _read(ipynb)
    formats = text_nb.metadata.get("jupytext", {}).get("formats", "")
    assert set(formats.split(",")) == {"md:myst", "ipynb"}, f"jupytext formats are {formats!r}: {fix}"
    # the .ipynb's markdown is the .md's, rewritten for readers outside the book (sync_chapters.py)
    a, b = _cells(reader_notebook(text_nb, md.stem, ROOT)), _cells(ipynb_nb)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"cell {i} differs between {md.name} and {ipynb.name}: {fix}\n.md:    {x}\n.ipynb: {y}"
    assert len(a) == len(b), f"{md.name} has {len(a)} cells, {ipynb.name} {len(b)}: {fix}"
    with_outputs = [i for i, c in enumerate(ipynb_nb.cells)
                    if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not with_outputs, f"{ipynb.name} is committed with outputs in cells {with_outputs}: {fix}"


def test_notebooks_have_no_raw_myst():
    """A reader opening any book/*.ipynb (Colab, Jupyter) sees no raw MyST role or directive."""
    import nbformat

    found = []
    for ipynb in sorted((ROOT / "book").glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(ipynb, as_version=4).cells):
            if cell.cell_type != "markdown":
                continue
            hits = [m.group(0) for m in ROLE.finditer(cell.source)]
            hits += re.findall(r"^(?:`{3,}|:{3,})\{[\w:-]+\}.*$|^\([\w-]+\)=\s*$", cell.source, re.M)
            found += [f"{ipynb.name} cell {i}: {h[:60]}" for h in hits]
    assert not found, f"raw MyST in notebook markdown (run `make sync-chapters`): {found[:10]}"


@pytest.mark.parametrize("md", CHAPTERS, ids=IDS)
def test_colab_link_points_at_a_committed_notebook(md: Path):
    """The launch button's Colab link (and ours) names a .ipynb that git tracks at that path."""
    url = colab_url(md, ROOT)
    branch_path = url.split("/blob/", 1)[1]
    rel = branch_path.split("/", 1)[1]
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", rel], cwd=ROOT, capture_output=True)
    assert tracked.returncode == 0 and (ROOT / rel).is_file(), f"{url}: {rel} is not a committed file"
    html = ROOT / "_build" / "html" / md.relative_to(ROOT).with_suffix(".html")
    if html.is_file():  # the built page's launch button says the same
        links = set(re.findall(r'https://colab\.research\.google\.com/github/[^"\'\s<>]+', html.read_text(encoding="utf-8")))
        assert links == {url}, f"{html.name}: Colab links {links}, expected {url}"


@pytest.mark.parametrize("md", CHAPTERS, ids=IDS)
def test_chapter_format(md: Path):
    nb = _read(md)
    code = [c for c in nb.cells if c.cell_type == "code"]
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert code, "a chapter has code"
    first = code[0]
    assert first.source.strip() == install_cell_source(ROOT).strip(), (
        "the first code cell must be the install cell built from _config.yml: run `make sync-chapters`")
    assert set(INSTALL_CELL_TAGS) <= set(first.metadata.get("tags", [])), "tag the install cell remove-cell"
    params = [c for c in code if PARAMETERS_TAG in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one code cell tagged `parameters` (papermill) holds the sizes"
    assert re.search(r"^seed\s*=", params[0].source, re.M), "the parameters cell defines `seed`"
    assert any(re.search(r"^\s*assert\b", c.source, re.M) for c in code), "claims are checked with assert"
    assert "{glue" in prose, "numbers in the prose come from glue: {glue:text}`name`"
    assert "{exercise}" in prose and "{solution}" in prose, "end with exercises and solutions"
    assert "{cite" in prose, "cite sources from book/references.bib with {cite}`key`"
    headings = [line for line in prose.splitlines() if line.startswith("# ")]
    assert len(headings) == 1, f"one top-level title per chapter, found {headings}"


@pytest.mark.parametrize("md", CHAPTERS, ids=IDS)
def test_chapter_runs_under_nbval(md: Path, tmp_path: Path):
    ipynb = md.with_suffix(".ipynb")
    report = tmp_path / "nbval.xml"
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider",
           "--nbval-cell-timeout=120", "-o", "addopts=", f"--junit-xml={report}", str(ipynb)]
    start, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=CHAPTER_BUDGET_S * 6)
    # pytest + its kernel (reaped at shutdown): a little more than the chapter itself
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    NBVAL_TIMES[md.stem] = cpu
    _record(md, "nbval", cpu, wall)
    assert proc.returncode == 0, f"nbval failed on {ipynb.name}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert cpu < CHAPTER_BUDGET_S, (f"{ipynb.name} used {cpu:.1f} s of CPU under nbval (budget "
                                    f"{CHAPTER_BUDGET_S:.0f} s on one thread; wall {wall:.1f} s)")


@pytest.mark.parametrize("md", CHAPTERS, ids=IDS)
def test_chapter_runs_with_papermill(md: Path, tmp_path: Path, monkeypatch):
    import papermill as pm

    ipynb = md.with_suffix(".ipynb")
    declared = pm.inspect_notebook(str(ipynb))
    assert "seed" in declared, f"{ipynb.name}: the parameters cell must define `seed`"
    default = declared["seed"]["default"]
    new_seed = int(default) + 1 if str(default).lstrip("-").isdigit() else 1
    out = tmp_path / ipynb.name
    monkeypatch.setenv("DEQLITE_LIVE", "0")  # the kernel inherits it: static figures
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    start, cpu0 = time.perf_counter(), _children_cpu()
    nb = pm.execute_notebook(str(ipynb), str(out), parameters={"seed": new_seed}, kernel_name="python3",
                             cwd=str(md.parent), progress_bar=False, log_output=False)
    wall, elapsed = time.perf_counter() - start, _children_cpu() - cpu0  # the kernel's CPU time
    _record(md, "papermill", elapsed, wall)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and f"seed = {new_seed}" in injected[0].source, "papermill did not inject the parameter"
    assert elapsed < CHAPTER_BUDGET_S, (f"{ipynb.name} used {elapsed:.1f} s of CPU under papermill "
                                        f"(budget {CHAPTER_BUDGET_S:.0f} s on one thread; wall {wall:.1f} s)")


def test_whole_book_budget():
    missing = [md.stem for md in CHAPTERS if md.stem not in NBVAL_TIMES]
    if missing:
        pytest.skip(f"not every chapter ran under nbval in this session (missing {missing})")
    total = sum(NBVAL_TIMES.values())
    report = ", ".join(f"{k} {v:.1f} s" for k, v in NBVAL_TIMES.items())
    print(f"\nchapter CPU times under nbval: {report}; total {total:.1f} s "
          f"(all figures, wall and CPU: test-artifacts/chapter-times.json)")
    assert total < BOOK_BUDGET_S, f"the book took {total:.1f} s (budget {BOOK_BUDGET_S:.0f} s): {report}"


def test_budget_counts_cpu_not_waiting():
    """The budget figure ignores time a chapter spends waiting for the CPU (or sleeping) but
    counts the work of grandchildren (the kernel is a child of nbval's pytest)."""
    cpu0 = _children_cpu()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import time; time.sleep(1.5)"], check=True)
    waited, cpu_sleep = time.perf_counter() - start, _children_cpu() - cpu0
    assert waited >= 1.5 and cpu_sleep < 0.5 * waited
    burn = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'sum(i * i for i in range(10**7))'])"
    cpu0 = _children_cpu()
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert _children_cpu() - cpu0 > 0.2, "a grandchild's CPU time is counted"
