"""Fixed-point solvers and the one loop that runs them.

A *solver* only proposes the next iterate. The loop in :func:`solve` owns everything
else: evaluating ``f`` once per step, the residuals, per-sample stopping, best-so-far
tracking, divergence detection and the :class:`SolverTrace`. So every solver stops,
fails and reports the same way, and a new solver is ~30 lines (see :class:`Picard`).

Residuals follow one definition everywhere (per sample, flattened over trailing dims)::

    abs = ||f(z) - z||        rel = abs / ||f(z)||
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "solve", "SolverTrace", "StepInfo", "Solver", "Picard", "KrasnoselskiiMann", "Anderson",
    "Broyden", "Newton", "register_solver", "get_solver", "available_solvers",
    "ConvergenceError", "SOLVERS",
]

SOLVERS: Dict[str, Type["Solver"]] = {}
# solvers defined in modules that ``import deqlite`` does not load eagerly: the name is known
# from the start, and its module is imported the first time the name is asked for
_DEFERRED: Dict[str, str] = {"hyper": "deqlite.hyper"}
STATUSES = ("converged", "max_iter", "diverged")


class ConvergenceError(RuntimeError):
    """Raised by :func:`solve` with ``on_failure="raise"`` when a solve does not converge."""

    def __init__(self, message: str, trace: "SolverTrace"):
        super().__init__(message)
        self.trace = trace


def register_solver(name: str) -> Callable[[Type["Solver"]], Type["Solver"]]:
    """Class decorator: make a :class:`Solver` subclass available to ``solve(..., solver=name)``."""

    def wrap(cls: Type[Solver]) -> Type[Solver]:
        if not (isinstance(cls, type) and issubclass(cls, Solver)):
            raise TypeError(f"register_solver expects a Solver subclass, got {cls!r}")
        SOLVERS[name] = cls
        cls.name = name
        return cls

    return wrap


def available_solvers() -> List[str]:
    """Names accepted by ``solve(..., solver=...)``."""
    return sorted(set(SOLVERS) | set(_DEFERRED))


def _lookup(name: str) -> Type["Solver"]:
    if name not in SOLVERS and name in _DEFERRED:
        import importlib

        importlib.import_module(_DEFERRED[name])  # registers the name
    return SOLVERS[name]


# --------------------------------------------------------------------------------------
# the trace
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# solvers: small immutable objects holding only hyperparameters
# --------------------------------------------------------------------------------------


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two (B, n) tensors -> (B,)."""
    return (a * b).sum(-1)


@dataclass(frozen=True)
class Solver:
    """Base class. A solver proposes ``z_{k+1}`` from ``z_k`` and ``f(z_k)``.

    Subclasses implement ``init(z0) -> state`` and ``step(f, z, fz, state) -> (z_next, state)``.
    States and iterates inside ``step`` are flattened to ``(B, n)``; ``f`` also takes and
    returns ``(B, n)`` there.
    """

    name: ClassVar[str] = "solver"
    evals_per_step: ClassVar[int] = 1

    def init(self, z0: Tensor) -> Any:
        return None

    def step(self, f: Callable[[Tensor], Tensor], z: Tensor, fz: Tensor, state: Any) -> Tuple[Tensor, Any]:
        raise NotImplementedError

    def step_residual(self, f: Callable[[Tensor], Tensor], z: Tensor, fz: Tensor, g: Tensor,
                      state: Any) -> Tuple[Tensor, Any]:
        """``step`` when the loop already holds the residual ``g = fz - z`` (B, n).
        Solvers that need ``g`` override this to save a pass over the state; the default
        ignores ``g`` and calls ``step``."""
        return self.step(f, z, fz, state)

    @classmethod
    def options(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]


@register_solver("picard")
@dataclass(frozen=True)
class Picard(Solver):
    """Plain fixed-point iteration ``z_{k+1} = f(z_k)``. Converges when ``f`` is a contraction."""

    def step(self, f, z, fz, state):
        return fz, state


