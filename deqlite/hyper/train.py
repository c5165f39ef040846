"""Training a neural solver on a frozen DEQ (Sec. 4.2 of Bai, Koltun & Kolter 2022): unrolled
iterations, the three losses, precise fixed points to learn from, and inference."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .._checks import check_choice, check_int
from ..solvers import solve
from .nets import LOSS_WEIGHTS, loss_weights
from .solver import HyperSolver

__all__ = ["unroll", "hyper_losses", "fixed_points", "TrainLog", "train_hypersolver", "hyper_solve"]


# --------------------------------------------------------------------------------------
# unrolling, losses, training
# --------------------------------------------------------------------------------------


def unroll(hyper: HyperSolver, f: Callable[[Tensor], Tensor], z0: Tensor, K: int) -> Dict[str, Any]:
    """Run ``K`` HyperAnderson steps *with* autograd (for training; :func:`solve` runs without).

    ``f``: ``(B, ...) -> (B, ...)``; ``z0``: ``(B, ...)``. Uses ``K`` evaluations of ``f`` and
    returns ``{"z": [z_1..z_K] (each (B, n)), "G_alpha": [K x (B, n)], "alpha": [...],
    "beta": [...], "residual": [K x (B,)] ||f(z_k) - z_k|| for k = 0..K-1}``.
    """
    check_int("K", K)
    B = z0.shape[0]
    shape = z0.shape
    z = z0.reshape(B, -1)
    state = hyper.setup(z)
    out: Dict[str, List[Tensor]] = {"z": [], "G_alpha": [], "alpha": [], "beta": [], "residual": []}
    for _ in range(K):
        fz = f(z.view(shape)).reshape(B, -1)
        out["residual"].append((fz - z).norm(dim=1))
        z, state, info = hyper.mix(z, fz, state)
        out["z"].append(z)
        for key in ("G_alpha", "alpha", "beta"):
            out[key].append(info[key])
    return out


def hyper_losses(hyper: HyperSolver, f: Callable[[Tensor], Tensor], x: Tensor, z_star: Tensor, K: int,
                 weights: Union[str, Tensor] = "increasing", conv_loss: str = "l2") -> Dict[str, Tensor]:
    """The three losses of Sec. 4.2 on one batch (means over the batch of per-sample norms).

    ``L_conv = sum_k w_k ||z_k - z*||`` over ``k = 1..K``; ``L_init = ||h_phi(x) - z*||``;
    ``L_alpha = sum_k ||G_k alpha_k||``. As in Fig. 3, the initializer is trained by ``L_init``
    only: its output enters the unrolled iterations detached.

    ``conv_loss="log"`` uses ``sum_k w_k log ||z_k - z*||`` instead (not in the paper): errors
    fall by orders of magnitude over ``K`` steps, and on the plain norm the late steps, the
    ones that decide how many evaluations a tolerance costs, contribute almost no gradient.
    """
    if conv_loss not in ("l2", "log"):
        raise ValueError(f"conv_loss must be 'l2' or 'log', got {conv_loss!r}")
    z0 = hyper.initial_state(x, state_shape=tuple(z_star.shape[1:]))
    if z0.shape != z_star.shape:
        raise ValueError(f"the initializer returns {tuple(z0.shape)} but z_star is {tuple(z_star.shape)}")
    w = loss_weights(K, weights) if isinstance(weights, str) else weights
    if w.shape != (K,):
        raise ValueError(f"weights must have shape ({K},), got {tuple(w.shape)}")
    w = w.to(device=z_star.device, dtype=z_star.dtype)
    zs = z_star.reshape(z_star.shape[0], -1)
    run = unroll(hyper, f, z0.detach(), K)
    errs = torch.stack([(zk - zs).norm(dim=1) for zk in run["z"]], 1)  # (B, K)
    if conv_loss == "log":
        l_conv = (torch.log(errs + 1e-12) * w).sum(1).mean()
    else:
        l_conv = (errs * w).sum(1).mean()
    l_init = (z0.reshape(zs.shape) - zs).norm(dim=1).mean() if hyper.initializer is not None else zs.new_zeros(())
    l_alpha = torch.stack([ga.norm(dim=1) for ga in run["G_alpha"]], 1).sum(1).mean()
    return {"conv": l_conv, "init": l_init, "alpha": l_alpha, "final_error": errs[:, -1].mean()}


def fixed_points(f: Callable[[Tensor, Tensor], Tensor], x: Tensor, *, batch_size: int = 512,
                 solver: str = "anderson", tol: float = 1e-6, max_iter: int = 200, state_shape=None,
                 z0: Optional[Tensor] = None, **solver_options: Any) -> Tuple[Tensor, float]:
    """Precise fixed points ``z*(x)`` of a frozen map ``f(z, x)`` with a classic solver.

    ``x``: ``(N, ...)``; the state starts at zeros of ``(N, *state_shape)`` (or at ``z0``).
    Returns ``(z_star (N, ...), worst relative residual)``; check the second number.
    """
    if z0 is None:
        if state_shape is None:
            raise ValueError("pass state_shape=(D,) (or z0=) so the solve knows the state's shape")
        z0 = x.new_zeros((x.shape[0],) + tuple(state_shape))
    outs, worst = [], 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        z, tr = solve(lambda z: f(z, xb), z0[i:i + batch_size], solver=solver, tol=tol,
                      max_iter=max_iter, on_failure="ignore", **solver_options)
        outs.append(z)
        worst = max(worst, float(tr.best_residual.max()))
    return torch.cat(outs), worst


@dataclass
class TrainLog:
    """What :func:`train_hypersolver` did: per logged step the losses, and totals."""

    step: List[int] = field(default_factory=list)
    conv: List[float] = field(default_factory=list)
    init: List[float] = field(default_factory=list)
    alpha: List[float] = field(default_factory=list)
    final_error: List[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    z_star_residual: float = float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def train_hypersolver(hyper: HyperSolver, f: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                      z_star: Optional[Tensor] = None, *, K: int = 8, steps: int = 1000,
                      batch_size: int = 32, lr: float = 1e-3, weights: str = "increasing", conv_loss: str = "l2",
                      lambda_conv: float = 0.1, lambda_init: float = 0.05, lambda_alpha: float = 1e-4,
                      alpha_floor: float = 5e-8, alpha_decay_steps: Optional[int] = None,
                      time_budget: Optional[float] = None,
                      init_lr: Optional[float] = None, init_batch_size: Optional[int] = None,
                      seed: int = 0, log_every: int = 25) -> TrainLog:
    """Train ``hyper`` on a frozen map ``f(z, x)`` over inputs ``x`` ``(N, ...)`` (no labels).

    Each step draws ``batch_size`` inputs, unrolls ``K`` HyperAnderson steps and minimises
    ``lambda_conv L_conv + lambda_init L_init + lambda_alpha(t) L_alpha`` (Sec. 4.2) with Adam
    and cosine learning-rate annealing (App. A.1). The default weights are the paper's
    (Table 3 of App. A, the WikiText-103 column: ``lambda_1 = 0.1``, ``lambda_2 = 0.05``,
    ``lambda_3 = 1e-4``; its vision models use 0.02 and 1e-5); ``lambda_alpha(t)`` decays
    linearly to ``alpha_floor`` (the paper's 5e-8) over ``alpha_decay_steps`` (the paper: 2,000
    of its 3-5K steps; default here: 40% of ``steps``). With Adam and the initializer in its
    own parameter group (it only sees ``L_init``), what matters is the ratio
    ``lambda_alpha / lambda_conv``. Only the solver's
    parameters get gradients (``f``'s ``.grad`` stays untouched). ``z_star`` defaults to
    :func:`fixed_points` (Anderson to relative residual 1e-6). ``time_budget`` (seconds) stops
    early. The initializer, trained by ``L_init`` alone, may get its own learning rate
    ``init_lr`` and its own (cheap, larger) batch ``init_batch_size``: it needs no unrolling.
    Returns a :class:`TrainLog`.
    """
    if not isinstance(hyper, HyperSolver):
        raise TypeError(f"hyper must be a HyperSolver, got {type(hyper).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch of inputs (N, ...), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    for name, v in (("K", K), ("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        check_int(name, v)
    if init_batch_size is not None:
        check_int("init_batch_size", init_batch_size)
    check_choice("weights", weights, LOSS_WEIGHTS)
    params = list(hyper.parameters())
    if not params:
        raise ValueError("this HyperSolver has nothing to train (a LeastSquaresMixer and no initializer); "
                         "build one with HyperSolver.build(...)")
    log = TrainLog()
    t0 = time.perf_counter()
    if z_star is None:
        state_shape = hyper.state_shape
        if state_shape is None:
            raise ValueError("cannot compute z_star without the state shape: pass z_star= or build "
                             "the solver with state_shape=")
        z_star, log.z_star_residual = fixed_points(f, x, state_shape=state_shape)
    if z_star.shape[0] != x.shape[0]:
        raise ValueError(f"z_star has {z_star.shape[0]} samples but x has {x.shape[0]}")
    z_star = z_star.detach()
    decay = alpha_decay_steps if alpha_decay_steps is not None else max(1, int(0.4 * steps))
    gen = torch.Generator().manual_seed(seed)
    init_params = list(hyper.initializer.parameters()) if hyper.initializer is not None else []
    init_ids = {id(p) for p in init_params}
    groups = [{"params": [p for p in params if id(p) not in init_ids], "lr": lr}]
    if init_params:
        groups.append({"params": init_params, "lr": lr if init_lr is None else init_lr})
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    wk = loss_weights(K, weights)
    hyper.train()
    N = x.shape[0]
    for it in range(steps):
        idx = torch.randint(0, N, (min(batch_size, N),), generator=gen)
        xb, zb = x[idx], z_star[idx]
        L = hyper_losses(hyper, lambda z: f(z, xb), xb, zb, K, wk, conv_loss=conv_loss)
        if init_batch_size is not None and hyper.initializer is not None:  # L_init on its own batch
            idx_i = torch.randint(0, N, (min(init_batch_size, N),), generator=gen)
            zi = z_star[idx_i].reshape(len(idx_i), -1)
            L["init"] = (hyper.initial_state(x[idx_i]).reshape(zi.shape) - zi).norm(dim=1).mean()
        floor = min(alpha_floor, lambda_alpha)
        lam_a = floor + (lambda_alpha - floor) * max(0.0, 1.0 - it / decay)
        loss = lambda_conv * L["conv"] + lambda_init * L["init"] + lam_a * L["alpha"]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        sched.step()
        log.steps = it + 1
        if it % log_every == 0 or it == steps - 1:
            log.step.append(it)
            for key in ("conv", "init", "alpha", "final_error"):
                getattr(log, key).append(float(L[key].detach()))
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            break
    for p in params:
        p.grad = None
    hyper.eval()
    log.seconds = time.perf_counter() - t0
    return log


# --------------------------------------------------------------------------------------
# inference and evaluation
# --------------------------------------------------------------------------------------


def hyper_solve(hyper: HyperSolver, f: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                **solve_options: Any) -> Tuple[Tensor, Any]:
    """``z0 = hyper.initial_state(x)``, then ``solve(lambda z: f(z, x), z0, solver=hyper, ...)``.

    ``f`` is the DEQ map ``f(z, x)``; ``solve_options`` go to :func:`deqlite.solve` (``tol``,
    ``max_iter``, ...). Returns ``(z_star, trace)``; ``trace.extra["init_time"]`` holds the
    initializer's wall time (``trace.wall_time`` is the solve alone).
    """
    if not isinstance(hyper, HyperSolver):
        raise TypeError(f"hyper must be a HyperSolver, got {type(hyper).__name__}")
    t0 = time.perf_counter()
    with torch.no_grad():
        z0 = hyper.initial_state(x)
    t_init = time.perf_counter() - t0
    z, tr = solve(lambda z: f(z, x), z0, solver=hyper, **solve_options)
    tr.extra["init_time"] = t_init
    return z, tr

