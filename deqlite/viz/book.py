"""Small helpers for chapters that also run outside the book build (Colab, plain Jupyter)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def _plain(value: Any) -> Any:
    """numpy scalars and 0-d tensors as Python numbers (their repr is what glue stores)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and getattr(value, "shape", ()) == ():
        return value.item()
    return value


class _Text(str):
    """A str glued as plain text: glue stores a value's repr, which would quote a str."""

    def __repr__(self) -> str:
        return str.__str__(self)


def glue(name: str, value: Any, display: bool = False) -> Any:
    """``myst_nb.glue`` when myst-nb is installed (book build), a no-op otherwise (Colab).

    Numbers glued this way appear in the prose as ``{glue:text}`name:.2f``` and are never
    typed by hand. numpy / torch scalars are converted to Python numbers first, so their
    repr is a plain number, and strings are glued as plain text (without quotes). Returns
    the (converted) value.
    """
    value = _plain(value)
    if isinstance(value, str):
        value = _Text(value)
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return value
    _glue(name, value, display=display)
    return value


def load_record(relpath: str, start: Optional[Path] = None) -> Optional[Any]:
    """The JSON file ``relpath`` of the repository (e.g. ``"benchmarks/results/hyper.json"``),
    looked up from ``start`` (default: the working directory) and its parents, parsed;
    ``None`` when the chapter runs outside a checkout (Colab, a downloaded notebook), so a
    chapter can show a recorded benchmark where it exists and say so where it does not.

    >>> load_record("no/such/record.json") is None
    True
    """
    here = Path.cwd() if start is None else Path(start)
    for d in (here, *here.parents):
        if (d / relpath).is_file():
            return json.loads((d / relpath).read_text(encoding="utf-8"))
    return None
