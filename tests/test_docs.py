"""The README's example and the docstring examples of the core modules run as written."""
import doctest
import importlib
import re
from pathlib import Path

import pytest
import torch

import deqlite

ROOT = Path(__file__).resolve().parents[1]
CORE = ["deqlite.solvers", "deqlite.deq", "deqlite.backward", "deqlite.regularize", "deqlite.diagnostics",
        "deqlite.models.mlp"]


def test_readme_using_deqlite_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    assert "## Using deqlite" in text, "README.md needs its 'Using deqlite' section"
    section = text.split("## Using deqlite", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the 'Using deqlite' section has no python example"
    torch.manual_seed(0)
    namespace = {"__name__": "readme"}
    for block in blocks:  # every example, in order, in one namespace (as a reader runs them)
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "converged" in out and "NOT locally contractive" in out


def _all_modules() -> list[str]:
    """Every module of the package: a new module's examples run without editing a list."""
    import pkgutil

    return sorted(m.name for m in pkgutil.walk_packages(deqlite.__path__, "deqlite.")
                  if not m.name.startswith("deqlite._"))


@pytest.mark.parametrize("name", _all_modules())
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                          extraglobs={"torch": torch, "nn": torch.nn, "deqlite": deqlite})
    if name in CORE:
        assert res.attempted > 0, f"{name} has no docstring examples"
    assert res.failed == 0, f"{res.failed} docstring example(s) failed in {name}"
