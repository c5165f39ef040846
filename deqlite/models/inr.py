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
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..delta import DeltaLinear, delta_mode, mac_summary, reset_all
from ..solvers import SolverTrace, solve

__all__ = ["DEQINR", "DEQFourier", "DEQSiren", "SpectralScale", "psnr", "fit_inr", "FitResult",
           "evaluate_delta", "DeltaEval"]


class SpectralScale(nn.Module):
    """Parametrization ``W -> scale * W / ||W||_2`` (exact largest singular value).

    The exact norm (an SVD of a ``D x D`` matrix) is cheap at INR widths and has no power-
    iteration state; wrap repeated calls in ``torch.nn.utils.parametrize.cached()`` so a DEQ
    solve computes it once, not once per iteration.
    """

    def __init__(self, scale: float = 0.97) -> None:
        super().__init__()
        if not 0 < scale:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.scale = float(scale)

    def forward(self, W: Tensor) -> Tensor:
        return W * (self.scale / torch.linalg.matrix_norm(W, ord=2))


def psnr(pred: Tensor, target: Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)``.

    ``data_range`` is 2 for images in [-1, 1]. Shapes must match.

    Example:
        >>> round(psnr(torch.zeros(4), torch.full((4,), 0.02)), 2)
        39.03
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

        def uniform(shape: Tuple[int, ...], bound: float) -> nn.Parameter:
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
        parametrize.register_parametrization(self.layer, "weight", SpectralScale(spectral_scale))
        self.readout = nn.Linear(width, out_dim)
        self.readout.weight = uniform((out_dim, width), 1.0 / math.sqrt(width))
        self.readout.bias = nn.Parameter(torch.zeros(out_dim))

    def injection(self, x: Tensor) -> Tuple[Tensor, Tensor]:
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

    def forward(self, x: Tensor, z0: Optional[Tensor] = None, *, solver: str = "km",
                tol: float = 1e-3, max_iter: int = 100, keep_cache: bool = False,
                **solver_options: Any) -> Tuple[Tensor, Tensor, SolverTrace]:
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
        with parametrize.cached():
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

    psnr: List[float] = field(default_factory=list)
    nfe: List[int] = field(default_factory=list)
    seconds: float = 0.0
    z_star: Optional[Tensor] = None


def fit_inr(model: DEQINR, coords: Tensor, pixels: Tensor, *, steps: int = 300,
            lr: float = 1e-3, reuse: bool = True, tol: float = 1e-3, max_iter: int = 100,
            solver: str = "km", train_threshold: Optional[float] = None,
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
    z_prev: Optional[Tensor] = None
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

    threshold: Optional[float]
    memory: str
    psnr: float
    iterations: int
    dense_macs: int
    cost: int
    fixed_macs: int
    per_iter_active: List[float]
    fired_per_dim: Any
    output: Tensor
    trace: SolverTrace

    def reduction_vs(self, baseline: "DeltaEval") -> float:
        """1 - total MACs of this run / total MACs of ``baseline`` (both incl. fixed MACs)."""
        return 1.0 - (self.cost + self.fixed_macs) / (baseline.cost + baseline.fixed_macs)


def evaluate_delta(model: DEQINR, coords: Tensor, pixels: Tensor, threshold: Optional[float], *,
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