@register_solver("km")
@dataclass(frozen=True)
class KrasnoselskiiMann(Solver):
    """Damped (Krasnoselskii-Mann) iteration ``z_{k+1} = (1 - beta) z_k + beta f(z_k)``.

    ``beta`` in (0, 1]; ``beta = 1`` is Picard. Damping turns a non-expansive or mildly
    expansive map with an attracting fixed point into one plain iteration can follow.
    """

    beta: float = 0.5

    def __post_init__(self):
        _check_range("beta", self.beta, 0.0, 1.0, low_open=True)

    def step(self, f, z, fz, state):
        return torch.lerp(z, fz, self.beta), state


@register_solver("anderson")
@dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration (type II) with memory ``m`` (Walker & Ni 2011; Alg. 1 of
    Bai, Koltun & Kolter 2022).

    Keeps the last ``m`` pairs ``(z_i, f(z_i))``, finds weights ``alpha`` (sum 1) minimising
    ``||sum_i alpha_i g(z_i)||`` with ``g = f - id``, and mixes
    ``z_{k+1} = beta * sum alpha_i f(z_i) + (1 - beta) * sum alpha_i z_i``.

    The weights solve the bordered system ``[[0, 1^T], [1, G G^T + lam I]] [nu, alpha] = [1, 0]``.
    The ridge ``lam = ridge * mean_i ||g_i||^2`` is scaled to the residual size: a fixed ridge
    (``1e-4`` in the 2019 reference code) swamps ``G G^T`` once residuals fall below ~1e-2
    and stalls convergence. Pass ``scale_ridge=False`` to see that happen.
    """

    m: int = 5
    beta: float = 1.0
    ridge: float = 1e-4
    scale_ridge: bool = True

    def __post_init__(self):
        _check_int_min("m", self.m, 1)
        _check_range("beta", self.beta, 0.0, 1.0, low_open=True)
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge!r}")

    def init(self, z0):
        return {"X": None, "F": None, "G": None, "H": None, "k": 0}

    def step(self, f, z, fz, state):
        return self.step_residual(f, z, fz, fz - z, state)

    def step_residual(self, f, z, fz, g, state):
        if torch.is_grad_enabled():
            # autograd runs through the iterations (``unrolled``): re-stack, never write in place
            keep = self.m - 1
            X, F, G = (_push(state[k], v, keep) for k, v in (("X", z), ("F", fz), ("G", g)))
            h, newest = X.shape[1], X.shape[1] - 1
            dots = (G * g.unsqueeze(1)).sum(-1).double()  # (B, h)
            H_old = state["H"]
            if H_old is None or h == 1:
                H = dots.unsqueeze(-1)
            else:
                prev = H_old[:, -(h - 1):, -(h - 1):]
                H = torch.cat([torch.cat([prev, dots[:, :-1, None]], 2), dots[:, None, :]], 1)
            state = {"X": X, "F": F, "G": G, "H": H, "k": state["k"] + 1}
            if h == 1:  # nothing to mix yet: a (damped) plain step
                return torch.lerp(z, fz, self.beta), state
            alpha = self._weights(H, newest).to(z.dtype).unsqueeze(-1)  # (B, h, 1)
        else:
            # a ring buffer written in place: one (B, n) copy per step instead of re-stacking
            # the whole history (Anderson's weights do not depend on the order of the pairs)
            # (allocated once and reused by every step; the iterates z_i are kept only when
            # beta < 1 needs them)
            k, m = state["k"], self.m
            if state["F"] is None:
                B, n = z.shape
                state["F"], state["G"] = z.new_empty(B, m, n), z.new_empty(B, m, n)
                state["X"] = z.new_empty(B, m, n) if self.beta != 1.0 else None
                state["H"] = np.zeros((B, m, m))  # float64, on the host (see _weights_host)
            newest, h = k % m, min(k + 1, m)
            state["F"][:, newest], state["G"][:, newest] = fz, g
            if state["X"] is not None:
                state["X"][:, newest] = z
            F, G = state["F"][:, :h], state["G"][:, :h]
            X = state["X"][:, :h] if state["X"] is not None else None
            # Gram matrix H_ij = <g_i, g_j>, one new row per step, as a row-vector product
            # (B, 1, n) @ (B, n, h): no (B, h, n) temporary (42 MB at B=64, m=20, n=8192;
            # this layout is also the fast one for small states on CPU); float64 so float32
            # states cannot make the small system singular; kept on the host with the solve
            dots = torch.bmm(g.unsqueeze(1), G.transpose(1, 2)).squeeze(1).double().cpu().numpy()  # (B, h)
            state["H"][:, newest, :h] = dots
            state["H"][:, :h, newest] = dots
            H = state["H"][:, :h, :h]
            state["k"] = k + 1
            if h == 1:  # nothing to mix yet: a (damped) plain step
                return torch.lerp(z, fz, self.beta), state
            alpha = torch.from_numpy(self._weights_host(H, newest)).to(device=z.device, dtype=z.dtype)
            alpha = alpha.unsqueeze(1)  # (B, 1, h): mix as (B, 1, h) @ (B, h, n), no temporary
            mixed_f = torch.bmm(alpha, F).squeeze(1)
            if self.beta == 1.0:
                return mixed_f, state
            return torch.lerp(torch.bmm(alpha, X).squeeze(1), mixed_f, self.beta), state
        mixed_f = (alpha * F).sum(1)
        if self.beta == 1.0:
            return mixed_f, state
        mixed_z = (alpha * X).sum(1)
        return torch.lerp(mixed_z, mixed_f, self.beta), state

    def _weights_host(self, H: np.ndarray, newest: int) -> np.ndarray:
        """:meth:`_weights` for a float64 host array ``H`` (B, h, h) (no autograd): the
        system is a few numbers per sample, so numpy's LAPACK call costs far less than the
        dozen tiny tensor operations (kernel launches on a GPU) of the tensor version; on a
        GPU it costs one (B, h) transfer each way."""
        B, h, _ = H.shape
        diag = np.diagonal(H, axis1=1, axis2=2)  # ||g_i||^2
        if self.scale_ridge:
            lam = self.ridge * np.maximum(diag.mean(-1, keepdims=True), np.finfo(np.float64).tiny)
        else:
            lam = np.full((B, 1), float(self.ridge))
        A = H.copy()
        r = np.arange(h)
        A[:, r, r] = diag + lam
        with np.errstate(all="ignore"):
            try:
                y = np.linalg.solve(A, np.ones((B, h, 1)))[..., 0]
                bad = np.zeros(B, dtype=bool)
            except np.linalg.LinAlgError:  # a singular sample (only with ridge=0): per-sample info
                yt, info = torch.linalg.solve_ex(torch.from_numpy(A), torch.ones(B, h, dtype=torch.float64))
                y, bad = yt.numpy(), (info != 0).numpy()
            alpha = y / y.sum(-1, keepdims=True)
        bad = bad | ~np.isfinite(alpha).all(-1)
        if bad.any():  # singular (only possible with ridge=0): take the newest pair
            alpha[bad] = 0.0
            alpha[bad, newest] = 1.0
        return alpha

    def _weights(self, H: Tensor, newest: int) -> Tensor:
        """``alpha`` (B, h), summing to one, minimising ``||sum_i alpha_i g_i||^2`` + ridge."""
        diag = torch.diagonal(H, dim1=1, dim2=2)  # ||g_i||^2
        if self.scale_ridge:
            lam = self.ridge * diag.mean(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        else:
            lam = torch.full_like(diag[:, :1], self.ridge)
        # min alpha^T (H + lam I) alpha s.t. sum(alpha) = 1 has the solution alpha = y / sum(y)
        # with (H + lam I) y = 1: the bordered system [[0, 1^T], [1, H + lam I]], eliminated
        y, info = torch.linalg.solve_ex(torch.diagonal_scatter(H, diag + lam, dim1=1, dim2=2),
                                        torch.ones_like(diag))
        alpha = y / y.sum(-1, keepdim=True)
        bad = (info != 0) | ~torch.isfinite(alpha).all(-1)
        if bool(bad.any()):  # singular (only possible with ridge=0): take the newest pair
            fallback = torch.zeros_like(alpha)
            fallback[:, newest] = 1.0
            alpha = torch.where(bad[:, None], fallback, alpha)
        return alpha


def _push(hist: Optional[Tensor], new: Tensor, keep: int) -> Tensor:
    """Append ``new`` (B, n) to a (B, h, n) history, keeping the last ``keep`` old entries."""
    if hist is None or keep == 0:
        return new.unsqueeze(1)
    return torch.cat([hist[:, -keep:], new.unsqueeze(1)], 1)


@register_solver("broyden")
@dataclass(frozen=True)
class Broyden(Solver):
    """Limited-memory ("good") Broyden's method on ``g(z) = f(z) - z``.

    Keeps a low-rank approximation of the inverse Jacobian of ``g``, starting from
    ``-I`` (so the first step is plain iteration) and applying Sherman-Morrison rank-one
    updates ``H <- H + (dz - H dg) dz^T H / (dz^T H dg)``; the step is ``z <- z - H g``.
    ``m`` caps the number of stored updates (the oldest is dropped; with a short memory
    on hard problems this can destabilise the iteration, so the default keeps 100).
    ``alpha`` scales the step (1 = full Broyden step).
    """

    m: int = 100
    alpha: float = 1.0

    def __post_init__(self):
        _check_int_min("m", self.m, 1)
        _check_range("alpha", self.alpha, 0.0, 1.0, low_open=True)

    def init(self, z0):
        B, n = z0.shape
        return {"U": z0.new_zeros(B, 0, n), "V": z0.new_zeros(B, 0, n), "z": None, "g": None}

    @staticmethod
    def _apply(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
        """H x with H = -I + sum_j u_j v_j^T, for (B, n) x."""
        if U.shape[1] == 0:
            return -x
        return -x + torch.bmm(torch.bmm(x.unsqueeze(1), V.transpose(1, 2)), U).squeeze(1)

    @staticmethod
    def _apply_t(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
        """x^T H, for (B, n) x."""
        if U.shape[1] == 0:
            return -x
        return -x + torch.bmm(torch.bmm(x.unsqueeze(1), U.transpose(1, 2)), V).squeeze(1)

    def step(self, f, z, fz, state):
        return self.step_residual(f, z, fz, fz - z, state)

    def step_residual(self, f, z, fz, g, state):
        if not torch.is_grad_enabled():
            return self._step_buffered(z, g, state)
        U, V = state["U"], state["V"]
        if state["z"] is not None:
            u, vT = self._update(U, V, z - state["z"], g - state["g"])
            U = torch.cat([U, u.unsqueeze(1)], 1)[:, -self.m:]
            V = torch.cat([V, vT.unsqueeze(1)], 1)[:, -self.m:]
        state = {"U": U, "V": V, "z": z, "g": g}
        return z - self.alpha * self._apply(U, V, g), state

    def _update(self, U: Tensor, V: Tensor, dz: Tensor, dg: Tensor) -> Tuple[Tensor, Tensor]:
        """The rank-one term ``u vT`` of the good-Broyden update of ``H`` for the step
        ``dz`` and the residual change ``dg`` (both (B, n)); ``u = 0`` where
        ``dz^T H dg`` vanishes (the update would divide by zero)."""
        vT = self._apply_t(U, V, dz)  # dz^T H, (B, n)
        denom = _bdot(vT, dg)  # dz^T H dg, (B,)
        u = dz - self._apply(U, V, dg)
        ok = denom.abs() > 1e-30 * (dz.norm(dim=-1) * dg.norm(dim=-1)).clamp_min(1e-300)
        safe = torch.where(ok, denom, torch.ones_like(denom))
        return torch.where(ok[:, None], u / safe[:, None], torch.zeros_like(u)), vT

    def _step_buffered(self, z, g, state):
        """The same update without autograd: the ``m`` pairs live in buffers allocated
        once and written in place (a ring once full: ``H`` is a sum, so the order of the
        pairs does not matter), instead of a concatenation that copies the whole memory
        every step."""
        if "Ub" not in state:
            B, n = z.shape
            state["Ub"], state["Vb"] = z.new_empty(B, self.m, n), z.new_empty(B, self.m, n)
            state["count"] = 0
        h = min(state["count"], self.m)
        U, V = state["Ub"][:, :h], state["Vb"][:, :h]
        if state["z"] is not None:
            u, vT = self._update(U, V, z - state["z"], g - state["g"])
            slot = state["count"] % self.m
            state["Ub"][:, slot], state["Vb"][:, slot] = u, vT
            state["count"] += 1
            h = min(state["count"], self.m)
            U, V = state["Ub"][:, :h], state["Vb"][:, :h]
        state["z"], state["g"] = z, g
        return z - self.alpha * self._apply(U, V, g), state


@register_solver("newton")
@dataclass(frozen=True)
class Newton(Solver):
    """Newton's method on ``g(z) = f(z) - z`` with the exact Jacobian from autograd.

    Each step builds the per-sample Jacobian ``J_f`` (``n`` vector-Jacobian products,
    recorded in the trace as ``jacobian_evals``) and solves ``(J_f - I) dz = -g``.
    Quadratic convergence near the fixed point, at ``O(n^2)`` memory and ``O(n^3)`` work
    per step: it is here to teach, for states up to ``max_dim`` entries. Assumes the
    samples of a batch do not interact inside ``f``.
    """

    max_dim: int = 1024

    def __post_init__(self):
        _check_int_min("max_dim", self.max_dim, 1)

    def init(self, z0):
        if z0.shape[1] > self.max_dim:
            raise ValueError(
                f"newton builds the full ({z0.shape[1]} x {z0.shape[1]}) Jacobian per sample; "
                f"the state has {z0.shape[1]} entries > max_dim={self.max_dim}. Use "
                f"solver='broyden' (its low-rank cousin) or raise max_dim.")
        return {"jacobian_evals": 0}

    def step(self, f, z, fz, state):
        B, n = z.shape
        with torch.enable_grad():
            zr = z.detach().requires_grad_(True)
            fzr = f(zr)
            eye = torch.eye(n, dtype=z.dtype, device=z.device)
            # rows: d f_i / d z for each output coordinate i, all samples at once
            (jac,) = torch.autograd.grad(
                fzr, zr, grad_outputs=eye.unsqueeze(1).expand(n, B, n).contiguous(),
                is_grads_batched=True)  # (n, B, n): jac[i, b, j] = d f_bi / d z_bj
        state["jacobian_evals"] += 1
        J = jac.permute(1, 0, 2)  # (B, n, n)
        g = (fz - z).unsqueeze(-1)
        A = J - eye
        finite = torch.isfinite(A).flatten(1).all(1)  # (B,)
        A = torch.where(finite[:, None, None], A, -eye)  # a broken Jacobian -> a plain step
        if A.dtype not in (torch.float32, torch.float64):
            # torch.linalg has no half-precision LU ("lu_cpu" not implemented for 'BFloat16'):
            # solve the n x n system in float32, keep the state in its own dtype
            A, g = A.float(), g.float()
        dz, info = torch.linalg.solve_ex(A, -g)
        ok = finite & (info == 0) & torch.isfinite(dz).flatten(1).all(1)
        # singular (J - I): fall back to the plain step f(z) - z for that sample
        dz = torch.where(ok[:, None], dz.squeeze(-1), g.squeeze(-1))
        return z + dz.to(z.dtype), state


# --------------------------------------------------------------------------------------
# validation helpers (one place, clear messages)
# --------------------------------------------------------------------------------------


def _check_range(name: str, value: float, lo: float, hi: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (lo < value if low_open else lo <= value) and value <= hi
    if not ok:
        lb = "(" if low_open else "["
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}], got {value!r}")


def _check_int_min(name: str, value: int, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def get_solver(solver: Union[str, Solver], **options: Any) -> Solver:
    """Turn a name (plus options) or a solver object into a solver object.

    >>> get_solver("anderson", m=3)
    Anderson(m=3, beta=1.0, ridge=0.0001, scale_ridge=True)
    """
    if isinstance(solver, Solver):
        if options:
            raise TypeError(
                f"options {sorted(options)} were passed next to a {type(solver).__name__} object; "
                f"set them on the object instead, e.g. {type(solver).__name__}({', '.join(f'{k}=...' for k in options)})")
        return solver
    if isinstance(solver, type) and issubclass(solver, Solver):
        solver = solver.name
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a name or a Solver object, got {type(solver).__name__}")
    if solver not in SOLVERS and solver not in _DEFERRED:
        raise ValueError(f"unknown solver {solver!r}; registered solvers: {', '.join(available_solvers())}")
    cls = _lookup(solver)
    valid = cls.options()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for solver {solver!r}; valid options: "
            f"{', '.join(valid) if valid else '(none)'}")
    return cls(**options)


def _to_device(a: np.ndarray, like: Tensor) -> Tensor:
    """A host array of residuals as a tensor with ``like``'s dtype and device."""
    return torch.from_numpy(a).to(device=like.device, dtype=like.dtype)


