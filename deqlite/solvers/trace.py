"""What a solve records: :class:`SolverTrace` (one row per step) and :class:`StepInfo`
(what a per-step callback receives)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["SolverTrace", "StepInfo"]


@dataclass
class StepInfo:
    """What a per-step ``callback`` receives. ``z`` is the iterate, ``fz = f(z)``."""

    step: int
    z: Tensor
    fz: Tensor
    abs_residual: Tensor  # (B,)
    rel_residual: Tensor  # (B,)
    nfe: int


@dataclass
class SolverTrace:
    """Record of one solve: one row per step actually taken (no padding).

    Row ``k`` holds the residuals of iterate ``z_k``, whose evaluation ``f(z_k)`` was the
    ``k+1``-th function evaluation. ``abs_residual`` and ``rel_residual`` are ``(T, B)``.
    """

    abs_residual: Tensor
    rel_residual: Tensor
    nfe: int
    converged: Tensor  # (B,) bool: the returned iterate meets tol
    status: str
    solver: str
    stop: str
    tol: float
    wall_time: float
    best_step: Tensor  # (B,) long: row of the returned iterate
    diverged: Tensor  # (B,) bool: a non-finite value appeared for this sample
    iterates: Optional[List[Tensor]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return int(self.abs_residual.shape[0])

    def __len__(self) -> int:
        return self.n_steps

    @property
    def residual(self) -> Tensor:
        """The ``(T, B)`` residual used for stopping (``abs`` or ``rel``)."""
        return self.rel_residual if self.stop == "rel" else self.abs_residual

    @property
    def best_residual(self) -> Tensor:
        """``(B,)`` stopping residual of the returned iterate."""
        idx = self.best_step.clamp_min(0).unsqueeze(0)
        return self.residual.gather(0, idx).squeeze(0)

    @property
    def ok(self) -> bool:
        return self.status == "converged"

    def steps_to(self, tol: float, kind: Optional[str] = None) -> Tensor:
        """``(B,)`` number of function evaluations until the residual first met ``tol``
        (``-1`` where it never did)."""
        res = self.residual if kind is None else self._pick(kind)
        hit = res <= tol  # (T, B)
        first = torch.where(hit.any(0), hit.float().argmax(0) + 1, torch.full_like(hit[0], -1, dtype=torch.long))
        return first.long()

    def batch_residual(self, kind: Optional[str] = None) -> Tensor:
        """``(T,)`` residual of the whole batch taken as one vector (``||F - Z|| / ||F||``
        over all samples), the measure reference DEQ code (and TorchDEQ) stops on."""
        kind = kind or self.stop
        abs_b = self.abs_residual.pow(2).sum(1).sqrt()
        if kind == "abs":
            return abs_b
        f_norm = self.abs_residual / self.rel_residual.clamp_min(torch.finfo(self.rel_residual.dtype).tiny)
        return abs_b / f_norm.pow(2).sum(1).sqrt()

    def _pick(self, kind: str) -> Tensor:
        if kind not in ("abs", "rel"):
            raise ValueError(f"kind must be 'abs' or 'rel', got {kind!r}")
        return self.abs_residual if kind == "abs" else self.rel_residual

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python / numpy version, for plotting and JSON."""
        out: Dict[str, Any] = {
            "abs_residual": self.abs_residual.detach().cpu().numpy(),
            "rel_residual": self.rel_residual.detach().cpu().numpy(),
            "nfe": self.nfe,
            "n_steps": self.n_steps,
            "converged": self.converged.cpu().numpy(),
            "diverged": self.diverged.cpu().numpy(),
            "status": self.status,
            "solver": self.solver,
            "stop": self.stop,
            "tol": self.tol,
            "wall_time": self.wall_time,
            "best_step": self.best_step.cpu().numpy(),
        }
        if self.iterates is not None:
            out["iterates"] = torch.stack(self.iterates).detach().cpu().numpy()
        out.update(self.extra)
        return out

    def summary(self) -> str:
        worst = self.best_residual.max().item() if self.n_steps else float("nan")
        return (f"{self.solver}: {self.status} after {self.n_steps} steps ({self.nfe} f-evals), "
                f"worst {self.stop} residual {worst:.2e} (tol {self.tol:g}), "
                f"{int(self.converged.sum())}/{self.converged.numel()} samples converged, "
                f"{self.wall_time * 1e3:.1f} ms")

    def __repr__(self) -> str:
        return f"SolverTrace({self.summary()})"
