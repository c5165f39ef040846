"""The DEQ layer and its gradients, checked three ways in float64."""
import pytest
import torch

import deqlite
from torch import nn


from deqlite import DEQ
from deqlite.problems import spectral_rescale

D, B = 5, 3
EXACT = ["implicit", "unrolled", "phantom"]  # phantom exact only in the limit: big k, tau=1


class TanhMap(nn.Module):
    """f(z, x) = tanh(W z + U x + b), ||W|| = 0.6."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(spectral_rescale(torch.randn(D, D, generator=g, dtype=torch.float64), 0.6))
        self.U = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class AffineMap(nn.Module):
    """f(z, x) = A z + x: z* = (I - A)^{-1} x, so dL/dx = (I - A)^{-T} dL/dz*."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.A = nn.Parameter(spectral_rescale(torch.randn(D, D, generator=g, dtype=torch.float64), 0.7))

    def forward(self, z, x):
        return z @ self.A.T + x


def make(f, backward, **kw):
    base = dict(solver="anderson", tol=1e-13, max_iter=300, backward=backward, backward_tol=1e-13,
                backward_max_iter=300, phantom_k=80, phantom_tau=1.0)
    base.update(kw)
    return DEQ(f, **base)


def x_input(seed=2):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("backward", EXACT)
def test_gradcheck_wrt_input_and_parameters(backward):
    f = TanhMap()
    deq = make(f, backward)
    x = x_input()
    assert torch.autograd.gradcheck(lambda x: deq(x).z_star, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)

    def of_w(W):
        with torch.no_grad():
            f.W.copy_(W)
        return deq(x.detach()).z_star

    # gradient w.r.t. W through the module: compare autograd's W.grad to finite differences
    loss_w = lambda: (deq(x.detach()).z_star.sin()).sum()  # noqa: E731
    f.zero_grad()
    loss_w().backward()
    analytic = f.W.grad.clone()
    numeric = torch.zeros_like(analytic)
    h = 1e-6
    with torch.no_grad():
        for i in range(D):
            for j in range(D):
                f.W[i, j] += h
                lp = loss_w()
                f.W[i, j] -= 2 * h
                lm = loss_w()
                f.W[i, j] += h
                numeric[i, j] = (lp - lm) / (2 * h)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backward", EXACT)
