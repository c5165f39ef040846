"""Implicit neural representations (INRs) as DEQs: DEQ-Fourier and DEQ-Siren.

An INR maps a pixel coordinate ``x`` in [-1, 1]^2 to the pixel's value. The DEQ versions (from
the (Implicit)^2 work, used by DeltaDEQ, seed 000, Sec. 4.1) iterate one multiplicative-filter
layer to its fixed point and read the state out linearly::

    g(x)  = sin(U0 x + phi0)                                  # input injection, (B, D)
    Fourier:  z+ = sin(U x + phi) * (W (z + g(x)) + b)         # filter * linear
    Siren:    z+ = sin(W (z + g(x)) + b + U x + phi)
    out   = V z_star + c                                       # (B, 1)

``W`` is spectrally normalised to ``0.97`` (a parametrization: ``W = 0.97 W_raw / ||W_raw||_2``)
and is the only layer inside the iteration, a :class:`deqlite.delta.DeltaLinear`: the delta
rule skips the columns of ``W`` whose input stopped changing. ``U``, ``U0`` are scaled with the
image resolution so the filters can express its frequencies; phases are uniform in (-pi, pi).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..delta import DeltaLinear, delta_mode, mac_summary, reset_all
from ..solvers import SolverTrace, solve
from ..regularize import SpectralScale, weight_cache

__all__ = [
    "DEQINR",
    "CompactRun",
    "DEQFourier",
    "DEQSiren",
    "DeltaEval",
    "FitResult",
    "IterationTiming",
    "SequenceRun",
    "delta_picard_compact",
    "evaluate_delta",
    "fit_inr",
    "follow_pixels",
    "psnr",
    "render_sequence",
    "time_compact",
    "time_inference",
    "time_iterations",
    "time_sequence",
]


def psnr(pred: Tensor, target: Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)``.

    ``data_range`` is 2 for images in [-1, 1]. Shapes must match.

    Example:
        >>> round(psnr(torch.zeros(4), torch.full((4,), 0.02)), 2)
        40.0
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    mse = F.mse_loss(pred.detach().double(), target.detach().double()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


class DEQINR(nn.Module):
    """A DEQ implicit neural representation; use :class:`DEQFourier` or :class:`DEQSiren`.

    Args:
        kind: ``"fourier"`` or ``"siren"``.
        width: state dimension ``D``.
        resolution: image side length; the input frequencies are drawn uniformly in
            ``(-freq_factor * resolution / 2, freq_factor * resolution / 2)`` (``resolution/2``
            is about the highest angular frequency a grid of that size on [-1, 1] can show).
        freq_factor: multiplies that range.
        spectral_scale: ``||W||_2`` (0.97 as in the paper's setup).
        in_dim, out_dim: coordinate and value dimensions.
        seed: seeds the initialisation.

    Shapes: ``x`` ``(B, in_dim)`` -> output ``(B, out_dim)``; state ``z`` ``(B, D)``.
    """

    def __init__(self, kind: str = "fourier", width: int = 128, resolution: int = 64, *,
                 freq_factor: float = 1.0, spectral_scale: float = 0.97, in_dim: int = 2,
                 out_dim: int = 1, seed: int = 0) -> None:
        super().__init__()
        if kind not in ("fourier", "siren"):
            raise ValueError(f"kind must be 'fourier' or 'siren', got {kind!r}")
        for name, v in (("width", width), ("resolution", resolution), ("in_dim", in_dim),
                        ("out_dim", out_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.kind = kind
        self.width = width
        gen = torch.Generator().manual_seed(seed)
        freq = freq_factor * resolution / 2.0

        def uniform(shape: tuple[int, ...], bound: float) -> nn.Parameter:
            return nn.Parameter((torch.rand(shape, generator=gen) * 2 - 1) * bound)

        # Input injection g(x) and filter: frequencies scaled to the resolution, random phases.
        self.inject = nn.Linear(in_dim, width)
        self.filter = nn.Linear(in_dim, width)
        for lin in (self.inject, self.filter):
            lin.weight = uniform((width, in_dim), freq)
            lin.bias = uniform((width,), math.pi)
        self.layer = DeltaLinear(width, width, enabled=False)
        self.layer.weight = uniform((width, width), 1.0 / math.sqrt(width))
        self.layer.bias = uniform((width,), 1.0 / math.sqrt(width))
        # ||W||_2 fixed to spectral_scale (exact, one SVD per solve and grad mode: weight_cache)
        parametrize.register_parametrization(
            self.layer, "weight", SpectralScale(self.layer.weight, spectral_scale, mode="fix"))
        self.readout = nn.Linear(width, out_dim)
        self.readout.weight = uniform((out_dim, width), 1.0 / math.sqrt(width))
        self.readout.bias = nn.Parameter(torch.zeros(out_dim))

    def injection(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(g(x), h(x))`` for ``x`` ``(B, in_dim)``, both ``(B, D)``: the injected term and the
        filter (Fourier: ``sin(U x + phi)``; Siren: its argument ``U x + phi``)."""
        if x.dim() != 2 or x.shape[1] != self.inject.in_features:
            raise ValueError(f"x must have shape (B, {self.inject.in_features}), got "
                             f"{tuple(x.shape)}")
        g = torch.sin(self.inject(x))
        h = self.filter(x)
        return g, (torch.sin(h) if self.kind == "fourier" else h)

    def f(self, z: Tensor, g: Tensor, h: Tensor) -> Tensor:
        """One application of the layer, ``(B, D) -> (B, D)``."""
        y = self.layer(z + g)  # the delta rule lives here
        return h * y if self.kind == "fourier" else torch.sin(y + h)

    def forward(self, x: Tensor, z0: Tensor | None = None, *, solver: str = "km",
                tol: float = 1e-3, max_iter: int = 100, keep_cache: bool = False,
                **solver_options: Any) -> tuple[Tensor, Tensor, SolverTrace]:
        """Solve for the fixed point and read it out.

        Args:
            x: coordinates ``(B, in_dim)``.
            z0: starting state ``(B, D)`` (fixed-point reuse); zeros when None.
            solver, tol, max_iter, solver_options: passed to :func:`deqlite.solve`
                (default: Krasnoselskii-Mann with ``beta=0.9``, relative tol 1e-3, as in the
                DeltaDEQ release).
            keep_cache: keep the delta layer's cache from the previous call (for a sequence
                of related inputs); by default it is reset.

        Returns:
            ``(out, z_star, trace)``: ``(B, out_dim)``, ``(B, D)`` and the solver trace. With
            autograd on, one more (dense) application of ``f`` carries the gradient
            (Jacobian-free backward): ``out = readout(f(z_star))``.
        """
        if solver == "km" and not solver_options:
            solver_options = {"beta": 0.9}
        # weight_cache, not torch's parametrize.cached(): the no-grad solve and the gradient
        # step below must not share one weight (a weight computed without grad would leave
        # W untrained: its .grad stayed None)
        with weight_cache():
            g, h = self.injection(x)
            if z0 is None:
                z0 = torch.zeros(x.shape[0], self.width, dtype=g.dtype, device=g.device)
            elif z0.shape != (x.shape[0], self.width):
                raise ValueError(f"z0 must have shape ({x.shape[0]}, {self.width}), got "
                                 f"{tuple(z0.shape)}")
            if not keep_cache:
                self.layer.reset()
            z_star, trace = solve(lambda z: self.f(z, g.detach(), h.detach()), z0, solver=solver,
                                  tol=tol, max_iter=max_iter, on_failure="ignore",
                                  **solver_options)
            if torch.is_grad_enabled():
                z = self.f(z_star, g, h)
                return self.readout(z), z_star, trace
            return self.readout(z_star), z_star, trace

    def fixed_macs(self, batch: int) -> int:
        """MACs computed once per input, outside the iteration (injection, filter, readout)."""
        per = self.inject.in_features * self.width * 2 + self.width * self.readout.out_features
        return batch * per


class DEQFourier(DEQINR):
    """DEQ-Fourier INR: ``z+ = sin(U x + phi) * (W (z + g(x)) + b)``. See :class:`DEQINR`.

    Example:
        >>> net = DEQFourier(width=16, resolution=8)
        >>> out, z, tr = net(torch.zeros(5, 2))
        >>> out.shape, z.shape
        (torch.Size([5, 1]), torch.Size([5, 16]))
    """

    def __init__(self, width: int = 128, resolution: int = 64, **kw: Any) -> None:
        super().__init__("fourier", width, resolution, **kw)


class DEQSiren(DEQINR):
    """DEQ-Siren INR: ``z+ = sin(W (z + g(x)) + b + U x + phi)``. See :class:`DEQINR`."""

    def __init__(self, width: int = 128, resolution: int = 64, **kw: Any) -> None:
        super().__init__("siren", width, resolution, **kw)


@dataclass
class FitResult:
    """History of :func:`fit_inr`: per step the PSNR (of the training forward), the solver's
    function evaluations, and the seconds; ``z_star`` the last fixed point ``(B, D)``."""

    psnr: list[float] = field(default_factory=list)
    nfe: list[int] = field(default_factory=list)
    seconds: float = 0.0
    z_star: Tensor | None = None


def fit_inr(model: DEQINR, coords: Tensor, pixels: Tensor, *, steps: int = 300,
            lr: float = 1e-3, reuse: bool = True, tol: float = 1e-3, max_iter: int = 100,
            solver: str = "km", train_threshold: float | None = None,
            seed: int = 0) -> FitResult:
    """Fit ``model`` to one image, full batch, with Adam.

    Each step solves for the fixed point without gradients, then applies ``f`` once more with
    gradients (Jacobian-free backward). With ``reuse=True`` each solve starts from the previous
    step's fixed point, so later steps need few iterations. ``train_threshold`` runs the
    training solves with the delta rule (None: dense).

    Args:
        coords: ``(B, 2)``; pixels: ``(B, out_dim)``.

    Returns: a :class:`FitResult`.
    """
    if coords.shape[0] != pixels.shape[0]:
        raise ValueError(f"coords and pixels must have the same number of rows, got "
                         f"{coords.shape[0]} and {pixels.shape[0]}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    res = FitResult()
    z_prev: Tensor | None = None
    model.train()
    t0 = time.perf_counter()
    ctx = delta_mode(model, train_threshold) if train_threshold is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        for _ in range(steps):
            out, z_star, trace = model(coords, z_prev if reuse else None, solver=solver, tol=tol,
                                       max_iter=max_iter)
            loss = F.mse_loss(out, pixels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            z_prev = z_star.detach()
            res.psnr.append(psnr(out, pixels))
            res.nfe.append(trace.nfe)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    model.eval()
    res.seconds = time.perf_counter() - t0
    res.z_star = z_prev
    return res


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
    with torch.no_grad():
        if threshold is None:
            reset_all(model)
            model.layer.record_fired = record_fired
            out, _, trace = model(coords, solver=solver, tol=tol, max_iter=max_iter,
                                  **solver_options)
            model.layer.record_fired = False
        else:
            with delta_mode(model, threshold, memory=memory, sparse=sparse,
                            record_fired=record_fired):
                out, _, trace = model(coords, solver=solver, tol=tol, max_iter=max_iter,
                                      **solver_options)
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
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    model.eval()
    layer = model.layer

    def run(delta: bool) -> float:
        with torch.no_grad(), weight_cache():
            g, h = model.injection(coords)
            layer.reset()
            z = torch.zeros(coords.shape[0], model.width, dtype=g.dtype, device=g.device)
            t0 = time.perf_counter()
            for _ in range(n_iter):
                z = torch.lerp(z, model.f(z, g, h), beta)
            return time.perf_counter() - t0

    saved = {k: getattr(layer, k) for k in ("enabled", "threshold", "train_threshold", "memory",
                                             "sparse", "track")}
    try:
        dense_runs: list[float] = []
        delta_runs: list[float] = []
        for i in range(warmup + repeats):
            layer.enabled, layer.track = False, False
            td = run(False)
            layer.enabled, layer.threshold, layer.train_threshold = True, float(threshold), float(threshold)
            layer.memory, layer.sparse = memory, sparse
            tr = run(True)
            if i >= warmup:
                dense_runs.append(td)
                delta_runs.append(tr)
        # one tracked run for the sparsity pattern of the timed iterations
        layer.track = True
        layer.clear_records()
        run(True)
        active = [r.active / r.numel for r in layer.records]
    finally:
        for k, v in saved.items():
            setattr(layer, k, v)
        layer.reset()
        layer.clear_records()
    md = float(torch.tensor(dense_runs).median())
    mr = float(torch.tensor(delta_runs).median())
    return IterationTiming(float(threshold), sparse, n_iter, repeats, md, mr, md / mr, active,
                           dense_runs, delta_runs)


@dataclass
class CompactRun:
    """Result of :func:`delta_picard_compact`.

    Attributes:
        output: ``(B, out_dim)``; z_star: ``(B, D)``.
        iterations: evaluations of the layer (the first one dense).
        active_rows: per iteration, how many samples were still computed.
        active_fraction: per iteration, fired entries / all ``B * D`` entries (1 for the first).
        dense_macs: MACs of the dense layer for the same number of iterations.
        cost: MACs performed plus subtractions (only active samples are subtracted).
        converged: every sample's relative change fell to ``tol`` or froze.
    """

    output: Tensor
    z_star: Tensor
    iterations: int
    active_rows: list[int]
    active_fraction: list[float]
    dense_macs: int
    cost: int
    converged: bool
    state: tuple[Tensor, Tensor, Tensor] | None = None

    def warm_state(self, index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, a_prev, y_prev)`` to continue from, rows picked by ``index`` (optional)."""
        assert self.state is not None
        if index is None:
            return self.state
        return tuple(t.index_select(0, index) for t in self.state)  # type: ignore[return-value]


def delta_picard_compact(model: DEQINR, x: Tensor, threshold: float, *, max_iter: int = 100,
                         tol: float = 1e-3, memory: str = "reset",
                         warm: tuple[Tensor, Tensor, Tensor] | None = None,
                         gather_below: float = 0.5) -> CompactRun:
    """Picard iteration ``z <- f(z)`` of an INR with the delta rule, skipping frozen samples.

    Under plain (Picard) iteration a sample whose layer input fired nowhere gets the same
    layer output as before, hence the same next state: its change is exactly zero from then
    on, under either memory rule. So the delta rule carried through the whole map freezes that
    sample for good, and every later operation on it (the subtraction, the threshold test,
    the filter, the update) can be skipped, not only the matrix product. This function keeps
    the still-active samples in compact (contiguous) tensors, written back when they freeze;
    its result equals running ``model.f`` with a :class:`~deqlite.delta.DeltaLinear` at
    ``threshold`` and the same ``memory`` rule, step for step (tested).

    Execution, chosen per step so that the delta rule never costs much more than the dense
    layer: the thresholded change is one fused pass (``hardshrink``); the product gathers the
    input columns that fired in some active sample only when fewer than ``gather_below * D``
    did (otherwise it multiplies the masked change densely, in place: ``y += d_hat W^T``);
    ``threshold = 0`` fires every change, so it runs the dense product ``W a + b`` with no
    subtraction at all (equal to the delta form up to rounding, counted as dense MACs).

    Stops when no sample is active, when every active sample's relative change
    ``||z_{k+1} - z_k|| / ||z_{k+1}||`` is ``<= tol``, or after ``max_iter`` evaluations.

    ``warm=(z0, a_prev, y_prev)`` (e.g. ``run.warm_state()`` of the previous frame, rows
    reordered to follow the pixels) starts from ``z0`` with the layer cache ``(a_prev,
    y_prev)`` instead of a dense first call; the first step then updates every sample (their
    filters may have changed), later steps only the active ones.

    Runs on the device and dtype of ``x`` (and the model).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0 (0 runs the dense product), "
                         f"got {threshold!r}")
    threshold = float(threshold)
    if memory not in ("reset", "accumulate"):
        raise ValueError(f"memory must be 'reset' or 'accumulate', got {memory!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not 0.0 <= gather_below <= 1.0:
        raise ValueError(f"gather_below must be a fraction in [0, 1], got {gather_below!r}")
    model.eval()
    fourier = model.kind == "fourier"

    def act(y: Tensor, h: Tensor) -> Tensor:
        return h * y if fourier else torch.sin(y + h)

    with torch.no_grad(), weight_cache():
        W, bias = model.layer.weight, model.layer.bias
        D = model.width
        g, h = model.injection(x)
        B = x.shape[0]
        n_out = W.shape[0]
        dense_per = B * D * n_out + (B * n_out if bias is not None else 0)
        if warm is None:
            a_prev = g.clone()  # layer input at z_0 = 0
            y = F.linear(a_prev, W, bias)  # first call: dense, (B, D)
            z = act(y, h)  # z_1
            cost = dense_per
            rows_hist, frac_hist = [B], [1.0]
            force_all = False
        else:
            z0, a0, y0 = warm
            if z0.shape != (B, D) or a0.shape != (B, D) or y0.shape != (B, n_out):
                raise ValueError(f"warm must hold (z0, a_prev, y_prev) of shapes ({B}, {D}), "
                                 f"({B}, {D}), ({B}, {n_out}); got {tuple(z0.shape)}, "
                                 f"{tuple(a0.shape)}, {tuple(y0.shape)}")
            z, a_prev, y = z0.clone(), a0.clone(), y0.clone()
            cost = 0
            rows_hist, frac_hist = [], []
            force_all = True  # z0 need not equal f's output under the new filters
        converged = False
        tiny = torch.finfo(z.dtype).tiny
        if threshold == 0.0:
            # Every non-zero change fires: the delta form is W a + b up to rounding, so run the
            # dense product and skip the subtraction and the threshold test altogether.
            for _ in range(len(rows_hist), max_iter):
                a_prev = z + g
                y = F.linear(a_prev, W, bias)
                z_new = act(y, h)
                rel = torch.linalg.vector_norm(z_new - z, dim=1) / \
                    torch.linalg.vector_norm(z_new, dim=1).clamp_min(tiny)
                z = z_new
                cost += dense_per
                rows_hist.append(B)
                frac_hist.append(1.0)
                if bool((rel <= tol).all()):
                    converged = True
                    break
            out = model.readout(z)
            return CompactRun(out, z, len(rows_hist), rows_hist, frac_hist,
                              dense_per * len(rows_hist), cost, converged, (z, a_prev, y))
        # Working tensors hold the active samples only (global row ids in `ids`); a sample's
        # final values go to the full tensors when it freezes.
        ids = torch.arange(B, device=z.device)
        zc, gc, hc, ac, yc = z, g, h, a_prev, y
        z_out = a_out = y_out = None
        for _ in range(len(rows_hist), max_iter):
            A = ids.numel()
            a = zc + gc  # (A, D) layer input
            if memory == "reset":
                d_hat = F.hardshrink(torch.sub(a, ac, out=ac), threshold)  # ac is not needed again
                ac = a
                nz = d_hat != 0
            else:
                d_hat = F.hardshrink(a - ac, threshold)
                nz = d_hat != 0
                ac = torch.where(nz, a, ac)
            per_row = nz.sum(dim=1)
            nnz = int(per_row.sum())
            cost += A * D + nnz * n_out  # the subtraction (active samples) and the product
            frac_hist.append(nnz / (B * D))
            if not force_all and nnz < A * D:
                keep = per_row > 0
                n_keep = int(keep.sum())
                if n_keep < A:
                    if z_out is None:
                        z_out, a_out, y_out = torch.empty_like(z), torch.empty_like(z), \
                            torch.empty(B, n_out, dtype=y.dtype, device=y.device)
                    gone = (~keep).nonzero().squeeze(1)
                    gid = ids.index_select(0, gone)
                    z_out.index_copy_(0, gid, zc.index_select(0, gone))
                    a_out.index_copy_(0, gid, ac.index_select(0, gone))
                    y_out.index_copy_(0, gid, yc.index_select(0, gone))
                    kept = keep.nonzero().squeeze(1)
                    ids, zc, gc, hc, ac, yc, d_hat, nz = (
                        t.index_select(0, kept) for t in (ids, zc, gc, hc, ac, yc, d_hat, nz))
            force_all = False
            rows_hist.append(int(ids.numel()))
            if ids.numel() == 0:
                converged = True
                break
            if nnz:
                cols_fired = nz.any(dim=0)
                n_cols = int(cols_fired.sum())
                if n_cols < gather_below * D:
                    cols = cols_fired.nonzero().squeeze(1)
                    yc = yc.addmm_(d_hat.index_select(1, cols), W.index_select(1, cols).T)
                else:
                    yc = yc.addmm_(d_hat, W.T)
            z_new = act(yc, hc)
            rel = torch.linalg.vector_norm(z_new - zc, dim=1) / \
                torch.linalg.vector_norm(z_new, dim=1).clamp_min(tiny)
            zc = z_new
            if bool((rel <= tol).all()):
                converged = True
                break
        if z_out is None:  # nothing froze: the working tensors are the full ones
            z_out, a_out, y_out = zc, ac, yc
        elif ids.numel():
            z_out.index_copy_(0, ids, zc)
            a_out.index_copy_(0, ids, ac)
            y_out.index_copy_(0, ids, yc)
        iterations = len(rows_hist)
        out = model.readout(z_out)
    return CompactRun(out, z_out, iterations, rows_hist, frac_hist, dense_per * iterations, cost,
                      converged, (z_out, a_out, y_out))


def _dense_picard(model: DEQINR, x: Tensor, *, max_iter: int, tol: float | None,
                  ) -> tuple[Tensor, int]:
    """The dense DEQ's plain iteration from zero, ``tol=None``: exactly ``max_iter`` steps;
    else it stops when every sample's relative change is ``<= tol`` (the compact rule).
    Returns the read-out and the number of evaluations."""
    with torch.no_grad(), weight_cache():
        g, h = model.injection(x)
        W, b = model.layer.weight, model.layer.bias
        fourier = model.kind == "fourier"
        z = torch.zeros(x.shape[0], model.width, dtype=g.dtype, device=g.device)
        k = 0
        for k in range(1, max_iter + 1):
            y = F.linear(z + g, W, b)
            z_new = h * y if fourier else torch.sin(y + h)
            if tol is not None:
                rel = torch.linalg.vector_norm(z_new - z, dim=1) / \
                    torch.linalg.vector_norm(z_new, dim=1).clamp_min(torch.finfo(z.dtype).tiny)
                z = z_new
                if bool((rel <= tol).all()):
                    break
            else:
                z = z_new
        return model.readout(z), k


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
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
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
    saved = {k: getattr(layer, k) for k in ("enabled", "threshold", "train_threshold",
                                             "memory", "track")}
    psnrs: list[float] = []
    iters: list[int] = []
    costs: list[int] = []
    try:
        layer.enabled = threshold is not None
        if threshold is not None:
            layer.threshold = layer.train_threshold = float(threshold)
            layer.memory = memory
        layer.track = True
        reset_all(model)
        z_prev: Tensor | None = None
        idx_prev: Tensor | None = None
        with torch.no_grad():
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
    finally:
        for k, v in saved.items():
            setattr(layer, k, v)
        layer.reset()
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
    fourier = model.kind == "fourier"

    def dense() -> tuple[float, list[int], list[float]]:
        iters, ps = [], []
        with torch.no_grad(), weight_cache():
            t0 = time.perf_counter()
            W, b = model.layer.weight, model.layer.bias
            z_prev, idx_prev = None, None
            for idx in frames:
                g, h = model.injection(coords[idx])
                z = torch.zeros(idx.numel(), model.width, dtype=g.dtype, device=g.device) if z_prev is None \
                    else z_prev.index_select(0, follow_pixels(n_pix, idx_prev, idx))
                for k in range(max_iter):
                    y = F.linear(z + g, W, b)
                    z_new = h * y if fourier else torch.sin(y + h)
                    rel = (z_new - z).norm(dim=1) / z_new.norm(dim=1).clamp_min(1e-30)
                    z = z_new
                    if bool((rel <= tol).all()):
                        break
                iters.append(k + 1)
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
