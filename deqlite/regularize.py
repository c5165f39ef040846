"""Keeping ``f`` well behaved: contractive weights and the Jacobian regulariser."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F_
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._checks import check_int, check_number

__all__ = ["SpectralScale", "make_contractive", "jacobian_frobenius", "weight_cache"]

# One cache per thread: torch's own ``parametrize.cached()`` is one global dict, so two
# threads (or a user's enclosing ``cached()`` block) could hand a weight computed under
# no_grad to a gradient step, which then silently gets no gradient.
_LOCAL = threading.local()


@contextmanager
def weight_cache() -> Iterator[None]:
    """Compute each :class:`SpectralScale` weight once per grad mode inside this block.

    A solve evaluates ``f`` dozens of times; the spectral normalisation (an SVD) is the same
    each time, so :class:`deqlite.DEQ` wraps its solve and gradient step in this block. The
    cache is per thread and keyed on the grad mode and the weight's version counter, so a
    weight computed without grad is never reused where a gradient is needed, and an
    optimizer step (in place) invalidates it. Nested blocks share the outermost cache.
    """
    if getattr(_LOCAL, "cache", None) is not None:
        yield
        return
    _LOCAL.cache = {}
    try:
        yield
    finally:
        _LOCAL.cache = None


class SpectralScale(nn.Module):
    """Parametrisation ``W -> W * min(1, radius / sigma(W))``, ``sigma`` the largest singular
    value: exact (SVD, differentiable) for matrices up to ``exact_max`` rows/columns, else
    estimated by power iteration (``n_power`` steps per training forward, persistent
    vector, as in Miyato et al. 2018 -- a slight underestimate right after large updates).

    For convolutions ``sigma`` is that of the weight reshaped to ``(out, in * kh * kw)``: a
    cheap proxy, not the operator norm of the convolution. ``mode="fix"`` rescales to
    exactly ``radius`` (as the INR models in the DeltaDEQ paper do), ``"clip"`` only
    shrinks weights that exceed it.
    """

    def __init__(self, weight: Tensor, radius: float = 0.9, mode: str = "clip", n_power: int = 1,
                 exact_max: int = 512):
        super().__init__()
        check_number("radius", radius, lo=0.0, low_open=True)
        if mode not in ("clip", "fix"):
            raise ValueError(f"mode must be 'clip' or 'fix', got {mode!r}")
        self.radius, self.mode, self.n_power = float(radius), mode, int(n_power)
        self.exact = max(weight.shape[0], weight[0].numel()) <= exact_max
        mat = weight.detach().reshape(weight.shape[0], -1)
        if mat.dtype not in (torch.float32, torch.float64):
            mat = mat.float()
        g = torch.Generator(device="cpu").manual_seed(0)
        u = torch.randn(mat.shape[0], generator=g, dtype=torch.float64).to(mat)
        self.register_buffer("_u", F_.normalize(u, dim=0))
        with torch.no_grad():  # converge the vector once so sigma is right from the start
            self._power(mat, 30)

    def _power(self, mat: Tensor, steps: int) -> None:
        u = self._u.to(mat.dtype)
        for _ in range(steps):
            v = F_.normalize(mat.T @ u, dim=0)
            u = F_.normalize(mat @ v, dim=0)
        self._u.copy_(u)

    def sigma(self, weight: Tensor) -> Tensor:
        mat = weight.reshape(weight.shape[0], -1)
        if self.exact:
            return torch.linalg.matrix_norm(mat, ord=2)
        if self.training:
            with torch.no_grad():
                self._power(mat, self.n_power)
        u = self._u.to(mat.dtype)
        v = F_.normalize(mat.T @ u, dim=0).detach()
        return u @ mat @ v  # differentiable in the weight

    def forward(self, weight: Tensor) -> Tensor:
        cache: Optional[Dict[Tuple, Tensor]] = getattr(_LOCAL, "cache", None)
        if cache is not None:
            key = (id(self), torch.is_grad_enabled(), weight._version, weight.data_ptr())
            hit = cache.get(key)
            if hit is not None:
                return hit
        # sigma in at least float32: torch.linalg has no half-precision SVD
        work = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
        s = self.sigma(work)
        scale = self.radius / s
        if self.mode == "clip":
            scale = torch.clamp(scale, max=1.0)
        out = (work * scale).to(weight.dtype)
        if cache is not None:
            cache[key] = out
        return out


def make_contractive(module: nn.Module, radius: float = 0.9, *, method: str = "spectral",
                     names: Optional[Iterable[str]] = None, mode: str = "clip") -> nn.Module:
    """Constrain the weights of ``module``'s ``Linear`` / ``Conv`` layers (in place).

    ``method="spectral"``: each weight's largest singular value is kept ``<= radius``
    (:class:`SpectralScale`). If ``f(z) = phi(W z + ...)`` with a 1-Lipschitz ``phi``
    (tanh, ReLU), ``||W|| <= radius < 1`` makes ``f`` a contraction in ``z`` and plain
    iteration converges. ``method="weight"``: weight normalisation (Salimans & Kingma 2016;
    used by the original DEQ code) -- it stabilises training but guarantees nothing.

    ``names``: only the submodules with these names (e.g. ``["W"]``, the layer acting on
    ``z``); default all. Returns ``module``.

    Example:
        >>> f = make_contractive(nn.Linear(8, 8), radius=0.5)
        >>> bool(torch.linalg.matrix_norm(f.weight, 2) <= 0.5 + 1e-5)
        True
    """
    if method not in ("spectral", "weight"):
        raise ValueError(f"method must be 'spectral' or 'weight', got {method!r}")
    wanted = None if names is None else set(names)
    layers = [(n, m) for n, m in module.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
              and (wanted is None or n in wanted)]
    if not layers:
        hint = f" named {sorted(wanted)}" if wanted else ""
        raise ValueError(f"make_contractive found no Linear/Conv layers{hint} in {type(module).__name__}; "
                         f"available: {[n for n, m in module.named_modules() if n]}")
    if wanted is not None and (missing := wanted - {n for n, _ in layers}):
        raise ValueError(f"no Linear/Conv layer named {sorted(missing)} in {type(module).__name__}")
    for _, layer in layers:
        if method == "spectral":
            parametrize.register_parametrization(layer, "weight", SpectralScale(layer.weight, radius, mode))
        else:
            torch.nn.utils.parametrizations.weight_norm(layer, "weight")
    return module


def jacobian_frobenius(fz: Tensor, z: Tensor, n_samples: int = 1, create_graph: bool = True,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """Hutchinson estimate of ``||J||_F^2`` per sample, ``J = d fz / d z``; returns ``(B,)``.

    ``E_v ||v^T J||^2 = ||J||_F^2`` for ``v ~ N(0, I)`` (Hutchinson 1989). Used as the
    Jacobian regulariser of Bai, Koltun & Kolter (2021): adding ``gamma * mean / D`` of this
    to the loss keeps ``f`` well conditioned so solvers stay fast. ``fz`` must be computed
    from ``z`` with ``z.requires_grad``; ``create_graph=True`` makes it differentiable.

    Example:
        >>> z = torch.randn(2, 3, requires_grad=True); A = torch.randn(3, 3)
        >>> est = jacobian_frobenius(z @ A.T, z, n_samples=2000)
        >>> bool(((est.mean() / A.pow(2).sum()) - 1).abs() < 0.1)
        True
    """
    check_int("n_samples", n_samples, hint="the number of random probe vectors")
    if not isinstance(fz, Tensor) or not isinstance(z, Tensor):
        raise TypeError(f"fz and z must be tensors, got {type(fz).__name__} and {type(z).__name__}")
    if not z.requires_grad:
        raise ValueError("z must require grad and fz must be computed from it: "
                         "z = z.detach().requires_grad_(); fz = f(z, x)")
    if fz.shape != z.shape:
        raise ValueError(f"fz and z must have the same shape, got {tuple(fz.shape)} and {tuple(z.shape)}")
    total = fz.new_zeros(fz.shape[0])
    for _ in range(n_samples):
        v = torch.randn(fz.shape, generator=generator, dtype=fz.dtype).to(fz.device)
        (vjp,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=create_graph)
        total = total + vjp.reshape(vjp.shape[0], -1).pow(2).sum(1)
    return total / n_samples