def _check_state(z0: Any) -> None:
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a torch.Tensor of shape (B, ...), got {type(z0).__name__}")
    if z0.dim() < 2:
        raise ValueError(
            f"z0 has shape {tuple(z0.shape)} but states must be batched as (B, ...): "
            f"for a single sample use z0.unsqueeze(0)")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}")
    if z0.shape[0] == 0:
        raise ValueError("z0 has an empty batch (B = 0)")


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------


def solve(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    solver: Union[str, Solver] = "anderson",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    return_iterates: bool = False,
    callback: Optional[Callable[[StepInfo], Any]] = None,
    on_failure: str = "warn",
    grad: bool = False,
    **solver_options: Any,
) -> Tuple[Tensor, SolverTrace]:
    """Find ``z_star`` with ``f(z_star) = z_star`` for a batch of states.

    Args:
        f: the map, ``(B, ...) -> (B, ...)`` (same shape). Samples should not interact.
        z0: starting point, ``(B, ...)`` with any trailing shape, on any device; float32,
            float64, or half precision (bfloat16 / float16: Anderson's weights and Newton's
            linear solve are computed in float64 / float32 and cast back). The state keeps
            ``z0``'s dtype and device; under ``torch.autocast``, ``f(z)`` is cast to it.
        solver: a registered name (``available_solvers()``) or a :class:`Solver` object.
        tol: stop when every sample's residual (``stop="rel"`` or ``"abs"``) is ``<= tol``.
        max_iter: the maximum number of steps (= function evaluations, except Newton).
        return_iterates: keep every iterate in ``trace.iterates`` (memory!).
        callback: called after each step with a :class:`StepInfo` (e.g. to animate).
        on_failure: ``"warn"`` (default: warn when non-finite values appear),
            ``"raise"`` (raise :class:`ConvergenceError` unless converged) or ``"ignore"``.
        grad: record the iterations for autograd (backprop through the solver, the
            ``unrolled`` strategy). Off by default: DEQ gradients come from the fixed point.
        **solver_options: hyperparameters of the named solver, e.g. ``m=5, beta=1.0``.

    Returns:
        ``(z_star, trace)``: the best iterate per sample (lowest stopping residual seen,
        non-finite iterates never chosen) and its :class:`SolverTrace`.

    Runs under ``torch.no_grad()`` unless ``grad=True``; gradients are the job of
    :class:`deqlite.DEQ`.

    Example:
        >>> z, tr = solve(torch.cos, torch.zeros(1, 1, dtype=torch.float64), tol=1e-10)
        >>> round(z.item(), 6), tr.status
        (0.739085, 'converged')
    """
    slv = get_solver(solver, **solver_options)
    _check_state(z0)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    _check_int_min("max_iter", max_iter, 1)
    if stop not in ("abs", "rel"):
        raise ValueError(f"stop must be 'abs' or 'rel', got {stop!r}")
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it receives a StepInfo each step) or None, "
                        f"got {type(callback).__name__}")

    shape = z0.shape
    B = shape[0]

    flat = len(shape) == 2  # (B, D) states need no view / reshape around f (two ops a step)

    def f_flat(zf: Tensor) -> Tensor:
        return f(zf) if flat else f(zf.view(shape)).reshape(B, -1)

    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        z = z0.detach().reshape(B, -1).clone()
        state = slv.init(z)
        dev = z.device
        # The per-sample bookkeeping (best-so-far, divergence, stopping, the trace rows) runs
        # on the host in numpy: one (2, B) transfer per step instead of a dozen tiny tensor
        # operations (each a kernel launch on a GPU) and three host syncs. Values and
        # comparisons are those of the state's dtype (half precision is held as float32).
        np_dtype = np.float64 if z.dtype == torch.float64 else (
            np.float16 if z.dtype == torch.float16 else np.float32)
        tiny = np_dtype(torch.finfo(z.dtype).tiny)
        tol_np = np_dtype(tol) if z.dtype != torch.bfloat16 else np.float32(torch.tensor(tol, dtype=z.dtype).item())
        norm_buf = torch.empty(2, B, dtype=z.dtype, device=dev)
        if dev.type == "cpu" and z.dtype in (torch.float32, torch.float64, torch.float16):
            norm_host, norm_np = None, norm_buf.numpy()
        else:
            norm_host = torch.empty(2, B, dtype=torch.float32 if np_dtype is np.float32 else z.dtype,
                                    pin_memory=dev.type == "cuda")
            norm_np = norm_host.numpy()
        best_z = z
        best_res = np.full(B, np.inf, dtype=np_dtype)
        best_step = np.full(B, -1, dtype=np.int64)
        diverged = np.zeros(B, dtype=bool)
        any_diverged = False
        abs_rows: List[np.ndarray] = []
        rel_rows: List[np.ndarray] = []
        iterates: Optional[List[Tensor]] = [] if return_iterates else None
        nfe = 0
        autocast = False
        rel = stop == "rel"
        for k in range(max_iter):
            fz = f(z if flat else z.view(shape))
            nfe += 1
            if k == 0:
                if not isinstance(fz, Tensor) or fz.shape != shape:
                    got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
                    raise ValueError(
                        f"f must return the shape of its input: z has shape {tuple(shape)}, "
                        f"f(z) has shape {got}")
                autocast = fz.dtype != z.dtype and torch.is_autocast_enabled(z.device.type)
                if fz.dtype != z.dtype and not autocast:
                    raise TypeError(f"f changed the dtype: z is {z.dtype}, f(z) is {fz.dtype}; "
                                    f"start from z0.to({fz.dtype}) or make f keep its input's dtype")
            if autocast:  # under torch.autocast f may return another precision: the state keeps z0's
                fz = fz.to(z.dtype)
            if not flat:
                fz = fz.reshape(B, -1)
            g = fz - z  # the residual g(z), (B, n): also handed to the solver's step
            # both norms land in one buffer, allocated once; on a CPU in float32/64 its numpy
            # view shares the memory, elsewhere one (2, B) copy to the host per step
            gd, fd = (g.detach(), fz.detach()) if g.requires_grad else (g, fz)
            torch.linalg.vector_norm(gd, dim=1, out=norm_buf[0])
            torch.linalg.vector_norm(fd, dim=1, out=norm_buf[1])
            if norm_host is not None:
                norm_host.copy_(norm_buf)
            norms = norm_np  # (2, B): ||g||, ||f(z)||
            f_norm = norms[1]
            # an overflowing ||f(z)|| (inf, with finite entries) would make the relative
            # residual 0 and a runaway sample look converged: every non-finite ||f(z)|| makes
            # both residuals NaN, so the sample counts as diverged
            if f_norm.max() < np.inf:  # the common case, one reduction
                res_abs = norms[0].copy()
            else:
                res_abs = np.where(np.isfinite(f_norm), norms[0], np_dtype(np.nan))
            res_rel = res_abs / np.maximum(f_norm, tiny)
            # z is finite (checked last step), so a non-finite entry of f(z), or a norm
            # that overflows, makes both residuals non-finite: no extra pass over the state
            if any_diverged:  # frozen samples: record a gap, not a repeated residual
                res_abs = np.where(diverged, np_dtype(np.nan), res_abs)
                res_rel = np.where(diverged, np_dtype(np.nan), res_rel)
            res = res_rel if rel else res_abs
            abs_rows.append(res_abs)
            rel_rows.append(res_rel)
            if iterates is not None:
                iterates.append(z.view(shape).clone())
            better = res < best_res  # False for nan: non-finite iterates are never "best"
            all_better = bool(better.all())
            if all_better:  # the common case: no copy, z is never modified in place
                best_z, best_res = z, res
                best_step.fill(k)
            else:
                best_z = torch.where(torch.from_numpy(better).to(dev)[:, None], z, best_z)
                best_res = np.where(better, res, best_res)
                best_step[better] = k
            if callback is not None:
                callback(StepInfo(k, z.view(shape), fz.view(shape), _to_device(res_abs, z),
                                  _to_device(res_rel, z), nfe))
            if not all_better:  # every residual improved: all finite, nothing diverged
                new_div = ~np.isfinite(res) & ~diverged
                if new_div.any():
                    # a sample produced inf/nan: freeze it at its best finite iterate and let
                    # the others go on (samples never mix, so its NaNs cannot reach them)
                    diverged = diverged | new_div
                    any_diverged = True
            if all_better:  # best_res is res, all finite
                stop_now = bool(res.max() <= tol_np)
            else:
                stop_now = bool(((best_res <= tol_np) | diverged).all())
            if k == max_iter - 1 or stop_now:
                break
            z_next, state = slv.step_residual(f_flat, z, fz, g, state)
            if any_diverged:
                z_next = torch.where(torch.from_numpy(diverged).to(dev)[:, None], best_z, z_next)
            z = z_next
        wall = time.perf_counter() - t0

    converged = best_res <= tol_np
    if diverged.any():
        status = "diverged"
    elif converged.all():
        status = "converged"
    else:
        status = "max_iter"
    extra: Dict[str, Any] = {}
    if isinstance(state, dict) and "jacobian_evals" in state:
        extra["jacobian_evals"] = state["jacobian_evals"]
    abs_rows = _to_device(np.stack(abs_rows), z)  # type: ignore[assignment]
    rel_rows = _to_device(np.stack(rel_rows), z)  # type: ignore[assignment]
    converged = torch.from_numpy(converged).to(dev)
    best_step = torch.from_numpy(best_step).to(dev)
    diverged = torch.from_numpy(diverged).to(dev)
    trace = SolverTrace(
        abs_residual=abs_rows, rel_residual=rel_rows, nfe=nfe,
        converged=converged, status=status, solver=getattr(slv, "name", type(slv).__name__),
        stop=stop, tol=float(tol), wall_time=wall, best_step=best_step, diverged=diverged,
        iterates=iterates, extra=extra)
    if status != "converged" and on_failure != "ignore":
        msg = (f"solve did not converge: {trace.summary()}. Call deqlite.diagnose(f, z0, trace) "
               f"for an explanation.")
        if on_failure == "raise":
            raise ConvergenceError(msg, trace)
        if on_failure == "warn" and status == "diverged":
            warnings.warn(msg + " Non-finite values appeared; the best finite iterate is returned.",
                          RuntimeWarning, stacklevel=2)
    return best_z.view(shape).to(z0.dtype), trace
