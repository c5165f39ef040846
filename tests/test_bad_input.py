"""The bad-input suite: every public entry point, fed what users actually feed it.

Each case is ``(id, call, expected)``: ``expected`` is either ``Err(cls, fragment)`` (the
error class and a fragment of its message that says what was wrong and how to fix it) or
``Ok(check)`` (the call succeeds and ``check(result)`` holds). No case may pass by crashing
in an unrelated way: an error of the wrong class, or without the fragment, fails.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

import deqlite
from deqlite import DEQ, solve
from deqlite.backward import BACKWARD_STRATEGIES


@dataclass
class Err:
    cls: type
    fragment: str


@dataclass
class Ok:
    check: Callable[[Any], bool] = lambda r: True


CASES: list[tuple[str, Callable[[], Any], Any]] = []


def case(name: str, expected: Any):
    def deco(fn):
        CASES.append((name, fn, expected))
        return fn
    return deco


def add(name: str, fn: Callable[[], Any], expected: Any) -> None:
    CASES.append((name, fn, expected))


Z = lambda *s: torch.zeros(*s)  # noqa: E731
cos = torch.cos
SOLVERS = deqlite.available_solvers()

# ------------------------------------------------------------------ solve(): arguments
add("solve/f-not-callable", lambda: solve(3, Z(1, 2)), Err(TypeError, "f must be callable"))
add("solve/z0-list", lambda: solve(cos, [[0.0, 0.0]]), Err(TypeError, "z0 must be a torch.Tensor"))
add("solve/z0-numpy", lambda: solve(cos, np.zeros((1, 2))), Err(TypeError, "z0 must be a torch.Tensor"))
add("solve/z0-unbatched", lambda: solve(cos, Z(3)), Err(ValueError, "z0.unsqueeze(0)"))
add("solve/z0-scalar", lambda: solve(cos, torch.tensor(0.0)), Err(ValueError, "batched as (B, ...)"))
add("solve/z0-int", lambda: solve(cos, torch.zeros(1, 2, dtype=torch.long)), Err(TypeError, "floating-point"))
add("solve/z0-bool", lambda: solve(cos, torch.zeros(1, 2, dtype=torch.bool)), Err(TypeError, "floating-point"))
add("solve/z0-empty-batch", lambda: solve(cos, Z(0, 2)), Err(ValueError, "empty batch"))
for bad_tol in (0, -1e-3, math.nan, math.inf, "1e-4", None):
    add(f"solve/tol={bad_tol!r}", lambda t=bad_tol: solve(cos, Z(1, 2), tol=t), Err(ValueError, "tol must be a finite number in (0.0, inf), got"))
for bad in (0, -3, 2.5, True, "10", None):
    add(f"solve/max_iter={bad!r}", lambda b=bad: solve(cos, Z(1, 2), max_iter=b), Err(ValueError, "max_iter must be an integer >= 1"))
add("solve/stop=typo", lambda: solve(cos, Z(1, 2), stop="relative"), Err(ValueError, "stop must be one of 'abs', 'rel'; got 'relative'"))
add("solve/on_failure=typo", lambda: solve(cos, Z(1, 2), on_failure="quiet"), Err(ValueError, "on_failure must be"))
add("solve/unknown-solver", lambda: solve(cos, Z(1, 2), solver="andersen"), Err(ValueError, "registered solvers: anderson"))
add("solve/solver-int", lambda: solve(cos, Z(1, 2), solver=3), Err(TypeError, "solver must be a name or a Solver object"))
add("solve/option-typo", lambda: solve(cos, Z(1, 2), solver="anderson", memory=5), Err(TypeError, "valid options: m, beta"))
add("solve/option-for-other-solver", lambda: solve(cos, Z(1, 2), solver="picard", m=5), Err(TypeError, "unknown option(s) ['m'] for solver 'picard'"))
add("solve/options-next-to-object", lambda: solve(cos, Z(1, 2), solver=deqlite.solvers.Anderson(), m=3), Err(TypeError, "set them on the object instead"))
add("solve/solver-class", lambda: solve(cos, Z(1, 2), solver=deqlite.solvers.Picard)[1].status, Ok(lambda s: s == "converged"))
add("solve/f-changes-shape", lambda: solve(lambda z: z[:, :1], Z(2, 3)), Err(ValueError, "f must return the shape of its input"))
add("solve/f-returns-number", lambda: solve(lambda z: 1.0, Z(2, 3)), Err(ValueError, "f must return the shape of its input"))
add("solve/f-changes-dtype", lambda: solve(lambda z: z.double(), Z(2, 3)), Err(TypeError, "f changed the dtype"))
add("solve/f-raises", lambda: solve(lambda z: 1 / 0, Z(1, 2)), Err(ZeroDivisionError, "division by zero"))
add("solve/float64-result-dtype", lambda: solve(cos, Z(2, 2).double())[0].dtype, Ok(lambda d: d == torch.float64))
add("solve/trailing-dims", lambda: solve(lambda z: 0.5 * z + 1, Z(2, 3, 4, 5))[0].shape, Ok(lambda s: tuple(s) == (2, 3, 4, 5)))
add("solve/already-at-fixed-point", lambda: solve(lambda z: z, torch.ones(1, 3))[1], Ok(lambda t: t.status == "converged" and t.nfe == 1))
add("solve/zero-map-rel", lambda: solve(lambda z: 0 * z, torch.ones(1, 3))[1].status, Ok(lambda s: s == "converged"))
add("solve/requires-grad-z0-detached", lambda: solve(cos, torch.zeros(1, 2, requires_grad=True))[0].requires_grad, Ok(lambda r: r is False))
add("solve/grad-true-keeps-graph", lambda: solve(lambda z: 0.5 * torch.tanh(z) + W1, Z(1, 2), grad=True, solver="picard")[0].requires_grad, Ok(lambda r: r is True))
W1 = torch.ones(1, 2, requires_grad=True)
add("solve/callback-called", lambda: len(_calls(solve)), Ok(lambda n: n >= 2))
add("solve/callback-not-callable", lambda: solve(cos, Z(1, 2), callback=3), Err(TypeError, "callback must be callable"))
add("solve/return_iterates-count", lambda: (lambda r: len(r[1].iterates) == r[1].n_steps)(solve(cos, Z(1, 2), return_iterates=True)), Ok(lambda ok: ok))
add("solve/max_iter-status", lambda: solve(cos, Z(1, 2), solver="picard", max_iter=2, on_failure="ignore")[1].status, Ok(lambda s: s == "max_iter"))
add("solve/raise-policy", lambda: solve(cos, Z(1, 2), solver="picard", max_iter=2, on_failure="raise"), Err(deqlite.ConvergenceError, "deqlite.diagnose"))
add("solve/nan-z0", lambda: solve(cos, torch.full((1, 2), math.nan), on_failure="ignore")[1].status, Ok(lambda s: s == "diverged"))
add("solve/inf-z0", lambda: solve(lambda z: 0.5 * z, torch.full((1, 2), math.inf), on_failure="ignore")[1].status, Ok(lambda s: s == "diverged"))
add("solve/expanding-picard", lambda: solve(lambda z: 3 * z + 1, Z(2, 5), solver="picard", max_iter=800, on_failure="ignore")[1].status, Ok(lambda s: s == "diverged"))
add("solve/expanding-km-abs", lambda: solve(lambda z: 2 * z + 1, Z(2, 5), solver="km", stop="abs", max_iter=3000, on_failure="ignore")[1].status, Ok(lambda s: s == "diverged"))


def _calls(solve_fn):
    seen = []
    solve_fn(cos, Z(1, 2), callback=seen.append)
    return seen


# every registered solver: a hard-ish problem with a known answer, and a bad option type
for name in SOLVERS:
    add(f"solver/{name}/cos", lambda n=name: solve(cos, Z(2, 3).double(), solver=n, tol=1e-8, max_iter=200)[0],
        Ok(lambda z: torch.allclose(z, torch.full_like(z, 0.7390851332), atol=1e-6)))
    add(f"solver/{name}/option-typo", lambda n=name: solve(cos, Z(1, 2), solver=n, not_an_option=1), Err(TypeError, "valid options"))

# per-solver option ranges
for solver, opt, value, frag in [
    ("km", "beta", 0.0, "beta must be a finite number in (0.0, 1.0], got 0.0"), ("km", "beta", 1.5, "beta must be a finite number in"),
    ("km", "beta", math.nan, "beta must be a finite number in"), ("km", "beta", "0.5", "beta must be a finite number in"),
    ("anderson", "m", 0, "m must be an integer >= 1"), ("anderson", "m", 2.0, "m must be an integer"),
    ("anderson", "m", True, "m must be an integer"), ("anderson", "beta", -0.1, "beta must be a finite number in"),
    ("anderson", "ridge", -1.0, "ridge must be a finite number in [0.0, inf), got -1.0"), ("anderson", "ridge", math.inf, "ridge must be"),
    ("broyden", "m", 0, "m must be an integer >= 1"), ("broyden", "step_size", 2.0, "step_size must be a finite number in (0.0, 1.0]"),
    ("newton", "max_dim", 0, "max_dim must be an integer >= 1"),
]:
    add(f"solver/{solver}/{opt}={value!r}", lambda s=solver, o=opt, v=value: solve(cos, Z(1, 2), solver=s, **{o: v}), Err(ValueError, frag))
add("solver/broyden/alpha-renamed", lambda: solve(cos, Z(1, 2), solver="broyden", alpha=0.5), Err(TypeError, "use Broyden(step_size=0.5)"))
add("solver/broyden/alpha-renamed-object", lambda: deqlite.solvers.Broyden(alpha=0.5), Err(TypeError, "is now called 'step_size'"))
add("solver/newton/too-big", lambda: solve(cos, Z(1, 2000), solver="newton"), Err(ValueError, "solver='broyden'"))
add("solver/anderson/m=1-is-plain", lambda: solve(cos, Z(1, 2).double(), solver="anderson", m=1, tol=1e-10, max_iter=200)[1].status, Ok(lambda s: s == "converged"))
add("solver/anderson/ridge0-singular-ok", lambda: solve(lambda z: 0.5 * z + 1, torch.zeros(1, 1).double(), solver="anderson", ridge=0.0, tol=1e-12)[1].status, Ok(lambda s: s == "converged"))

# ------------------------------------------------------------------ registry
add("registry/non-solver", lambda: deqlite.register_solver("x")(int), Err(TypeError, "expects a Solver subclass"))
add("registry/old-init-hook", lambda: deqlite.register_solver("old_hook")(type("OldHook", (deqlite.Solver,), {"init": lambda self, z0: None})), Err(TypeError, "now called setup(z0)"))
add("registry/get-unknown", lambda: deqlite.get_solver("nope"), Err(ValueError, "registered solvers"))
add("registry/hyper-without-import", lambda: "hyper" in deqlite.available_solvers(), Ok(lambda r: r))
add("registry/hyper-solves", lambda: solve(cos, Z(1, 2).double(), solver="hyper", tol=1e-8, max_iter=100)[1].status, Ok(lambda s: s == "converged"))
add("registry/repr", lambda: repr(deqlite.get_solver("anderson", m=3)), Ok(lambda r: "m=3" in r))

# ------------------------------------------------------------------ trace
_tr = solve(cos, Z(2, 2))[1]
add("trace/steps_to", lambda: _tr.steps_to(1e-3).shape, Ok(lambda s: tuple(s) == (2,)))
add("trace/steps_to-kind-typo", lambda: _tr.steps_to(1e-3, kind="relative"), Err(ValueError, "kind must be 'abs' or 'rel'"))
add("trace/batch_residual", lambda: _tr.batch_residual().shape[0], Ok(lambda n: n == _tr.n_steps))
add("trace/to_dict", lambda: _tr.to_dict()["status"], Ok(lambda s: s == "converged"))
add("trace/summary", lambda: _tr.summary(), Ok(lambda s: "converged" in s))


# ------------------------------------------------------------------ DEQ
class Cell(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.W, self.U = nn.Linear(d, d, bias=False), nn.Linear(d, d)
        with torch.no_grad():
            self.W.weight.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


X = lambda: torch.randn(3, 4)  # noqa: E731
add("DEQ/f-not-callable", lambda: DEQ(3), Err(TypeError, "f must be an nn.Module or callable"))
add("DEQ/unknown-solver", lambda: DEQ(Cell(), solver="andersen"), Err(ValueError, "registered solvers"))
add("DEQ/solver-option-typo", lambda: DEQ(Cell(), solver=deqlite.get_solver("anderson", mm=3)), Err(TypeError, "valid options"))
add("DEQ/solver_options-moved", lambda: DEQ(Cell(), solver_options={"m": 3}), Err(TypeError, "solver=deqlite.solvers.Anderson(m=3)"))
add("DEQ/eval-solver-bad", lambda: DEQ(Cell(), eval_solve=dict(solver="nope")), Err(ValueError, "registered solvers"))
add("DEQ/eval_solve-not-dict", lambda: DEQ(Cell(), eval_solve=60), Err(TypeError, "eval_solve=dict(max_iter=60)"))
add("DEQ/eval_solve-unknown-key", lambda: DEQ(Cell(), eval_solve=dict(maxiter=60)), Err(TypeError, "valid: solver, tol, max_iter, stop"))
add("DEQ/eval_max_iter-moved", lambda: DEQ(Cell(), eval_max_iter=60), Err(TypeError, "eval_solve=dict(max_iter=...)"))
add("DEQ/unknown-keyword", lambda: DEQ(Cell(), backwrd_tol=1e-3), Err(TypeError, "unexpected keyword argument 'backwrd_tol'"))
add("DEQ/init-moved", lambda: DEQ(Cell(), init=lambda x: x), Err(TypeError, "init_state=lambda x: z0"))
add("DEQ/tol=0", lambda: DEQ(Cell(), tol=0), Err(ValueError, "tol must be a finite number in (0.0, inf)"))
add("DEQ/eval_tol=-1", lambda: DEQ(Cell(), eval_solve=dict(tol=-1)), Err(ValueError, "tol must be a finite number in (0.0, inf)"))
add("DEQ/max_iter=0", lambda: DEQ(Cell(), max_iter=0), Err(ValueError, "max_iter must be an integer >= 1"))
add("DEQ/eval_max_iter=1.5", lambda: DEQ(Cell(), eval_solve=dict(max_iter=1.5)), Err(ValueError, "max_iter must be an integer >= 1"))
add("DEQ/backward-typo", lambda: DEQ(Cell(), backward="implict"), Err(ValueError, "choose one of implicit"))
add("DEQ/backward-solver-typo", lambda: DEQ(Cell(), backward_solver="brodyen"), Err(ValueError, "registered solvers"))
add("DEQ/backward_tol=0", lambda: DEQ(Cell(), backward_tol=0), Err(ValueError, "backward tol must be a finite number in (0.0, inf)"))
add("DEQ/backward_max_iter=0", lambda: DEQ(Cell(), backward_max_iter=0), Err(ValueError, "backward max_iter must be an integer"))
add("DEQ/phantom_k=0", lambda: DEQ(Cell(), backward="phantom", phantom_k=0), Err(ValueError, "phantom_k must be an integer >= 1"))
add("DEQ/phantom_tau=0", lambda: DEQ(Cell(), backward="phantom", phantom_tau=0.0), Err(ValueError, "phantom_tau must be a finite number in (0.0, 1.0]"))
add("DEQ/phantom_tau=str", lambda: DEQ(Cell(), backward="phantom", phantom_tau="0.5"), Err(ValueError, "phantom_tau must be a finite number in (0.0, 1.0]"))
add("DEQ/on_failure-typo", lambda: DEQ(Cell(), on_failure="loud"), Err(ValueError, "on_failure must be one of"))
add("DEQ/unrolled-newton", lambda: DEQ(Cell(), solver="newton", backward="unrolled"), Err(ValueError, "backward='implicit'"))
add("DEQ/x-wrong-width", lambda: DEQ(Cell())(torch.randn(3, 5)), Err(RuntimeError, "shapes cannot be multiplied"))
add("DEQ/eval-mode-no-grad", lambda: _eval_no_grad(), Ok(lambda r: r is False))
add("DEQ/eval-mode-keeps-grad", lambda: _eval_with_grad(), Ok(lambda r: r is True))
add("DEQ/warm-start-shape-change", lambda: _warm_shape_change(), Ok(lambda s: tuple(s) == (5, 4)))
add("DEQ/z0-override", lambda: DEQ(Cell(), on_failure="ignore")(X(), z0=torch.zeros(3, 4))[0].shape, Ok(lambda s: tuple(s) == (3, 4)))
add("DEQ/raise-forward", lambda: DEQ(Cell(), solver="picard", tol=1e-30, max_iter=2, on_failure="raise")(X()), Err(deqlite.ConvergenceError, "forward solve did not converge"))
add("DEQ/repr", lambda: repr(DEQ(Cell())), Ok(lambda r: "backward='implicit'" in r))


def _eval_no_grad():
    d = DEQ(Cell()).eval()
    with torch.no_grad():
        return d(X())[0].requires_grad


def _eval_with_grad():
    return DEQ(Cell()).eval()(X())[0].requires_grad


def _warm_shape_change():
    d = DEQ(Cell(), warm_start=True)
    d(X())
    return d(torch.randn(5, 4))[0].shape


for strategy in BACKWARD_STRATEGIES:
    def _grad_flows(s=strategy):
        cell = Cell()
        d = DEQ(cell, backward=s, tol=1e-6, max_iter=100, backward_max_iter=100)
        z, _ = d(X())
        z.sum().backward()
        return cell.W.weight.grad
    add(f"DEQ/{strategy}/grad-flows", _grad_flows, Ok(lambda g: g is not None and bool(torch.isfinite(g).all())))

    def _closure(s=strategy):
        lin = nn.Linear(4, 4)
        z, _ = DEQ(lambda z, x: torch.tanh(0.3 * lin(z) + x), backward=s, max_iter=100, backward_max_iter=100)(X())
        z.sum().backward()
        return lin.weight.grad
    add(f"DEQ/{strategy}/closure-grad", _closure, Ok(lambda g: g is not None))

    for policy, expected in (("raise", Err(deqlite.ConvergenceError, "did not converge")),
                             ("ignore", Ok(lambda r: r == "max_iter"))):
        def _capped(s=strategy, p=policy):
            d = DEQ(Cell(), solver="picard", tol=1e-30, max_iter=3, backward=s, on_failure=p)
            return d(X())[1].status
        add(f"DEQ/{strategy}/capped-forward-{policy}", _capped, expected)

add("DEQ/implicit/double-backward", lambda: _double_backward(), Err(RuntimeError, "backward='unrolled'"))


def _double_backward():
    x = torch.randn(2, 4, requires_grad=True)
    z, _ = DEQ(Cell())(x)
    torch.autograd.grad(z.sum(), x, create_graph=True)


# ------------------------------------------------------------------ make_contractive, regularisers
add("contractive/no-layers", lambda: deqlite.make_contractive(nn.Tanh()), Err(ValueError, "found no Linear/Conv layers"))
add("contractive/missing-name", lambda: deqlite.make_contractive(Cell(), names=["V"]), Err(ValueError, "no Linear/Conv layers named ['V'] in Cell; available: ['W', 'U']"))
add("contractive/method-typo", lambda: deqlite.make_contractive(Cell(), method="spectrum"), Err(ValueError, "method must be 'spectral' or 'weight'"))
add("contractive/radius=0", lambda: deqlite.make_contractive(nn.Linear(3, 3), radius=0.0), Err(ValueError, "radius must be a finite number in (0.0, inf)"))
add("contractive/radius=nan", lambda: deqlite.make_contractive(nn.Linear(3, 3), radius=math.nan), Err(ValueError, "radius must be a finite number in (0.0, inf)"))
add("contractive/mode-typo", lambda: deqlite.make_contractive(nn.Linear(3, 3), mode="fixed"), Err(ValueError, "mode must be 'clip' or 'fix'"))
add("contractive/clip", lambda: torch.linalg.matrix_norm(deqlite.make_contractive(_big_linear(), radius=0.5).weight, 2).item(), Ok(lambda s: s <= 0.5 + 1e-5))
add("contractive/fix", lambda: torch.linalg.matrix_norm(deqlite.make_contractive(nn.Linear(6, 6), radius=0.97, mode="fix").weight, 2).item(), Ok(lambda s: abs(s - 0.97) < 1e-5))
add("contractive/float64", lambda: deqlite.make_contractive(nn.Linear(6, 6).double(), radius=0.5).weight.dtype, Ok(lambda d: d == torch.float64))
add("contractive/float16", lambda: torch.linalg.matrix_norm(deqlite.make_contractive(_big_linear().half(), radius=0.5).weight.float(), 2).item(), Ok(lambda s: s <= 0.5 * 1.002))
add("contractive/bfloat16", lambda: torch.linalg.matrix_norm(deqlite.make_contractive(_big_linear().bfloat16(), radius=0.5).weight.float(), 2).item(), Ok(lambda s: s <= 0.5 * 1.01))
add("contractive/conv", lambda: deqlite.make_contractive(nn.Conv2d(2, 2, 3), radius=0.5).weight.shape, Ok(lambda s: tuple(s) == (2, 2, 3, 3)))
add("contractive/weight-norm", lambda: hasattr(deqlite.make_contractive(nn.Linear(3, 3), method="weight").parametrizations, "weight"), Ok(lambda r: r))
add("contractive/large-power-iteration", lambda: torch.linalg.matrix_norm(deqlite.make_contractive(nn.Linear(600, 600), radius=0.5).weight, 2).item(), Ok(lambda s: s <= 0.5 * 1.05))


def _big_linear():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    with torch.no_grad():
        lin.weight.mul_(10)
    return lin


def _jf(n, requires_grad=True, shape_mismatch=False):
    z = torch.randn(2, 3, requires_grad=requires_grad)
    fz = (z * 2) if not shape_mismatch else z.sum(1)
    return deqlite.jacobian_frobenius(fz, z, n_samples=n)


add("jac_frob/n_samples=0", lambda: _jf(0), Err(ValueError, "n_samples must be an integer >= 1"))
add("jac_frob/n_samples=1.5", lambda: _jf(1.5), Err(ValueError, "n_samples must be an integer >= 1"))
add("jac_frob/z-no-grad", lambda: _jf(1, requires_grad=False), Err(ValueError, "z.detach().requires_grad_()"))
add("jac_frob/shape", lambda: _jf(1, shape_mismatch=True), Err(ValueError, "same shape"))
add("jac_frob/value", lambda: _jf(4000).mean().item(), Ok(lambda v: abs(v / 12 - 1) < 0.1))  # ||2I||_F^2 = 4 * 3
add("jac_frob/not-tensors", lambda: deqlite.jacobian_frobenius([1.0], [1.0]), Err(TypeError, "must be tensors"))

# ------------------------------------------------------------------ diagnostics
A_diag = torch.tensor([[0.5, 0.0], [0.0, -0.8]])
add("spectral_radius/value", lambda: deqlite.spectral_radius(lambda z: z @ A_diag.T, Z(1, 2)).item(), Ok(lambda v: abs(v - 0.8) < 1e-3))
add("spectral_radius/unbatched", lambda: deqlite.spectral_radius(lambda z: 0.5 * z, Z(4)), Err(ValueError, "z.unsqueeze(0)"))
add("spectral_radius/batched-0.5", lambda: deqlite.spectral_radius(lambda z: 0.5 * z, Z(1, 4)).item(), Ok(lambda v: abs(v - 0.5) < 1e-6))
add("spectral_radius/n_iter=1", lambda: deqlite.spectral_radius(lambda z: 0.5 * z, Z(1, 4), n_iter=1), Err(ValueError, "n_iter must be an integer >= 2"))
add("spectral_radius/f-not-callable", lambda: deqlite.spectral_radius(None, Z(1, 4)), Err(TypeError, "f must be callable"))
add("spectral_radius/int-state", lambda: deqlite.spectral_radius(lambda z: z, torch.zeros(1, 4, dtype=torch.long)), Err(TypeError, "floating-point"))
add("jacobian_norm/unbatched", lambda: deqlite.diagnostics.jacobian_norm(lambda z: 0.5 * z, Z(4)), Err(ValueError, "z.unsqueeze(0)"))
add("jacobian_norm/value", lambda: deqlite.diagnostics.jacobian_norm(lambda z: z @ A_diag.T, Z(1, 2)).item(), Ok(lambda v: abs(v - 0.8) < 1e-3))
add("diagnose/diverged", lambda: str(deqlite.diagnose(lambda z: 1.5 * z + 1.0, Z(1, 4), solve(lambda z: 1.5 * z + 1.0, Z(1, 4), solver="picard", max_iter=20, on_failure="ignore")[1])), Ok(lambda s: len(s) > 20))
add("diagnose/converged", lambda: deqlite.diagnose(cos, Z(1, 2), solve(cos, Z(1, 2))[1]).status, Ok(lambda s: s == "converged"))
add("diagnose/trace-wrong-type", lambda: deqlite.diagnose(cos, Z(1, 2), "trace"), Err(TypeError, "SolverTrace"))


def run_case(name: str, call: Callable[[], Any], expected: Any) -> None:
    """One case: the error class and message fragment, or a result that passes its check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(expected, Err):
            with pytest.raises(expected.cls) as info:
                call()
            assert expected.fragment in str(info.value), f"{name}: message {str(info.value)!r} lacks {expected.fragment!r}"
        else:
            result = call()
            assert expected.check(result), f"{name}: unexpected result {result!r}"


@pytest.mark.parametrize("name,call,expected", CASES, ids=[c[0] for c in CASES])
def test_case(name, call, expected):
    run_case(name, call, expected)


def test_suite_size():
    assert len(CASES) >= 150, len(CASES)
