"""Gradients at the edges: closures, double backward, failed adjoint solves, threads.

The happy-path checks (gradcheck, autograd through 200 Picard steps, closed-form affine
adjoint) are in test_deq.py; here every case is one a user meets, and each failed on the
code before the fix (see the comments).
"""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import deqlite
from deqlite import DEQ
from deqlite.backward import BACKWARD_STRATEGIES, DEQConvergenceWarning
from deqlite.problems import spectral_rescale

D, B = 4, 3
STRATEGIES = list(BACKWARD_STRATEGIES)


def _lin(seed=0, scale=0.5):
    torch.manual_seed(seed)
    lin = nn.Linear(D, D).double()
    with torch.no_grad():
        lin.weight.copy_(spectral_rescale(lin.weight, scale))
    return lin


@pytest.mark.parametrize("backward", STRATEGIES)
def test_closure_parameters_get_gradients(backward):
    # before: with x not requiring grad the output was detached and backward() raised
    lin = _lin()
    deq = DEQ(lambda z, x: torch.tanh(0.5 * lin(z) + x), tol=1e-10, max_iter=200,
              backward=backward, backward_tol=1e-10, backward_max_iter=200, phantom_k=60,
              phantom_tau=1.0)
    x = torch.randn(B, D, dtype=torch.float64)
    z, _ = deq(x)
    assert z.requires_grad
    z.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_closure_gradient_matches_unrolled_autograd():
    lin = _lin(1)
    x = torch.randn(B, D, dtype=torch.float64)
    f = lambda z, x: torch.tanh(0.5 * lin(z) + x)  # noqa: E731
    z, _ = DEQ(f, tol=1e-12, max_iter=300, backward_tol=1e-12, backward_max_iter=300)(x)
    (g_impl,) = torch.autograd.grad(z.pow(2).sum(), lin.weight)
    zz = torch.zeros_like(x)
    for _ in range(200):  # autograd through plain iteration, the reference
        zz = f(zz, x)
    (g_ref,) = torch.autograd.grad(zz.pow(2).sum(), lin.weight)
    assert torch.allclose(g_impl, g_ref, rtol=1e-8, atol=1e-10)


def test_no_probe_and_no_graph_under_no_grad():
    lin = _lin()
    deq = DEQ(lambda z, x: torch.tanh(0.5 * lin(z) + x))
    with torch.no_grad():
        z, _ = deq(torch.randn(B, D, dtype=torch.float64))
    assert not z.requires_grad


def test_frozen_closure_is_not_attached():
    lin = _lin().requires_grad_(False)
    z, _ = DEQ(lambda z, x: torch.tanh(0.5 * lin(z) + x))(torch.randn(B, D, dtype=torch.float64))
    assert not z.requires_grad


# ---------------------------------------------------------------- double backward

def _scalar_deq(backward):
    """z* = a tanh(z*) + x with a scalar parameter a: d/da of dL/dx, checked by FD."""
    a = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    deq = DEQ(lambda z, x: a * torch.tanh(z) + x, tol=1e-13, max_iter=400, backward=backward,
              backward_tol=1e-13, backward_max_iter=400, solver="anderson")
    return a, deq


def test_double_backward_through_implicit_is_refused_clearly():
    # before: create_graph=True returned a wrong second derivative (-3.108 vs FD -2.871)
    a, deq = _scalar_deq("implicit")
    x = torch.full((1, 3), 0.3, dtype=torch.float64, requires_grad=True)
    z, _ = deq(x)
    with pytest.raises(RuntimeError, match="backward='unrolled'"):
        torch.autograd.grad(z.pow(2).sum(), x, create_graph=True)


def test_double_backward_through_unrolled_is_right():
    def grad_x(a_val):
        a = torch.tensor(a_val, dtype=torch.float64, requires_grad=True)
        deq = DEQ(lambda z, x: a * torch.tanh(z) + x, tol=1e-13, max_iter=400, backward="unrolled",
                  solver="picard")
        x = torch.full((1, 3), 0.3, dtype=torch.float64, requires_grad=True)
        z, _ = deq(x)
        (gx,) = torch.autograd.grad(z.pow(2).sum(), x, create_graph=True)
        return a, gx.sum()

    a, s = grad_x(0.6)
    (d_a,) = torch.autograd.grad(s, a)
    h = 1e-6
    fd = (grad_x(0.6 + h)[1] - grad_x(0.6 - h)[1]).item() / (2 * h)
    assert abs(d_a.item() - fd) < 1e-5 * max(1.0, abs(fd))


