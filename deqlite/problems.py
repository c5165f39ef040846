"""Fixed-point problems with known behaviour, shared by the tests, the benchmarks and the book.

Each builder takes a seed and returns a :class:`Problem`: the map ``f(z)`` (input already
injected), a starting point ``z0`` and, where it is known in closed form, ``z_star``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn


@dataclass
class Problem:
    name: str
    f: Callable[[Tensor], Tensor]
    z0: Tensor
    z_star: Optional[Tensor] = None
    description: str = ""


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spectral_rescale(W: Tensor, radius: float) -> Tensor:
    """``W`` rescaled to spectral norm ``radius``."""
    return W * (radius / torch.linalg.matrix_norm(W, ord=2))


def affine(D: int = 16, B: int = 4, rho: float = 0.8, seed: int = 0,
           dtype: torch.dtype = torch.float64) -> Problem:
    """``f(z) = A z + c`` with ``||A||_2 = rho < 1``; ``z_star = (I - A)^{-1} c``."""
    g = _gen(seed)
    A = spectral_rescale(torch.randn(D, D, generator=g, dtype=dtype), rho)
    c = torch.randn(B, D, generator=g, dtype=dtype)
    z_star = torch.linalg.solve(torch.eye(D, dtype=dtype) - A, c.T).T
    return Problem("affine", lambda z: z @ A.T + c, torch.zeros(B, D, dtype=dtype), z_star,
                   f"affine contraction, ||A|| = {rho}")


def cosine(B: int = 3, dtype: torch.dtype = torch.float64) -> Problem:
    """``f(z) = cos(z)``, fixed point 0.739085... (the Dottie number)."""
    z_star = torch.full((B, 1), 0.7390851332151607, dtype=dtype)
    return Problem("cos", torch.cos, torch.zeros(B, 1, dtype=dtype), z_star, "cos(z)")


def tanh_layer(D: int = 256, B: int = 64, rho: float = 0.9, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Problem:
    """``f(z) = tanh(W z + U x + b)``, ``W`` Gaussian rescaled to spectral norm ``rho``,
    ``U`` Gaussian / sqrt(D), ``x ~ N(0, 1)``, ``b ~ N(0, 0.01)`` (problem name ``"P1"`` in
    the solver benchmark)."""
    g = _gen(seed)
    W = spectral_rescale(torch.randn(D, D, generator=g, dtype=torch.float64), rho).to(dtype)
    U = (torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5).to(dtype)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    b = (0.1 * torch.randn(D, generator=g, dtype=torch.float64)).to(dtype)
    inj = x @ U.T + b  # the input injection does not change during a solve
    return Problem("P1", lambda z: torch.tanh(z @ W.T + inj), torch.zeros(B, D, dtype=dtype),
                   None, f"tanh(Wz + Ux + b), ||W|| = {rho}")


def _orthogonal(D: int, g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def expansive_tanh(D: int = 256, B: int = 64, scale: float = 1.5, averaged: bool = True,
                   seed: int = 0, dtype: torch.dtype = torch.float32) -> Problem:
    """With ``averaged=True``, ``f(z) = z + 0.5 (tanh(W z + U x + b) - z)`` with ``W`` = 1.5 x
    a random orthogonal matrix; with ``averaged=False`` the plain ``tanh(W z + U x + b)``,
    where plain iteration stalls (``W`` is expansive). Problem names ``"P2"`` and ``"P2b"`` in
    the solver benchmark."""
    g = _gen(seed)
    W = (scale * _orthogonal(D, g)).to(dtype)
    U = (torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5).to(dtype)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    b = (0.1 * torch.randn(D, generator=g, dtype=torch.float64)).to(dtype)
    inj = x @ U.T + b
    if averaged:
        f = lambda z: z + 0.5 * (torch.tanh(z @ W.T + inj) - z)  # noqa: E731
        name = "P2"
    else:
        f = lambda z: torch.tanh(z @ W.T + inj)  # noqa: E731
        name = "P2b"
    return Problem(name, f, torch.zeros(B, D, dtype=dtype), None,
                   f"{'averaged ' if averaged else ''}tanh with W = {scale} x orthogonal")


def conv_groupnorm(B: int = 32, C: int = 16, H: int = 8, seed: int = 0, w_std: float = 0.06,
                   dtype: torch.dtype = torch.float32) -> Problem:
    """``f(z) = relu(GroupNorm(4, C)(conv3x3(z) + conv3x3(x)))`` on ``(B, C, H, H)`` states,
    the z-convolution's weights ``~ N(0, w_std^2)``, ``x ~ N(0, 1)`` (problem name ``"P3"`` in
    the solver benchmark)."""
    g = _gen(seed)
    conv_z = nn.Conv2d(C, C, 3, padding=1, bias=False).to(dtype)
    conv_x = nn.Conv2d(C, C, 3, padding=1).to(dtype)
    norm = nn.GroupNorm(4, C).to(dtype)
    with torch.no_grad():
        conv_z.weight.copy_(w_std * torch.randn(conv_z.weight.shape, generator=g, dtype=torch.float64))
        bound = 1.0 / (C * 9) ** 0.5
        conv_x.weight.copy_((torch.rand(conv_x.weight.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
        conv_x.bias.copy_((torch.rand(conv_x.bias.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
    x = torch.randn(B, C, H, H, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        inj = conv_x(x)

    def f(z: Tensor) -> Tensor:
        return torch.relu(norm(conv_z(z) + inj))

    return Problem("P3", f, torch.zeros(B, C, H, H, dtype=dtype), None,
                   "relu(GroupNorm(conv3x3(z) + conv3x3(x)))")


def rotation_map(B: int = 1, theta: float = 1.2, radius: float = 1.02,
                 dtype: torch.dtype = torch.float64) -> Problem:
    """A 2-D map ``f(z) = R z + c`` where ``R`` rotates by ``theta`` and scales by ``radius``.

    With ``radius >= 1`` plain iteration spirals away, yet the fixed point ``(I - R)^{-1} c``
    exists and Anderson, Broyden and Newton find it (the map is affine)."""
    c, s = torch.cos(torch.tensor(theta, dtype=dtype)), torch.sin(torch.tensor(theta, dtype=dtype))
    R = radius * torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    off = torch.tensor([[1.0, 0.5]], dtype=dtype).expand(B, 2)
    z_star = torch.linalg.solve(torch.eye(2, dtype=dtype) - R, off.T).T
    return Problem("rotation", lambda z: z @ R.T + off, torch.zeros(B, 2, dtype=dtype), z_star,
                   f"rotation by {theta} rad, scale {radius}")
