"""A small convolutional DEQ classifier with the delta rule in both of its convolutions.

DeltaDEQ (Fig. 2 of the paper) applies the delta rule to the convolutions of DEQ-RAFT. This is
the smallest setting that shows the same thing: an 8x8 digit, one channel, lifted to ``C``
channels, and a fixed point of two 3x3 convolutions::

    u      = conv_x(x)                                   # injection, once per input
    z+     = relu(conv2(relu(conv1(z))) + u)             # conv1, conv2: DeltaConv2d
    logits = head(flatten(z_star))

Each convolution sees the change of its own input (``z`` for ``conv1``, ``relu(conv1(z))``
for ``conv2``), so each has its own sparsity. Two MAC counts per call are kept
(:class:`~deqlite.delta.CallRecord`): ``performed_macs``, where every zero entry of the
change is skipped (the paper's count: each fired entry meets ``C_out`` output channels at
every kernel tap that lands on an output), and ``patch_macs``, where an output position is
skipped only when its whole input patch (all channels, the kernel's window) is zero, which
is what dense hardware can skip in practice (the paper's Fig. 2b).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..delta import DeltaConv2d, delta_mode, mac_summary, reset_all
from ..solvers import SolverTrace, solve
from .._checks import check_int

__all__ = ["ConvDEQ", "ConvDeltaEval", "ConvFit", "evaluate_conv_delta", "fit_conv_deq"]


class ConvDEQ(nn.Module):
    """DEQ classifier ``z+ = relu(conv2(relu(conv1(z))) + conv_x(x))`` on ``size x size``
    single-channel images.

    Args:
        channels: ``C``, channels of the state.
        size: image side length (8 for scikit-learn's digits).
        n_classes: outputs of the linear head.
        init_scale: multiplies the default initialisation of ``conv1`` and ``conv2`` (small
            values start the map contractive).
        seed: seeds the initialisation.

    Shapes: ``x`` ``(B, size * size)`` or ``(B, 1, size, size)`` -> logits ``(B, n_classes)``;
    state ``(B, C, size, size)``.

    Example:
        >>> net = ConvDEQ(channels=4)
        >>> logits, z, trace = net(torch.zeros(3, 64))
        >>> logits.shape, z.shape
        (torch.Size([3, 10]), torch.Size([3, 4, 8, 8]))
    """

    def __init__(self, channels: int = 16, size: int = 8, n_classes: int = 10, *,
                 init_scale: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        for name, v in (("channels", channels), ("size", size), ("n_classes", n_classes)):
            check_int(name, v)
        torch.manual_seed(seed)
        self.channels, self.size = channels, size
        self.inject = nn.Conv2d(1, channels, 3, padding=1)
        self.conv1 = DeltaConv2d(channels, channels, 3, padding=1, enabled=False)
        self.conv2 = DeltaConv2d(channels, channels, 3, padding=1, enabled=False)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.mul_(init_scale)
        self.head = nn.Linear(channels * size * size, n_classes)

    def _image(self, x: Tensor) -> Tensor:
        s = self.size
        if x.dim() == 2 and x.shape[1] == s * s:
            return x.reshape(-1, 1, s, s)
        if x.dim() == 4 and x.shape[1:] == (1, s, s):
            return x
        raise ValueError(f"x must have shape (B, {s * s}) or (B, 1, {s}, {s}), got "
                         f"{tuple(x.shape)}")

    def f(self, z: Tensor, u: Tensor) -> Tensor:
        """One application of the layer, ``(B, C, H, W) -> (B, C, H, W)``."""
        return torch.relu(self.conv2(torch.relu(self.conv1(z))) + u)

    def forward(self, x: Tensor, *, solver: str = "picard", tol: float = 1e-3,
                max_iter: int = 40, **solver_options: Any) -> tuple[Tensor, Tensor, SolverTrace]:
        """Solve for the fixed point (no gradients) and read it out; with autograd on, one
        more application of ``f`` carries the gradient (Jacobian-free backward).

        Returns ``(logits, z_star, trace)``.
        """
        img = self._image(x)
        u = self.inject(img)
        reset_all(self, records=False)
        with torch.no_grad():
            z0 = torch.zeros_like(u)
            z_star, trace = solve(lambda z: self.f(z, u), z0, solver=solver, tol=tol,
                                  max_iter=max_iter, on_failure="ignore", **solver_options)
        z = self.f(z_star, u) if torch.is_grad_enabled() else z_star
        return self.head(z.flatten(1)), z_star, trace

    def fixed_macs(self, batch: int) -> int:
        """MACs done once per input, outside the iteration (injection and head)."""
        s2 = self.size * self.size
        return batch * (s2 * self.channels * 9 + s2 * self.channels
                        + self.head.in_features * self.head.out_features + self.head.out_features)


@dataclass
class ConvFit:
    """History of :func:`fit_conv_deq`: loss and solver evaluations per step, seconds."""

    loss: list[float] = field(default_factory=list)
    nfe: list[int] = field(default_factory=list)
    seconds: float = 0.0


def fit_conv_deq(model: ConvDEQ, x: Tensor, y: Tensor, *, steps: int = 40, lr: float = 5e-3,
                 batch: int = 256, seed: int = 0, **solve_kw: Any) -> ConvFit:
    """Train with Adam on mini-batches (cross-entropy, Jacobian-free backward)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    check_int("steps", steps)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    res = ConvFit()
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
        logits, _, trace = model(x[idx], **solve_kw)
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        res.loss.append(float(loss.detach()))
        res.nfe.append(trace.nfe)
    model.eval()
    res.seconds = time.perf_counter() - t0
    return res


@dataclass
class ConvDeltaEval:
    """One inference of a :class:`ConvDEQ` (see :func:`evaluate_conv_delta`).

    Attributes:
        threshold: the delta threshold (None: dense).
        accuracy: fraction of correct labels.
        iterations: solver evaluations.
        dense_macs, performed_macs, patch_macs: MACs of the two convolutions in those
            iterations: dense, element-level delta count, patch-level delta count
            (subtractions not included; see ``sub_ops``).
        sub_ops: subtractions of the delta rule.
        per_layer: ``{name: {"sparsity": fraction of change entries skipped after the first
            call, "reduction": 1 - performed / dense}}``.
        fixed_macs: injection and head MACs.
    """

    threshold: float | None
    accuracy: float
    iterations: int
    dense_macs: int
    performed_macs: int
    patch_macs: int
    sub_ops: int
    per_layer: dict[str, dict[str, float]]
    fixed_macs: int
    trace: SolverTrace

    def reduction_vs(self, dense: ConvDeltaEval, *, patch: bool = False) -> float:
        """1 - (MACs + subtractions + fixed MACs) / the dense run's total."""
        own = (self.patch_macs if patch else self.performed_macs) + self.sub_ops + self.fixed_macs
        return 1.0 - own / (dense.performed_macs + dense.fixed_macs)


def evaluate_conv_delta(model: ConvDEQ, x: Tensor, y: Tensor, threshold: float | None, *,
                        memory: str = "reset", solver: str = "picard", tol: float = 1e-3,
                        max_iter: int = 40) -> ConvDeltaEval:
    """Classify ``x`` once (no gradients) with the delta rule at ``threshold`` (None: dense)
    and count the MACs of the iteration per layer."""
    model.eval()
    # threshold None: dense, recording MACs the same way, even inside someone else's delta block
    with torch.no_grad(), delta_mode(model, threshold, memory=memory):
        logits, _, trace = model(x, solver=solver, tol=tol, max_iter=max_iter)
    s = mac_summary(model)
    per_layer = {}
    for name, layer in (("conv1", model.conv1), ("conv2", model.conv2)):
        rest = [r for r in layer.records if not r.dense_call]
        skipped = 1 - sum(r.active for r in rest) / max(sum(r.numel for r in rest), 1)
        d = sum(r.dense_macs for r in layer.records)
        per_layer[name] = {"sparsity": skipped if rest else 0.0,
                           "reduction": 1 - sum(r.performed_macs for r in layer.records) / d,
                           "patch_reduction": 1 - sum(r.patch for r in layer.records) / d}
    patch = sum(r.patch for layer in (model.conv1, model.conv2) for r in layer.records)
    acc = float((logits.argmax(dim=1) == y).float().mean())
    return ConvDeltaEval(threshold, acc, trace.nfe, s.total_dense, int(s.performed.sum()), patch,
                         int(s.sub_ops.sum()), per_layer, model.fixed_macs(x.shape[0]), trace)
