"""Why did a solve fail? Local contractivity estimates and a plain-words diagnosis."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F_
from torch import Tensor

from ._checks import check_int, check_number
from .solvers import SolverTrace, solve

__all__ = ["spectral_radius", "jacobian_norm", "Diagnosis", "diagnose", "GradientCheck",
           "finite_difference_check"]


def _flat_f(f: Callable[[Tensor], Tensor], z: Tensor):
    shape, B = z.shape, z.shape[0]
    return (lambda zf: f(zf.view(shape)).reshape(B, -1)), z.detach().reshape(B, -1)


def _check_batched(f: object, z: object, n_iter: object, name: str) -> None:
    if not callable(f):
        raise TypeError(f"{name}: f must be callable, got {type(f).__name__}")
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise TypeError(f"{name}: z must be a floating-point torch.Tensor of shape (B, ...), "
                        f"got {type(z).__name__ if not isinstance(z, Tensor) else z.dtype}")
    if z.dim() < 2 or z.shape[0] == 0:
        # an unbatched (D,) state would be read as D samples of one entry each: a wrong answer
        raise ValueError(f"{name}: z has shape {tuple(z.shape)} but states are batched as (B, ...) "
                         f"with B >= 1; for a single state use z.unsqueeze(0)")
    check_int(f"{name}: n_iter", n_iter, lo=2)


def _jvp(f_flat, z: Tensor, v: Tensor) -> Tensor:
    """``J v`` by forward-mode autograd. Its first use makes torch compile its JVP
    decompositions with ``torch.jit.script``, which warns that it is deprecated (18 times,
    about torch's internals, nothing a user can act on): that warning alone is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated",
                                category=DeprecationWarning)
        return torch.func.jvp(f_flat, (z,), (v,))[1]


