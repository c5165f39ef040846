"""The Colab path, proven offline on Colab's own package versions.

1. A Python 3.13 virtual environment holds Colab's versions (tests/colab-constraints.txt)
   of what the book and its install cell touch; torch is PyPI's 2.11.0 wheel (a CUDA build
   with its nvidia-* libraries, about 4.7 GB; it runs on CPU): Colab's own 2.11.0+cpu comes
   from PyTorch's index, which is not reachable offline (the one deviation, see the file).
2. deqlite's wheel is built from this checkout.
3. Each chapter runs top to bottom in a fresh kernel of that environment, as a Colab reader
   runs it: deqlite is uninstalled first, so the chapter's own install cell installs it
   (``DEQLITE_SPEC`` points the cell at the local wheel instead of the release tag).
4. After every install, ``pip freeze`` must show each of Colab's packages at its version:
   pip changed none of them (no runtime restart in Colab).
5. With ``DEQLITE_LIVE=1`` every explorer is built live under ipywidgets 7.7.1; a probe
   cell then moves one slider of each and checks the FigureWidget redrew; no cell writes to
   stderr (no warning above a widget).

The base environment is cached in ``_build/colab-venv-<key>`` (key: the constraints file,
the base package list and this file's set-up code); it is re-used only while its
``pip freeze`` equals the snapshot taken when it was built, else it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

sys.path[:0] = [str(ROOT), str(ROOT / "book-tools")]
from deqlite_book.chapters import INSTALL_CELL_MARKER, chapters  # noqa: E402

pytestmark = [pytest.mark.colab, pytest.mark.slow]

CONSTRAINTS = ROOT / "tests" / "colab-constraints.txt"
TORCH = "torch==2.11.0"
# Colab packages installed (at Colab's versions) before any chapter runs: what the chapters
# import, the kernel that runs them, and nbclient to drive it.
BASE = ["numpy", "scipy", "plotly", "ipywidgets", "anywidget", "ipykernel", "ipython", "scikit-learn",
        "scikit-image", "jupytext", "nbclient", "nbformat", "filelock", "typing_extensions", "sympy",
        "networkx", "Jinja2", "fsspec", "setuptools"]
PY313 = shutil.which("python3.13")
SETUP_VERSION = "3"  # bump when the set-up below changes (invalidates the cached venv)

PROBE = r'''
import gc, json, warnings
import ipywidgets, plotly
from deqlite.viz.explorer import Explorer
with warnings.catch_warnings():  # scanning every object touches deprecated torch aliases
    warnings.simplefilter("ignore")
    explorers = [o for o in gc.get_objects() if isinstance(o, Explorer) and o.live_widget is not None]
probe = []
for ex in explorers:
    box = ex.live_widget
    name, slider = next(iter(box.sliders.items()))
    values = list(getattr(slider, "_options_values", None) or [v for _, v in slider.options])
    new = next(v for v in reversed(values) if v != slider.value)
    before = json.dumps([tr.to_plotly_json() for tr in box.figure.data], default=str)
    slider.value = new
    after = json.dumps([tr.to_plotly_json() for tr in box.figure.data], default=str)
    probe.append({"param": name, "to": repr(new), "redrew": before != after})
print("COLAB-PROBE " + json.dumps({"ipywidgets": ipywidgets.__version__, "plotly": plotly.__version__,
                                   "explorers": probe}))
'''

DRIVER = r'''
import json, sys, time
import nbformat
from nbclient import NotebookClient
path, out, probe = sys.argv[1], sys.argv[2], sys.argv[3]
nb = nbformat.read(path, as_version=4)
nb.cells.append(nbformat.v4.new_code_cell(open(probe).read()))
start = time.perf_counter()
# the kernel starts in this script's working directory, outside the repository, as a Colab
# kernel starts in /content: a chapter cannot lean on files of the checkout
NotebookClient(nb, timeout=600, kernel_name="python3",
               resources={"metadata": {"path": str(__import__("pathlib").Path.cwd())}}).execute()
elapsed = time.perf_counter() - start
stderr, widgets, probe_out = [], 0, None
for i, cell in enumerate(nb.cells):
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream" and o.get("name") == "stderr":
            stderr.append((i, o["text"][:500]))
        data = o.get("data", {})
        widgets += "application/vnd.jupyter.widget-view+json" in data
        if o.get("output_type") == "stream" and "COLAB-PROBE " in o.get("text", ""):
            probe_out = json.loads(o["text"].split("COLAB-PROBE ", 1)[1])
json.dump({"seconds": elapsed, "stderr": stderr, "widget_outputs": widgets, "probe": probe_out}, open(out, "w"))
'''


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _freeze(py: Path) -> dict[str, str]:
    out = _run([str(py), "-m", "pip", "freeze", "--all"]).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.lower().replace("_", "-")] = version
        elif " @ " in line:
            name, url = line.split(" @ ", 1)
            pins[name.lower().replace("_", "-")] = url
    return pins


def _is_cuda(name: str) -> bool:
    return name.lower().startswith(("nvidia-", "cuda-", "triton"))


def _colab_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _base_venv() -> Path:
    key = hashlib.sha256((CONSTRAINTS.read_text() + " ".join(BASE) + TORCH + SETUP_VERSION).encode()).hexdigest()[:12]
    venv = ROOT / "_build" / f"colab-venv-{key}"
    py = venv / "bin" / "python"
    snapshot = venv / ".colab-freeze.json"
    if snapshot.is_file():
        _run([str(py), "-m", "pip", "uninstall", "-y", "-q", "deqlite"])  # left by an interrupted run
        if _freeze(py) == json.loads(snapshot.read_text()):
            return venv
    shutil.rmtree(venv, ignore_errors=True)
    for old in (ROOT / "_build").glob("colab-venv-*"):  # other keys: stale
        shutil.rmtree(old, ignore_errors=True)
    env = {**os.environ, "PYENV_VERSION": os.environ.get("PYENV_VERSION", "3.13.0")}
    _run([PY313, "-m", "venv", str(venv)], env=env)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch's CUDA libraries are part of the deviation: Colab's CPU runtime pins one of them
    # (nvidia-nccl-cu13) at a version PyPI's torch 2.11.0 does not accept, so they are not
    # constrained; every other package is.
    cpu_only = venv / "constraints-without-cuda.txt"
    cpu_only.write_text("\n".join(line for line in CONSTRAINTS.read_text().splitlines() if not _is_cuda(line)))
    _run([*pip, "-c", str(cpu_only), "pip"])  # Colab's pip (the venv comes with another)
    _run([*pip, "-c", str(cpu_only), TORCH, *BASE], timeout=3600)
    check = _run([str(py), "-c", "import torch; x = torch.randn(3, 3); "
                  "print(torch.__version__.split('+')[0], torch.cuda.is_available(), bool(torch.isfinite(x @ x).all()))"])
    assert check.stdout.split()[:3] == ["2.11.0", "False", "True"], f"torch in the Colab venv: {check.stdout}"
    snapshot.write_text(json.dumps(_freeze(py)))
    return venv


@pytest.fixture(scope="module")
def colab() -> dict:
    if PY313 is None:
        pytest.skip("python3.13 is not on PATH (Colab's Python); install it (e.g. pyenv install 3.13.0) to run this")
    pytest.importorskip("build", reason="the `build` package is in the test extra")
    t0 = time.perf_counter()
    venv = _base_venv()
    t_venv = time.perf_counter() - t0
    dist = ROOT / "_build" / "colab-dist"
    shutil.rmtree(dist, ignore_errors=True)
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)])
    wheel = next(dist.glob("deqlite-*.whl"))
    return {"venv": venv, "py": venv / "bin" / "python", "wheel": wheel, "t_venv": t_venv,
            "base": json.loads((venv / ".colab-freeze.json").read_text())}


def test_colab_environment_matches_constraints(colab):
    pins = _colab_pins()
    base = {name: v.split("+")[0] for name, v in colab["base"].items()}  # torch 2.11.0+cu130: see the header
    differ = {name: (base[name], pins[name]) for name in base
              if name in pins and base[name] != pins[name] and not _is_cuda(name)}
    assert not differ, f"the Colab venv differs from Colab's versions (installed, Colab): {differ}"
    for name in ("torch", "numpy", "plotly", "ipywidgets", "anywidget", "ipykernel", "scikit-learn", "scikit-image"):
        assert base.get(name) == pins[name], f"{name}: venv has {base.get(name)}, Colab {pins[name]}"


@pytest.mark.parametrize("md", chapters(ROOT), ids=[p.stem for p in chapters(ROOT)])
def test_chapter_on_colab_versions(colab, md: Path, tmp_path: Path):
    import nbformat

    ipynb = md.with_suffix(".ipynb")
    first = next(c for c in nbformat.read(ipynb, as_version=4).cells if c.cell_type == "code")
    assert INSTALL_CELL_MARKER in first.source, f"{ipynb.name}: the first code cell is not the install cell"
    py = colab["py"]
    _run([str(py), "-m", "pip", "uninstall", "-y", "-q", "deqlite"])  # a fresh Colab runtime
    env = {**os.environ, "DEQLITE_SPEC": f"deqlite[viz,data] @ {colab['wheel'].as_uri()}", "DEQLITE_LIVE": "1",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1", "PATH": f"{py.parent}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "driver.py").write_text(DRIVER)
    report = tmp_path / "report.json"
    start = time.perf_counter()
    _run([str(py), str(tmp_path / "driver.py"), str(ipynb), str(report), str(tmp_path / "probe.py")],
         env=env, cwd=tmp_path, timeout=900)
    wall = time.perf_counter() - start
    result = json.loads(report.read_text())
    after = _freeze(py)
    changed = {name: (version, after.get(name)) for name, version in colab["base"].items() if after.get(name) != version}
    assert not changed, f"the install cell changed Colab's packages (before, after): {changed}"
    assert "deqlite" in after, "the install cell did not install deqlite"
    probe = result["probe"]
    print(f"\n{md.stem}: ran in {wall:.1f} s (nbclient {result['seconds']:.1f} s, venv set-up "
          f"{colab['t_venv']:.1f} s); ipywidgets {probe['ipywidgets']}, plotly {probe['plotly']}; "
          f"explorers {probe['explorers']}")
    assert probe["ipywidgets"] == "7.7.1"
    assert not result["stderr"], f"{ipynb.name} wrote to stderr (a warning above a widget?): {result['stderr']}"
    if "Explorer(" in md.read_text(encoding="utf-8"):  # a chapter without a live figure has none
        assert probe["explorers"], f"{ipynb.name}: no live explorer was built under DEQLITE_LIVE=1"
    assert result["widget_outputs"] >= len(probe["explorers"]), "each live explorer is displayed as a widget"
    stuck = [e for e in probe["explorers"] if not e["redrew"]]
    assert not stuck, f"moving a slider did not redraw: {stuck}"