def test_matches_autograd_through_unrolled_iterations(backward):
    f = TanhMap()
    x = x_input()
    v = torch.randn(B, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    # reference: plain autograd through 200 Picard steps (contraction 0.6 -> error 1e-44)
    z = torch.zeros(B, D, dtype=torch.float64)
    for _ in range(200):
        z = f(z, x)
    ref = torch.autograd.grad((z * v).sum(), [x, f.W, f.U, f.b])
    got = torch.autograd.grad((make(f, backward)(x).z_star * v).sum(), [x, f.W, f.U, f.b])
    for r, g in zip(ref, got):
        assert ((g - r).norm() / r.norm()) <= 1e-6


@pytest.mark.parametrize("backward", EXACT)
def test_closed_form_affine_gradient(backward):
    f = AffineMap()
    x = x_input()
    v = torch.randn(B, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    z = make(f, backward)(x).z_star
    I = torch.eye(D, dtype=torch.float64)
    A = f.A.detach()
    torch.testing.assert_close(z, torch.linalg.solve(I - A, x.detach().T).T, rtol=1e-10, atol=1e-12)
    gx, gA = torch.autograd.grad((z * v).sum(), [x, f.A])
    adj = torch.linalg.solve((I - A).T, v.T).T  # (I - A)^{-T} v, per sample
    torch.testing.assert_close(gx, adj, rtol=1e-8, atol=1e-10)
    # dL/dA = sum_b adj_b z*_b^T
    torch.testing.assert_close(gA, adj.T @ z.detach(), rtol=1e-8, atol=1e-10)


def test_jacobian_free_gradient_is_the_one_step_approximation():
    f = AffineMap()
    x = x_input()
    v = torch.randn(B, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (gx,) = torch.autograd.grad((make(f, "jacobian_free")(x).z_star * v).sum(), [x])
    torch.testing.assert_close(gx, v)  # J treated as 0: dL/dx = df/dx^T v = v
    exact = torch.linalg.solve((torch.eye(D, dtype=torch.float64) - f.A.detach()).T, v.T).T
    assert (gx - exact).norm() > 1e-3 * exact.norm()  # and it is not the exact gradient


def test_phantom_approaches_implicit_as_k_grows():
    f = TanhMap()
    x = x_input()
    v = torch.randn(B, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (exact,) = torch.autograd.grad((make(f, "implicit")(x).z_star * v).sum(), [f.W])
    errs = []
    for k in (1, 2, 4, 8, 16, 32):
        (g,) = torch.autograd.grad((make(f, "phantom", phantom_k=k, phantom_tau=0.8)(x).z_star * v).sum(), [f.W])
        errs.append(((g - exact).norm() / exact.norm()).item())
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-6 and errs[0] > 1e-2


def test_backward_trace_available_and_converged():
    f = TanhMap()
    seen = []
    deq = make(f, "implicit", backward_callback=seen.append)
    z, tr = deq(x_input())
    z.sum().backward()
    assert deq.last_backward_trace is not None and seen == [deq.last_backward_trace]
    assert deq.last_backward_trace.status == "converged"
    assert deq.last_backward_trace.extra["kind"] == "backward"
    assert tr.status == "converged" and tr.nfe == tr.n_steps


def test_eval_mode_uses_eval_settings_but_never_detaches():
    f = TanhMap()
    deq = make(f, "implicit", tol=1e-3, max_iter=3, eval_solve=dict(tol=1e-12, max_iter=200))
    x = x_input()
    z_train, tr_train = deq(x)
    assert tr_train.n_steps <= 3
    deq.eval()
    z_eval, tr_eval = deq(x)
    assert tr_eval.status == "converged" and tr_eval.n_steps > 3
    assert z_eval.requires_grad
    (g,) = torch.autograd.grad(z_eval.sum(), [x])
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with torch.no_grad():
        z_ng, _ = deq(x)
    assert not z_ng.requires_grad


def test_warm_start_reuses_previous_fixed_point():
    f = TanhMap()
    deq = make(f, "implicit", tol=1e-10, warm_start=True)
    x = x_input()
    _, tr1 = deq(x)
    _, tr2 = deq(x)
    assert tr2.n_steps < tr1.n_steps and tr2.n_steps <= 2
    # explicit z0 works too, and a fresh shape falls back to the default start
    z, tr3 = deq(torch.randn(7, D, dtype=torch.float64))
    assert z.shape == (7, D) and tr3.status == "converged"


def test_deq_errors():
    f = TanhMap()
    with pytest.raises(ValueError, match="unknown backward strategy 'implicitt'"):
        DEQ(f, backward="implicitt")
    with pytest.raises(ValueError, match="registered solvers"):
        DEQ(f, solver="brodyen")
    with pytest.raises(TypeError, match="valid options"):
        DEQ(f, solver=deqlite.get_solver("anderson", memory=3))
    with pytest.raises(ValueError, match="newton"):
        DEQ(f, solver="newton", backward="unrolled")
    with pytest.raises(ValueError, match="phantom_k"):
        DEQ(f, backward="phantom", phantom_k=0)
    with pytest.raises(TypeError, match="callable"):
        DEQ(3)


def test_training_reduces_loss_and_float32_works():
    torch.manual_seed(0)
    f = TanhMap().float()
    head = nn.Linear(D, 1)
    deq = DEQ(f, tol=1e-4, max_iter=30, backward_tol=1e-4, backward_max_iter=30)
    x = torch.randn(64, D)
    y = torch.sin(x.sum(1, keepdim=True))
    opt = torch.optim.Adam(list(f.parameters()) + list(head.parameters()), 2e-2)
    losses = []
    for _ in range(30):
        loss = (head(deq(x).z_star) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_classifier_model_shapes_and_errors():
    from deqlite.models.mlp import DEQClassifier
    m = DEQClassifier(64, 16, 10)
    out = m(torch.randn(4, 64))
    assert out.shape == (4, 10) and m.last_trace.status == "converged"
    assert torch.linalg.matrix_norm(m.cell.W.weight.detach(), 2) <= 0.9 + 1e-4
    # gradients reach the parametrised (spectrally constrained) weight
    out.sum().backward()
    g = m.cell.W.parametrizations.weight.original.grad
    assert g is not None and g.abs().sum() > 0
    with pytest.raises(ValueError, match=r"x must have shape \(B, 64\)"):
        m(torch.randn(4, 63))
