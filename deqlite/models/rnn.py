"""The tiny recurrent cell behind DeltaDEQ's Fig. 1 (App. A.1 of the DeltaDEQ paper).

A 20-unit tanh RNN cell is iterated ``n_iter = 15`` times on a constant scalar input and read
out linearly; it is fitted to ``sin(x)`` on 200 points in [-2 pi, 2 pi]. Iterating a cell on a
constant input is a (truncated) fixed-point iteration, so its hidden trajectories show how the
state's dimensions settle at different speeds (heterogeneous convergence)::

    h_0 = 0,   h_{t+1} = tanh(W h_t + U x + b),   y_t = V h_t + c
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..delta import DeltaLinear
from .._checks import check_int

__all__ = ["SineFit", "SineRNN", "fit_sine_rnn", "sine_data"]


def sine_data(n_points: int = 200, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``(x, sin(x))`` on ``n_points`` evenly spaced points of [-2 pi, 2 pi], each ``(N, 1)``."""
    check_int("n_points", n_points, lo=2)
    x = torch.linspace(-2 * math.pi, 2 * math.pi, n_points, dtype=dtype).unsqueeze(1)
    return x, torch.sin(x)


class SineRNN(nn.Module):
    """The RNN cell of DeltaDEQ's Fig. 1; the recurrent layer ``W`` is a
    :class:`deqlite.delta.DeltaLinear` (dense unless enabled).

    Args:
        hidden: number of hidden units (20 in the paper).
        seed: seeds the initialisation.

    Shapes: ``x`` ``(B, 1)``; ``forward`` returns ``(B, 1)`` after ``n_iter`` steps, and with
    ``return_trajectory=True`` also the hidden states ``(n_iter + 1, B, hidden)`` from ``h_0``.

    Example:
        >>> net = SineRNN()
        >>> y, traj = net(torch.zeros(3, 1), n_iter=4, return_trajectory=True)
        >>> y.shape, traj.shape
        (torch.Size([3, 1]), torch.Size([5, 3, 20]))
    """

    def __init__(self, hidden: int = 20, seed: int = 0) -> None:
        super().__init__()
        check_int("hidden", hidden)
        torch.manual_seed(seed)
        self.hidden = hidden
        self.inp = nn.Linear(1, hidden)
        self.rec = DeltaLinear(hidden, hidden, bias=False, enabled=False)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, n_iter: int = 15, return_trajectory: bool = False):
        if x.dim() != 2 or x.shape[1] != 1:
            raise ValueError(f"x must have shape (B, 1), got {tuple(x.shape)}; use x.reshape(-1, 1)")
        check_int("n_iter", n_iter)
        u = self.inp(x)  # (B, H): the constant input drive
        h = torch.zeros(x.shape[0], self.hidden, dtype=u.dtype, device=u.device)
        self.rec.reset()
        states = [h]
        for _ in range(n_iter):
            h = torch.tanh(self.rec(h) + u)
            states.append(h)
        y = self.readout(h)
        return (y, torch.stack(states)) if return_trajectory else y

    def outputs(self, x: Tensor, n_iter: int = 15) -> Tensor:
        """The read-out after every step, ``(n_iter, B, 1)``: how the prediction evolves."""
        with torch.no_grad():
            _, traj = self(x, n_iter, return_trajectory=True)
            return self.readout(traj[1:])


@dataclass
class SineFit:
    """Loss per epoch and the largest singular value of ``W`` at the end."""

    losses: list[float] = field(default_factory=list)
    sigma_max: float = float("nan")


def fit_sine_rnn(model: SineRNN, *, n_points: int = 200, epochs: int = 600, lr: float = 0.01,
                 n_iter: int = 15, penalty: float = 1.0, seed: int = 0) -> SineFit:
    """Fit ``model`` to ``sin(x)`` (full batch, Adam), as in DeltaDEQ App. A.1.

    The loss adds ``penalty * relu(sigma_max(W) - 1)^2``, which keeps the recurrent weight's
    largest singular value near or below 1 so the iteration stays stable.
    """
    check_int("epochs", epochs)
    torch.manual_seed(seed)
    x, y = sine_data(n_points)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    fit = SineFit()
    model.train()
    for _ in range(epochs):
        pred = model(x, n_iter)
        sigma = torch.linalg.matrix_norm(model.rec.weight, ord=2)
        loss = F.mse_loss(pred, y) + penalty * F.relu(sigma - 1.0) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fit.losses.append(loss.item())
    model.eval()
    fit.sigma_max = float(torch.linalg.matrix_norm(model.rec.weight.detach(), ord=2))
    return fit
