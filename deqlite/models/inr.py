"""Implicit neural representations (INRs) as DEQs: DEQ-Fourier and DEQ-Siren.

An INR maps a pixel coordinate ``x`` in [-1, 1]^2 to the pixel's value. The DEQ versions (from
the (Implicit)^2 work, used by DeltaDEQ, Sec. 4.1) iterate one multiplicative-filter layer to
its fixed point and read the state out linearly::

    u(x)  = sin(U0 x + phi0)                                  # input injection, (B, D)
    y     = W (z + u(x)) + b                                  # the one linear layer
    Fourier:  z+ = sin(U x + phi) * y                          # filter * linear
    Siren:    z+ = sin(y + U x + phi)
    out   = V z_star + c                                       # (B, 1)

``W`` is spectrally normalised to ``0.97`` (a parametrization: ``W = 0.97 W_raw / ||W_raw||_2``)
and is the only layer inside the iteration, a :class:`deqlite.delta.DeltaLinear`: the delta
rule skips the columns of ``W`` whose input stopped changing. ``U``, ``U0`` are scaled with the
image resolution so the filters can express its frequencies; phases are uniform in (-pi, pi).

The model is a thin layer on :class:`deqlite.DEQ` (injection ``(u, h)``, Jacobian-free
gradient). Delta evaluation and timing live in :mod:`deqlite.delta.evaluate` and
:mod:`deqlite.delta.inference`; their names stay importable from here.
"""
from __future__ import annotations

import importlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._checks import check_choice, check_int
from ..backward import JacobianFree
from ..delta.layers import DeltaLinear
from ..delta.modes import delta_mode
from ..deq import DEQ
from ..regularize import SpectralScale
from ..solvers import SolverTrace, get_solver

__all__ = ["DEQINR", "DEQFourier", "DEQSiren", "FitResult", "fit_inr", "psnr"]

# moved to deqlite.delta (evaluation and timing are not part of the model); imported on first
# access because deqlite.delta.evaluate imports this module
_MOVED = {"CompactRun": "inference", "delta_picard_compact": "inference",
          **{n: "evaluate" for n in ("DeltaEval", "IterationTiming", "SequenceRun", "evaluate_delta",
                                     "follow_pixels", "render_sequence", "time_compact",
                                     "time_inference", "time_iterations", "time_sequence")}}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f"deqlite.delta.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'deqlite.models.inr' has no attribute {name!r}")


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
        check_choice("kind", kind, ("fourier", "siren"))
        for name, v in (("width", width), ("resolution", resolution), ("in_dim", in_dim),
                        ("out_dim", out_dim)):
            check_int(name, v)
        self.kind = kind
        self.width = width
        gen = torch.Generator().manual_seed(seed)
        freq = freq_factor * resolution / 2.0

        def uniform(shape: tuple[int, ...], bound: float) -> nn.Parameter:
            return nn.Parameter((torch.rand(shape, generator=gen) * 2 - 1) * bound)

        # Input injection u(x) and filter: frequencies scaled to the resolution, random phases.
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
        """``(u(x), h(x))`` for ``x`` ``(B, in_dim)``, both ``(B, D)``: the injected term and the
        filter (Fourier: ``sin(U x + phi)``; Siren: its argument ``U x + phi``)."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.inject.in_features:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {self.inject.in_features}), got {got}; "
                             f"pass pixel coordinates as rows (e.g. deqlite.data.camera_image)")
        u = torch.sin(self.inject(x))
        h = self.filter(x)
        return u, (torch.sin(h) if self.kind == "fourier" else h)

    def activate(self, y: Tensor, h: Tensor) -> Tensor:
        """The map after the linear layer, ``y = W (z + u) + b`` -> next state: Fourier
        ``h * y``, Siren ``sin(y + h)``. The one place the layer formula is written; the
        delta inference and the dense timing loops call it too."""
        return h * y if self.kind == "fourier" else torch.sin(y + h)

    def f(self, z: Tensor, u: Tensor, h: Tensor) -> Tensor:
        """One application of the layer, ``(B, D) -> (B, D)``."""
        return self.activate(self.layer(z + u), h)  # the delta rule lives in self.layer

    def _deq(self, solver: str, tol: float, max_iter: int, options: dict[str, Any]) -> DEQ:
        # Built per call (cheap next to a solve: no state is kept on the model, so it pickles
        # and deep-copies as before). Jacobian-free gradient: one application of f at z*;
        # failures only recorded in the trace (capped solves are used on purpose here).
        return DEQ(lambda z, inj: self.f(z, *inj), solver=get_solver(solver, **options), tol=tol,
                   max_iter=max_iter, backward=JacobianFree(), on_failure="ignore")

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
            ``(out, z_star, trace)``: ``(B, out_dim)``, ``(B, D)`` and the solver trace. When
            a gradient is needed (grad mode on and a parameter or ``x`` requires grad), one
            more (dense) application of ``f`` carries it (Jacobian-free backward):
            ``out = readout(f(z_star))``.
        """
        if solver == "km" and not solver_options:
            solver_options = {"beta": 0.9}
        deq = self._deq(solver, tol, max_iter, solver_options)
        u, h = self.injection(x)
        if z0 is None:
            z0 = torch.zeros(x.shape[0], self.width, dtype=u.dtype, device=u.device)
        elif z0.shape != (x.shape[0], self.width):
            raise ValueError(f"z0 must have shape ({x.shape[0]}, {self.width}), got "
                             f"{tuple(z0.shape)}")
        if not keep_cache:
            self.layer.reset()
        grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))
        with torch.set_grad_enabled(grad):  # without a gradient DEQ returns the solve's z*
            z, trace = deq((u, h), z0)
        # with one, DEQ returns f(z*) carrying it; the solve's z* (the warm start of the next
        # call, e.g. in fit_inr) is deq.last_solve
        z_star = deq.last_solve if grad else z
        return self.readout(z), z_star, trace

    def fixed_macs(self, batch: int) -> int:
        """MACs computed once per input, outside the iteration (injection, filter, readout)."""
        per = self.inject.in_features * self.width * 2 + self.width * self.readout.out_features
        return batch * per


class DEQFourier(DEQINR):
    """DEQ-Fourier INR: ``z+ = sin(U x + phi) * (W (z + u(x)) + b)``. See :class:`DEQINR`.

    Example:
        >>> net = DEQFourier(width=16, resolution=8)
        >>> out, z, tr = net(torch.zeros(5, 2))
        >>> out.shape, z.shape
        (torch.Size([5, 1]), torch.Size([5, 16]))
    """

    def __init__(self, width: int = 128, resolution: int = 64, **kw: Any) -> None:
        super().__init__("fourier", width, resolution, **kw)


class DEQSiren(DEQINR):
    """DEQ-Siren INR: ``z+ = sin(W (z + u(x)) + b + U x + phi)``. See :class:`DEQINR`."""

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
    check_int("steps", steps)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    res = FitResult()
    z_prev: Tensor | None = None
    model.train()
    t0 = time.perf_counter()
    # the delta rule (when asked for) holds for the training solves only
    rule = delta_mode(model, train_threshold) if train_threshold is not None else nullcontext()
    with rule:
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
    model.eval()
    res.seconds = time.perf_counter() - t0
    res.z_star = z_prev
    return res