def test_gradgradcheck_unrolled():
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    deq = DEQ(lambda z, x: a * torch.tanh(z) + x, tol=1e-14, max_iter=400, backward="unrolled",
              solver="picard")
    x = torch.full((1, 2), 0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: deq(x).z_star, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_first_order_gradient_unaffected_by_double_backward_guard():
    a, deq = _scalar_deq("implicit")
    x = torch.full((1, 3), 0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: deq(x).z_star, (x,), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- failure policy

class Slow(nn.Module):
    """f(z, x) = 0.97 R z + x: a slow contraction, so a 2-step adjoint solve fails."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(spectral_rescale(torch.randn(D, D, generator=g, dtype=torch.float64), 0.97))

    def forward(self, z, x):
        return z @ self.A.T + x


def _run(on_failure, backward_max_iter=2, max_iter=500):
    deq = DEQ(Slow(), solver="anderson", tol=1e-10, max_iter=max_iter, backward_max_iter=backward_max_iter,
              backward_tol=1e-10, on_failure=on_failure)
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    z, _ = deq(x)
    z.sum().backward()
    return deq


def test_failed_adjoint_raises_when_asked():
    # before: the adjoint solve always ran with on_failure="ignore": a 15%-off gradient, silently
    with pytest.raises(deqlite.ConvergenceError, match="backward \\(adjoint\\) solve did not converge"):
        _run("raise")


def test_failed_adjoint_warns_by_default():
    with pytest.warns(DEQConvergenceWarning, match="gradient is inexact"):
        _run("warn")


def test_failed_adjoint_ignored_only_when_asked():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq = _run("ignore")
    assert deq.last_backward_trace.status == "max_iter"


def test_failed_forward_warns_by_default():
    deq = DEQ(Slow(), solver="picard", tol=1e-12, max_iter=3)
    with pytest.warns(DEQConvergenceWarning, match="DEQ forward solve did not converge"):
        deq(torch.randn(B, D, dtype=torch.float64))


def test_failed_forward_raises_with_trace():
    deq = DEQ(Slow(), solver="picard", tol=1e-12, max_iter=3, on_failure="raise")
    with pytest.raises(deqlite.ConvergenceError) as err:
        deq(torch.randn(B, D, dtype=torch.float64))
    assert err.value.trace.status == "max_iter"


def test_converged_solve_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run("warn", backward_max_iter=500)


def test_bad_failure_policy_is_named():
    with pytest.raises(ValueError, match="on_failure must be one of"):
        DEQ(Slow(), on_failure="loud")


# ---------------------------------------------------------------- contractive weights, threads

class Cell(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.W, self.U = nn.Linear(D, D, bias=False).double(), nn.Linear(D, D).double()

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


def _model(seed):
    cell = deqlite.make_contractive(Cell(seed), radius=0.8, names=["W"])
    return DEQ(cell, tol=1e-9, max_iter=100, backward_tol=1e-9, backward_max_iter=100)


def _train(deq, seed, steps=10):
    opt = torch.optim.SGD(deq.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + seed)
    grads = []
    for _ in range(steps):
        x = torch.randn(8, D, generator=g, dtype=torch.float64)
        z, _ = deq(x)
        loss = (z - 0.1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        w = deq.f.W.parametrizations.weight.original
        grads.append(None if w.grad is None else w.grad.clone())
        opt.step()
    return grads


def _in_threads(work, args) -> None:
    """Run ``work(a)`` for each ``a`` in its own thread at once; fail with any exception."""
    errors = []

    def guarded(a):
        try:
            work(a)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_contractive_weight_gets_gradient_inside_users_cached_block():
    # before: grad None (the no-grad solve's weight was reused by the gradient step)
    deq = _model(0)
    with parametrize.cached():
        z, _ = deq(torch.randn(B, D, dtype=torch.float64))
        z.sum().backward()
    assert deq.f.W.parametrizations.weight.original.grad is not None


def test_two_threads_train_two_models_exactly_as_alone():
    # before: 30-39 of 80 gradients of the contractive weight were lost
    alone = [_train(_model(s), s) for s in (0, 1)]
    models = {s: _model(s) for s in (0, 1)}  # built here: torch.manual_seed is process-wide
    results = {}

    def work(s):
        results[s] = _train(models[s], s)

    _in_threads(work, (0, 1))
    for s in (0, 1):
        for a, b in zip(alone[s], results[s]):
            assert a is not None and b is not None
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_one_model_shared_by_two_threads():
    # before: "backward through the graph a second time" in 3 of 5 runs
    deq = _model(0)

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(10):
            z, _ = deq(torch.randn(8, D, generator=g, dtype=torch.float64))
            torch.autograd.grad(z.sum(), deq.f.W.parametrizations.weight.original)

    _in_threads(work, (0, 1))


# ---------------------------------------------------------------- closed forms, every strategy

def _affine_grad(strategy, k=7, tau=0.5):
    """dL/dx for f(z, x) = A z + x and L = <c, z*>, from the strategy."""
    g = torch.Generator().manual_seed(3)
    A = spectral_rescale(torch.randn(D, D, generator=g, dtype=torch.float64), 0.7)
    c = torch.randn(B, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    deq = DEQ(lambda z, x: z @ A.T + x, solver="anderson", tol=1e-13, max_iter=300, backward=strategy,
              backward_tol=1e-13, backward_max_iter=300, phantom_k=k, phantom_tau=tau)
    z, _ = deq(x)
    (gx,) = torch.autograd.grad((c * z).sum(), x)
    return A, c, gx


@pytest.mark.parametrize("strategy", ["implicit", "unrolled"])
def test_exact_strategies_match_closed_form(strategy):
    A, c, gx = _affine_grad(strategy)
    expected = torch.linalg.solve((torch.eye(D, dtype=A.dtype) - A).T, c.T).T  # (I - A)^{-T} c
    assert torch.allclose(gx, expected, rtol=1e-9, atol=1e-10)


def test_jacobian_free_is_the_closed_form_with_J_zero():
    _, c, gx = _affine_grad("jacobian_free")
    assert torch.allclose(gx, c, rtol=1e-12, atol=1e-12)  # dz*/dx replaced by df/dx = I


def test_phantom_is_its_closed_form_truncated_series():
    k, tau = 7, 0.5
    A, c, gx = _affine_grad("phantom", k=k, tau=tau)
    M = (1 - tau) * torch.eye(D, dtype=A.dtype) + tau * A  # one damped step's Jacobian
    series = sum(torch.linalg.matrix_power(M, j) for j in range(k))
    assert torch.allclose(gx, tau * c @ series, rtol=1e-10, atol=1e-12)
