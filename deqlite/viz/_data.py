"""Reading solver traces (``deqlite.SolverTrace`` or its ``to_dict()``) as numpy arrays."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """A tensor, array or list as a float64 numpy array (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=float)


def field(trace: Any, name: str) -> Any:
    """``trace.name`` for a SolverTrace, ``trace[name]`` for a dict; None when absent."""
    if isinstance(trace, Mapping):
        return trace.get(name)
    return getattr(trace, name, None)


def residual(trace: Any, kind: str = "rel") -> np.ndarray:
    """The (T, B) residual of a trace: ``kind`` is "rel", "abs" or "stop" (the stopping one)."""
    names = {"rel": "rel_residual", "abs": "abs_residual", "stop": "residual"}
    if kind not in names:
        raise ValueError(f"kind must be one of {sorted(names)}, got {kind!r}")
    value = field(trace, names[kind])
    if value is None:
        raise TypeError(
            f"expected a deqlite SolverTrace (or its to_dict()) with a {names[kind]!r} field, "
            f"got {type(trace).__name__}"
        )
    r = to_numpy(value)
    if r.ndim == 0 or r.shape[0] == 0 or r.size == 0:
        raise ValueError(f"the trace holds no steps ({names[kind]} has shape {r.shape}); "
                         f"a figure needs a trace from a solve that ran at least one step")
    return r[:, None] if r.ndim == 1 else r.reshape(r.shape[0], -1)  # (T, B)


def pick_sample(arr: np.ndarray, sample: Any, axis: int = 1) -> np.ndarray:
    """``arr`` indexed at batch ``sample`` along ``axis``, with an error that names the range."""
    n = arr.shape[axis]
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or not -n <= sample < n:
        raise ValueError(f"sample={sample!r} is not a batch index: the trace has B={n} "
                         f"sample(s), so use 0..{n - 1}")
    return np.take(arr, int(sample), axis=axis)


def check_dims(dims: Any, n_dims: int) -> tuple[int, int]:
    """Two distinct state dimensions in range, or a ValueError saying which exist."""
    ok = (isinstance(dims, (tuple, list)) and len(dims) == 2
          and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and 0 <= d < n_dims for d in dims))
    if not ok:
        hint = ("the state has one dimension: plot the residual (residual_figure) instead"
                if n_dims < 2 else f"pick two of 0..{n_dims - 1}")
        raise ValueError(f"dims={dims!r} must be two state dimensions; the iterates have "
                         f"{n_dims} dimension(s): {hint}")
    return int(dims[0]), int(dims[1])


def reduce_batch(r: np.ndarray, reduce: str | int = "max") -> np.ndarray:
    """(T, B) -> (T,): "max" (the slowest sample), "mean", "median", or one sample index."""
    if isinstance(reduce, (int, np.integer)) and not isinstance(reduce, bool):
        return pick_sample(r, reduce)
    ops = {"max": np.max, "mean": np.mean, "median": np.median, "min": np.min}
    if reduce not in ops:
        raise ValueError(f"reduce must be an int sample index or one of {sorted(ops)}, got {reduce!r}")
    return ops[reduce](r, axis=1)


def iterates(trace: Any) -> np.ndarray:
    """The iterates of a trace as a (T, B, D) array (trailing dims flattened).

    Accepts a trace made with ``return_iterates=True``, or the iterates directly as a
    (T, B, ...) / (T, D) array or a list of (B, ...) tensors.
    """
    its = field(trace, "iterates") if not isinstance(trace, (np.ndarray, list, tuple)) and not hasattr(trace, "detach") else trace
    if its is None:
        raise ValueError(
            "this trace holds no iterates; solve with return_iterates=True "
            "(e.g. deqlite.solve(f, z0, return_iterates=True))"
        )
    if isinstance(its, (list, tuple)):
        if len(its) == 0:
            raise ValueError("no iterates: the trace (or list) is empty; solve with "
                             "return_iterates=True and at least one step")
        arr = np.stack([to_numpy(z) for z in its])
    else:
        arr = to_numpy(its)
    if arr.ndim == 2:  # (T, D): one sample
        arr = arr[:, None, :]
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def as_named(traces: Any) -> dict[str, Any]:
    """One trace, a sequence of traces, or a name -> trace mapping, as a dict name -> trace."""
    if isinstance(traces, Mapping) and not _looks_like_trace_dict(traces):
        if not traces:
            raise ValueError("no traces to plot: pass a SolverTrace, a list of them or a "
                             "{name: trace} mapping with at least one entry")
        return dict(traces)
    if isinstance(traces, Sequence) and not isinstance(traces, (str, bytes)) and len(traces) == 0:
        raise ValueError("no traces to plot: the list is empty")
    if isinstance(traces, Sequence) and not isinstance(traces, (str, bytes)):
        named: dict[str, Any] = {}
        for i, t in enumerate(traces):
            name = str(field(t, "solver") or f"trace {i}")
            named[name if name not in named else f"{name} ({i})"] = t
        return named
    return {str(field(traces, "solver") or "trace"): traces}


def _looks_like_trace_dict(d: Mapping) -> bool:
    return "abs_residual" in d or "rel_residual" in d