def spectral_radius(f: Callable[[Tensor], Tensor], z: Tensor, n_iter: int = 50, seed: int = 0) -> Tensor:
    """Power-iteration estimate of the spectral radius of ``J = df/dz`` at ``z``, per sample.

    Returns ``(B,)``. Plain iteration converges locally iff this is ``< 1``. Uses
    Jacobian-vector products only; the estimate is the geometric mean growth
    ``||J^k v|| ^ (1/k)`` over the second half of the iterations, which is robust to the
    oscillation a complex pair of dominant eigenvalues causes. Assumes samples do not
    interact inside ``f``.

    Example:
        >>> A = torch.tensor([[0.5, 0.0], [0.0, -0.8]])
        >>> round(spectral_radius(lambda z: z @ A.T, torch.zeros(1, 2)).item(), 3)
        0.8
    """
    _check_batched(f, z, n_iter, "spectral_radius")
    f_flat, zf = _flat_f(f, z)
    g = torch.Generator().manual_seed(seed)
    v = F_.normalize(torch.randn(zf.shape, generator=g, dtype=torch.float64).to(zf), dim=1)
    logs: List[Tensor] = []
    with torch.no_grad():
        for _ in range(n_iter):
            w = _jvp(f_flat, zf, v)
            n = w.norm(dim=1)
            logs.append(torch.log(n.clamp_min(1e-300)))
            v = w / n.clamp_min(1e-300)[:, None]
    tail = torch.stack(logs[n_iter // 2:])
    return tail.mean(0).exp()


def jacobian_norm(f: Callable[[Tensor], Tensor], z: Tensor, n_iter: int = 30, seed: int = 0) -> Tensor:
    """Power-iteration estimate of ``||J||_2`` (largest singular value) at ``z``, per sample.

    ``< 1`` means ``f`` is locally a contraction in the Euclidean norm (a sufficient
    condition; :func:`spectral_radius` ``< 1`` is the necessary and sufficient local one).
    """
    _check_batched(f, z, n_iter, "jacobian_norm")
    f_flat, zf = _flat_f(f, z)
    g = torch.Generator().manual_seed(seed)
    v = F_.normalize(torch.randn(zf.shape, generator=g, dtype=torch.float64).to(zf), dim=1)
    zr = zf.clone().requires_grad_(True)
    with torch.enable_grad():
        fz = f_flat(zr)
        s = zf.new_zeros(zf.shape[0])
        for _ in range(n_iter):
            w = _jvp(f_flat, zf, v)
            (u,) = torch.autograd.grad(fz, zr, w, retain_graph=True)  # J^T J v
            s = (w.norm(dim=1))
            v = F_.normalize(u, dim=1)
    return s.detach()


@dataclass
class Diagnosis:
    """The findings of :func:`diagnose`; ``str(d)`` is the explanation in words."""

    status: str
    spectral_radius: float
    jacobian_norm: float
    trend: str
    rate: float
    anderson_condition: Optional[float]
    suggestions: List[str] = field(default_factory=list)
    lines: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.lines + ["Suggestions:"] + [f"  - {s}" for s in self.suggestions])

    def _repr_markdown_(self) -> str:
        body = "\n".join(f"- {line}" for line in self.lines)
        sug = "\n".join(f"- {s}" for s in self.suggestions)
        return f"**Diagnosis**\n\n{body}\n\n**Suggestions**\n\n{sug}"


def _trend(res: Tensor) -> tuple:
    """Classify a residual history ``(T,)``: the per-step geometric rate over the last half,
    and whether it decreases, stalls, oscillates or grows."""
    r = res[torch.isfinite(res)]
    if r.numel() < 3:
        return "too short", float("nan")
    tail = r[r.numel() // 2:].clamp_min(1e-300).log()
    rate = math.exp((tail[-1] - tail[0]).item() / max(1, tail.numel() - 1))
    ups = (tail[1:] > tail[:-1]).float().mean().item()
    if rate > 1.01:
        kind = "growing"
    elif ups > 0.35 and rate > 0.9:
        kind = "oscillating"
    elif rate > 0.97:
        kind = "stalled"
    else:
        kind = "decreasing"
    return kind, rate


def _anderson_condition(trace: SolverTrace, f: Callable[[Tensor], Tensor], m: int) -> Optional[float]:
    """Condition number of the Gram matrix of the last ``m`` residuals (worst sample)."""
    if trace.iterates is None or len(trace.iterates) < 2:
        return None
    zs = trace.iterates[-m:]
    with torch.no_grad():
        G = torch.stack([(f(z) - z).reshape(z.shape[0], -1) for z in zs], 1).double()  # (B, h, n)
        H = G @ G.transpose(1, 2)
        ev = torch.linalg.eigvalsh(H)
    cond = ev[:, -1] / ev[:, 0].abs().clamp_min(1e-300)
    return float(cond.max())


def diagnose(f: Callable[[Tensor], Tensor], z0: Tensor, trace: Optional[SolverTrace] = None,
             *, solver: str = "anderson", max_iter: int = 50, tol: float = 1e-4, m: int = 5) -> Diagnosis:
    """Explain a solve in words: contractivity of ``f`` near the best iterate, the residual
    trend, the conditioning of Anderson's least-squares system, and what to change.

    ``trace`` may come from your own solve; it is re-run (keeping iterates) when it lacks
    them. The contractivity estimates are taken at the best iterate of the worst sample.

    Example:
        >>> d = diagnose(lambda z: 1.5 * z + 1.0, torch.zeros(1, 3), solver="picard")
        >>> d.trend
        'growing'
    """
    if trace is not None and not isinstance(trace, SolverTrace):
        raise TypeError(f"trace must be the SolverTrace returned by deqlite.solve (or None to "
                        f"re-run the solve), got {type(trace).__name__}")
    if trace is None or trace.iterates is None:
        _, trace = solve(f, z0, solver=solver if trace is None else _solver_name(trace, solver),
                         tol=tol if trace is None else trace.tol, max_iter=max_iter if trace is None else max(trace.n_steps, 2),
                         return_iterates=True, on_failure="ignore")
    worst = int(torch.nan_to_num(trace.best_residual, nan=math.inf).argmax())
    best = trace.iterates[int(trace.best_step[worst].clamp_min(0))]
    rho = float(spectral_radius(f, best)[worst])
    jn = float(jacobian_norm(f, best)[worst])
    kind, rate = _trend(trace.abs_residual[:, worst])  # rel flattens out when f(z) grows too
    cond = _anderson_condition(trace, f, m) if trace.solver == "anderson" else None

    lines = [f"Status: {trace.status} after {trace.n_steps} steps; the worst sample (#{worst}) reached "
             f"{trace.stop} residual {float(trace.best_residual[worst]):.2e} (tol {trace.tol:g})."]
    lines.append(f"Near its best iterate, the Jacobian of f has spectral radius ~{rho:.3f} and norm ~{jn:.3f}: "
                 + ("f is locally contractive, so plain iteration converges at rate ~rho per step."
                    if rho < 1 and jn < 1 else
                    "plain iteration converges locally (rho < 1) but can grow transiently (norm > 1)."
                    if rho < 1 else
                    "f is NOT locally contractive (rho >= 1): plain iteration cannot converge here."))
    lines.append(f"Residual trend over the last half: {kind} (x{rate:.3f} per step).")
    sug: List[str] = []
    if trace.status == "diverged":
        lines.append("Non-finite values appeared; the best finite iterate was returned.")
        sug.append("Constrain f: deqlite.make_contractive(f, radius=0.9) keeps the weights' spectral norm below 1.")
    if cond is not None:
        lines.append(f"Anderson's Gram matrix of the last {m} residuals has condition number ~{cond:.1e}"
                     + (" (ill-conditioned: the least-squares weights are unreliable)." if cond > 1e10 else "."))
        if cond > 1e10:
            sug.append("Keep the ridge scaled to the residual (scale_ridge=True, the default) or lower m.")
    if rho >= 1:
        sug.append("Use a solver that does not need contraction: solver='broyden' or 'anderson', or damp "
                   "the iteration with solver='km', beta=0.5 (it converges when eigenvalues lie in a disc "
                   "that damping pulls inside the unit circle).")
        sug.append("Or regularise training: add the Jacobian penalty deqlite.jacobian_frobenius, or "
                   "make f contractive with deqlite.make_contractive.")
    elif kind in ("stalled", "decreasing") and trace.status == "max_iter":
        steps_needed = (math.log(trace.tol / max(float(trace.best_residual[worst]), 1e-300)) / math.log(rate)
                        if 0 < rate < 1 else float("inf"))
        if math.isfinite(steps_needed):
            sug.append(f"Convergence is linear at x{rate:.3f} per step: about {steps_needed:.0f} more steps "
                       f"would reach tol; raise max_iter or use anderson/broyden to accelerate.")
        else:
            sug.append("The residual has stalled: check the tolerance is reachable in this dtype "
                       "(float32 stalls near 1e-7 relative) or switch to anderson/broyden.")
    if kind == "oscillating":
        sug.append("The residual oscillates: damp the iteration (solver='km', beta=0.5, or anderson beta<1).")
    if not sug:
        sug.append("Nothing to fix: the solve behaves as expected." if trace.status == "converged"
                   else "Raise max_iter or loosen tol.")
    return Diagnosis(trace.status, rho, jn, kind, rate, cond, sug, lines)


def _solver_name(trace: SolverTrace, default: str) -> str:
    from .solvers import SOLVERS
    return trace.solver if trace.solver in SOLVERS else default


@dataclass
class GradientCheck:
    """Result of :func:`finite_difference_check`: per direction ``v``, the central finite
    difference of the loss and the directional derivative ``<grad, v>``, and their relative
    error ``||exact - fd|| / ||fd||`` over all directions."""

    finite_differences: List[float]
    directional: List[float]
    rel_error: float
    eps: float


def finite_difference_check(loss: Callable[[], Union[Tensor, float]], params: Sequence[Tensor],
                            grad: Union[Tensor, Sequence[Tensor]], *, n_directions: int = 8,
                            eps: float = 1e-5, seed: int = 0) -> GradientCheck:
    """Check a gradient against central finite differences of the loss along random directions.

    For ``n_directions`` random directions ``v`` in parameter space (standard normal, drawn
    from a generator seeded with ``seed``), compares
    ``(L(theta + eps v) - L(theta - eps v)) / (2 eps)`` with ``<grad, v>``. The parameters are
    shifted in place and restored after each evaluation (under ``no_grad``). Use float64:
    the finite differences are accurate to about ``eps^2`` plus rounding ``/ eps``.

    Args:
        loss: a function of no arguments that evaluates the loss at the current ``params``.
        params: the tensors the gradient is taken with respect to (e.g. ``list(model.parameters())``).
        grad: the gradient to check, flattened and concatenated in the order of ``params``
            (``(n,)``), or one tensor per parameter.

    Example:
        >>> w = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> check = finite_difference_check(lambda: (w ** 2).sum(), [w], 2 * w)
        >>> check.rel_error < 1e-8
        True
    """
    if not callable(loss):
        raise TypeError(f"loss must be a function of no arguments returning the loss, got {type(loss).__name__}")
    params = list(params)
    if not params or not all(isinstance(p, Tensor) and p.is_floating_point() for p in params):
        raise TypeError("params must be a non-empty sequence of floating-point tensors "
                        "(e.g. list(model.parameters()))")
    check_int("n_directions", n_directions)
    check_number("eps", eps, lo=0.0, low_open=True)
    sizes = [p.numel() for p in params]
    flat = grad if isinstance(grad, Tensor) else torch.cat([g.reshape(-1) for g in grad])
    if flat.numel() != sum(sizes):
        raise ValueError(f"grad has {flat.numel()} entries but params have {sum(sizes)}; pass the "
                         f"gradient of exactly these parameters, flattened in their order")
    flat = flat.reshape(-1).to(params[0].dtype)
    gen = torch.Generator().manual_seed(seed)
    fd: List[float] = []
    exact: List[float] = []
    with torch.no_grad():
        for _ in range(n_directions):
            v = torch.randn(sum(sizes), generator=gen, dtype=params[0].dtype)
            shifts = torch.split(v, sizes)
            losses = []
            for sign in (1.0, -1.0):
                for p, s in zip(params, shifts):
                    p.add_(sign * eps * s.view_as(p).to(p.device))
                losses.append(float(loss()))
                for p, s in zip(params, shifts):
                    p.sub_(sign * eps * s.view_as(p).to(p.device))
            fd.append((losses[0] - losses[1]) / (2 * eps))
            exact.append(float(flat.cpu() @ v))
    fd_t = torch.tensor(fd, dtype=torch.float64)
    err = float((torch.tensor(exact, dtype=torch.float64) - fd_t).norm() / fd_t.norm())
    return GradientCheck(fd, exact, err, eps)
