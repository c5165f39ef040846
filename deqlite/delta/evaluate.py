"""Evaluating an INR DEQ under the delta rule: MACs and PSNR of one inference, wall-clock of
the iterations (layer path, compact path, whole early-stopped inference) and of a sequence
of related inputs rendered with fixed-point reuse."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_choice, check_int
from ..models.inr import DEQINR, DEQFourier, psnr  # noqa: F401 (DEQFourier: the doctests)
from ..regularize import weight_cache
from ..solvers import SolverTrace
from .inference import CompactRun, _dense_picard, delta_picard_compact
from .modes import delta_mode, mac_summary

__all__ = ["DeltaEval", "IterationTiming", "SequenceRun", "evaluate_delta", "follow_pixels",
           "render_sequence", "time_compact", "time_inference", "time_iterations",
           "time_sequence"]


@dataclass
class DeltaEval:
    """One inference run of an INR (see :func:`evaluate_delta`).

    Attributes:
        threshold, memory: the delta settings (threshold None = dense layer).
        psnr: PSNR of the output against the target (dB).
        iterations: function evaluations the solver used.
        dense_macs: MACs a dense layer would do for those iterations (the iteration only).
        cost: MACs performed plus subtractions in those iterations.
        fixed_macs: injection, filter and read-out MACs (once per input, both paths).
        per_iter_active: fraction of the layer's input entries that fired, per iteration.
        fired_per_dim: ``(iterations, D)`` fraction of pixels recomputing each dimension.
        output: ``(B, out_dim)`` the reconstruction; trace: the solver trace.
    """

    threshold: float | None
    memory: str
    psnr: float
    iterations: int
    dense_macs: int
    cost: int
    fixed_macs: int
    per_iter_active: list[float]
    fired_per_dim: Any
    output: Tensor
    trace: SolverTrace

    def reduction_vs(self, baseline: DeltaEval) -> float:
        """1 - total MACs of this run / total MACs of ``baseline`` (both incl. fixed MACs)."""
        return 1.0 - (self.cost + self.fixed_macs) / (baseline.cost + baseline.fixed_macs)


def evaluate_delta(model: DEQINR, coords: Tensor, pixels: Tensor, threshold: float | None, *,
                   memory: str = "reset", solver: str = "km", tol: float = 1e-3,
                   max_iter: int = 100, sparse: bool = False, record_fired: bool = False,
                   **solver_options: Any) -> DeltaEval:
    """Run ``model`` once (no gradients, eval mode) with the delta rule at ``threshold``
    (``None``: the dense layer) and count what it cost.

    Example:
        >>> from deqlite.data import camera_image
        >>> x, y = camera_image(8)
        >>> ev = evaluate_delta(DEQFourier(16, 8), x, y, threshold=0.01)
        >>> 0 <= ev.cost <= ev.dense_macs
        True
    """
    model.eval()
    with torch.no_grad(), delta_mode(model, threshold, memory=memory, sparse=sparse,
                                     record_fired=record_fired):
        out, _, trace = model(coords, solver=solver, tol=tol, max_iter=max_iter, **solver_options)
    s = mac_summary(model)
    return DeltaEval(threshold, memory, psnr(out, pixels), trace.nfe, s.total_dense,
                     s.total_cost, model.fixed_macs(coords.shape[0]), s.active_fraction.tolist(),
                     s.fired_per_dim, out, trace)


@dataclass
class IterationTiming:
    """Wall-clock of ``n_iter`` fixed-point iterations ``z <- (1 - beta) z + beta f(z)`` from
    ``z = 0`` (medians over ``repeats`` runs after warm-up, dense and delta runs interleaved).

    Attributes:
        dense_seconds, delta_seconds: median time of the whole loop.
        speedup: dense / delta.
        active_fraction: per iteration, the fraction of the layer's input entries that fired.
        threshold, sparse, n_iter, repeats: the settings.
        dense_runs, delta_runs: every measurement (seconds).
    """

    threshold: float
    sparse: bool
    n_iter: int
    repeats: int
    dense_seconds: float
    delta_seconds: float
    speedup: float
    active_fraction: list[float]
    dense_runs: list[float]
    delta_runs: list[float]


def time_iterations(model: DEQINR, coords: Tensor, threshold: float, *, n_iter: int = 10,
                    repeats: int = 11, warmup: int = 2, sparse: bool = True,
                    memory: str = "reset", beta: float = 0.9) -> IterationTiming:
    """Time the DEQ iterations with the dense layer and with the delta rule.

    Only the iteration is timed (the injection is computed before the clock starts); solver
    bookkeeping is left out so that the layer's cost is what is compared. Call
    ``torch.set_num_threads(1)`` first for stable numbers.
    """
    check_int("repeats", repeats)
    model.eval()
    layer = model.layer

    def run() -> float:
        with torch.no_grad(), weight_cache():
            u, h = model.injection(coords)
            layer.reset()
            z = torch.zeros(coords.shape[0], model.width, dtype=u.dtype, device=u.device)
            t0 = time.perf_counter()
            for _ in range(n_iter):
                z = torch.lerp(z, model.f(z, u, h), beta)
            return time.perf_counter() - t0

    dense_runs: list[float] = []
    delta_runs: list[float] = []
    for i in range(warmup + repeats):
        with delta_mode(model, None, track=False):
            td = run()
        with delta_mode(model, threshold, memory=memory, sparse=sparse, track=False):
            tr = run()
        if i >= warmup:
            dense_runs.append(td)
            delta_runs.append(tr)
    # one tracked run for the sparsity pattern of the timed iterations
    with delta_mode(model, threshold, memory=memory, sparse=sparse):
        run()
    active = [r.active / r.numel for r in layer.records]
    layer.clear_records()
    md = float(torch.tensor(dense_runs).median())
    mr = float(torch.tensor(delta_runs).median())
    return IterationTiming(float(threshold), sparse, n_iter, repeats, md, mr, md / mr, active,
                           dense_runs, delta_runs)


def time_compact(model: DEQINR, x: Tensor, threshold: float, *, max_iter: int,
                 tol: float = 1e-3, repeats: int = 11, warmup: int = 2,
                 memory: str = "reset") -> dict[str, Any]:
    """Wall-clock of :func:`delta_picard_compact` against the dense Picard iteration run for
    the same number of evaluations (``max_iter``, no early exit), medians of ``repeats`` runs
    after ``warmup``, interleaved. Returns seconds, speedup, the compact run's iterations and
    its MAC reduction against the timed dense loop (``max_iter`` dense iterations).
    For the comparison with an early-stopped dense DEQ see :func:`time_inference`.
    """
    model.eval()

    def dense() -> float:
        t0 = time.perf_counter()
        _dense_picard(model, x, max_iter=max_iter, tol=None)
        return time.perf_counter() - t0

    def compact() -> tuple[float, CompactRun]:
        t0 = time.perf_counter()
        run = delta_picard_compact(model, x, threshold, max_iter=max_iter, tol=tol, memory=memory)
        return time.perf_counter() - t0, run

    td, tc = [], []
    run = None
    for i in range(warmup + repeats):
        a = dense()
        b, run = compact()
        if i >= warmup:
            td.append(a)
            tc.append(b)
    md, mc = float(np.median(td)), float(np.median(tc))
    assert run is not None
    return {"threshold": float(threshold), "dense_seconds": md, "delta_seconds": mc,
            "speedup": md / mc, "dense_iterations": max_iter, "delta_iterations": run.iterations,
            "dense_runs": td, "delta_runs": tc,
            # against the dense loop that was timed: max_iter dense iterations
            "mac_reduction": 1.0 - run.cost / (run.dense_macs // run.iterations * max_iter)}


def time_inference(model: DEQINR, x: Tensor, pixels: Tensor, thresholds: list[float], *,
                   tol: float = 1e-3, max_iter: int = 100, memory: str = "reset",
                   repeats: int = 7, warmup: int = 1, clock: str = "wall") -> dict[str, Any]:
    """Inference time of the delta DEQ against the dense DEQ, both early-stopped.

    ``clock="wall"`` times with ``time.perf_counter``; ``clock="cpu"`` with the calling
    thread's CPU time (``time.thread_time``), which with one torch thread is what a quiet
    machine's wall-clock would be and which another process on a shared machine cannot
    stretch (the chapter uses it so that its asserts hold on a busy machine).

    Two dense baselines: the dense DEQ as the chapter runs it (``model(x)``: the
    Krasnoselskii-Mann solver, beta 0.9, relative tolerance ``tol``) and the dense plain
    iteration with the compact path's stopping rule (every sample's relative change
    ``<= tol``), which needs fewer evaluations here. Each threshold runs
    :func:`delta_picard_compact`. All runs of one repeat are interleaved; medians over
    ``repeats`` after ``warmup``. The MAC reductions include the input-independent work (
    injection, filter, read-out) that both paths do once.

    Returns ``{"dense_km": {...}, "dense_picard": {...}, "delta": [{...} per threshold]}``
    with seconds, iterations, MACs, PSNR and, per threshold, the speedup and the MAC
    reduction against each baseline.
    """
    check_int("repeats", repeats)
    check_choice("clock", clock, ("wall", "cpu"))
    now = time.perf_counter if clock == "wall" else time.thread_time
    model.eval()
    B = x.shape[0]
    n_out = model.layer.out_features
    per_iter = B * model.width * n_out + (B * n_out if model.layer.bias is not None else 0)
    fixed = model.fixed_macs(B)

    def timed(fn: Any) -> tuple[float, Any]:
        t0 = now()
        res = fn()
        return now() - t0, res

    def km() -> tuple[Tensor, int]:
        with torch.no_grad():
            model.layer.reset()
            out, _, trace = model(x, tol=tol, max_iter=max_iter)
        return out, trace.nfe

    runs: dict[str, list[float]] = {"km": [], "picard": []}
    for th in thresholds:
        runs[f"delta{th}"] = []
    last: dict[str, Any] = {}
    for i in range(warmup + repeats):
        for key, fn in [("km", km),
                        ("picard", lambda: _dense_picard(model, x, max_iter=max_iter, tol=tol))] + \
                [(f"delta{th}", (lambda th=th: delta_picard_compact(
                    model, x, th, max_iter=max_iter, tol=tol, memory=memory)))
                 for th in thresholds]:
            t, res = timed(fn)
            last[key] = res
            if i >= warmup:
                runs[key].append(t)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    out_km, it_km = last["km"]
    out_pic, it_pic = last["picard"]
    macs_km, macs_pic = per_iter * it_km + fixed, per_iter * it_pic + fixed
    result: dict[str, Any] = {
        "dense_km": {"seconds": med["km"], "iterations": it_km, "macs": macs_km,
                     "psnr": psnr(out_km, pixels), "runs": runs["km"]},
        "dense_picard": {"seconds": med["picard"], "iterations": it_pic, "macs": macs_pic,
                         "psnr": psnr(out_pic, pixels), "runs": runs["picard"]},
        "delta": []}
    for th in thresholds:
        run: CompactRun = last[f"delta{th}"]
        macs = run.cost + fixed
        t = med[f"delta{th}"]
        result["delta"].append({
            "threshold": float(th), "seconds": t, "iterations": run.iterations,
            "active_rows": run.active_rows, "macs": macs, "psnr": psnr(run.output, pixels),
            "speedup_vs_km": med["km"] / t, "speedup_vs_picard": med["picard"] / t,
            "mac_reduction_vs_km": 1 - macs / macs_km,
            "mac_reduction_vs_picard": 1 - macs / macs_pic,
            "psnr_drop_vs_km": result["dense_km"]["psnr"] - psnr(run.output, pixels),
            "runs": runs[f"delta{th}"]})
    return result


def follow_pixels(n_pixels: int, idx_prev: Tensor, idx: Tensor) -> Tensor:
    """For each pixel of the new frame ``idx``, its batch position in the previous frame
    ``idx_prev``; a pixel that is new keeps its own batch position. ``(len(idx),)`` long."""
    dev = idx.device
    where_prev = torch.full((n_pixels,), -1, dtype=torch.long, device=dev)
    where_prev[idx_prev] = torch.arange(idx_prev.numel(), device=dev)
    src = where_prev[idx]
    return torch.where(src >= 0, src, torch.arange(idx.numel(), device=dev))


@dataclass
class SequenceRun:
    """Per-frame results of :func:`render_sequence` (lists of length ``n_frames``).

    ``cost``: MACs performed (plus subtractions) in the iterations, plus the fixed MACs of
    each frame; ``dense_cold_cost`` the same for dense iterations would need the baseline run.
    """

    psnr: list[float]
    iterations: list[int]
    cost: list[int]

    @property
    def total_cost(self) -> int:
        return int(sum(self.cost))

    @property
    def total_iterations(self) -> int:
        return int(sum(self.iterations))


def render_sequence(model: DEQINR, coords: Tensor, pixels: Tensor, frames: list[Tensor], *,
                    threshold: float | None = None, reuse: bool = False,
                    memory: str = "reset", solver: str = "km", tol: float = 1e-3,
                    max_iter: int = 100, align: bool = True,
                    **solver_options: Any) -> SequenceRun:
    """Render a sequence of related inputs (e.g. :func:`deqlite.data.pan_windows`).

    ``reuse=True`` starts each frame's solve from the previous frame's fixed point and, with
    the delta rule on (``threshold`` not None), keeps the layer's cache across frames, so the
    first iteration of a frame is already a delta against the last one of the previous frame.
    With ``align=True`` the state and the cache follow the pixels: a pixel seen in the
    previous frame starts from its own fixed point wherever it now sits in the batch; a new
    pixel starts from the previous frame's state at its batch position.
    ``reuse=False`` starts every frame from zero with a fresh cache.
    """
    model.eval()
    layer = model.layer
    psnrs: list[float] = []
    iters: list[int] = []
    costs: list[int] = []
    z_prev: Tensor | None = None
    idx_prev: Tensor | None = None
    with torch.no_grad(), delta_mode(model, threshold, memory=memory):
        for idx in frames:
            x = coords[idx]
            n_before = len(layer.records)
            z0 = z_prev if (reuse and z_prev is not None) else None
            if z0 is not None and align and idx_prev is not None and idx.shape == idx_prev.shape:
                src = follow_pixels(coords.shape[0], idx_prev, idx)
                z0 = z0.index_select(0, src)
                layer.reindex_cache(src)
            out, z_prev, trace = model(x, z0, solver=solver, tol=tol, max_iter=max_iter,
                                       keep_cache=reuse, **solver_options)
            new = layer.records[n_before:]
            costs.append(sum(r.cost for r in new) + model.fixed_macs(x.shape[0]))
            iters.append(trace.nfe)
            psnrs.append(psnr(out, pixels[idx]))
            idx_prev = idx
    layer.clear_records()
    return SequenceRun(psnrs, iters, costs)


def time_sequence(model: DEQINR, coords: Tensor, pixels: Tensor, frames: list[Tensor],
                  threshold: float, *, tol: float = 1e-3, max_iter: int = 100,
                  repeats: int = 7, warmup: int = 1) -> dict[str, Any]:
    """Wall-clock of rendering a frame sequence with fixed-point reuse (states aligned to the
    pixels), Picard iteration with early stopping (every sample's relative change ``<= tol``):
    dense layer against the compact delta iteration (:func:`delta_picard_compact`, cache
    carried across frames). Medians over ``repeats`` interleaved runs after ``warmup``.

    Returns seconds, speedup, iterations and MACs of both, and the PSNR per frame.
    """
    model.eval()
    n_pix = coords.shape[0]

    def dense() -> tuple[float, list[int], list[float]]:
        iters, ps = [], []
        with torch.no_grad(), weight_cache():
            t0 = time.perf_counter()
            W, b = model.layer.weight, model.layer.bias
            z_prev, idx_prev = None, None
            for idx in frames:
                u, h = model.injection(coords[idx])
                z = torch.zeros(idx.numel(), model.width, dtype=u.dtype, device=u.device) if z_prev is None \
                    else z_prev.index_select(0, follow_pixels(n_pix, idx_prev, idx))
                k = 0
                while k < max_iter:
                    k += 1
                    z_new = model.activate(F.linear(z + u, W, b), h)
                    rel = (z_new - z).norm(dim=1) / z_new.norm(dim=1).clamp_min(1e-30)
                    z = z_new
                    if bool((rel <= tol).all()):
                        break
                iters.append(k)
                out = model.readout(z)
                ps.append(out)
                z_prev, idx_prev = z, idx
            t = time.perf_counter() - t0
        return t, iters, [psnr(o, pixels[i]) for o, i in zip(ps, frames)]

    def delta() -> tuple[float, list[CompactRun]]:
        runs: list[CompactRun] = []
        t0 = time.perf_counter()
        prev, idx_prev = None, None
        for idx in frames:
            warm = None if prev is None else prev.warm_state(follow_pixels(n_pix, idx_prev, idx))
            prev = delta_picard_compact(model, coords[idx], threshold, max_iter=max_iter, tol=tol,
                                        warm=warm)
            runs.append(prev)
            idx_prev = idx
        return time.perf_counter() - t0, runs

    td, tc = [], []
    d_iters: list[int] = []
    d_psnr: list[float] = []
    runs: list[CompactRun] = []
    for i in range(warmup + repeats):
        a, d_iters, d_psnr = dense()
        b, runs = delta()
        if i >= warmup:
            td.append(a)
            tc.append(b)
    n_out = model.layer.out_features
    B = frames[0].numel()
    dense_per = B * model.width * n_out + B * n_out
    dense_macs = dense_per * sum(d_iters)
    delta_macs = sum(r.cost for r in runs)
    skipped = [1 - sum(r.active_fraction) / max(len(r.active_fraction), 1) for r in runs]
    md, mc = float(np.median(td)), float(np.median(tc))
    return {"threshold": float(threshold), "frames": len(frames), "dense_seconds": md,
            "delta_seconds": mc, "speedup": md / mc, "dense_iterations": d_iters,
            "delta_iterations": [r.iterations for r in runs], "dense_macs": dense_macs,
            "delta_macs": delta_macs, "mac_reduction": 1 - delta_macs / dense_macs,
            "sparsity": float(np.mean(skipped)), "dense_psnr": d_psnr,
            "delta_psnr": [psnr(r.output, pixels[i]) for r, i in zip(runs, frames)],
            "dense_runs": td, "delta_runs": tc}
