"""Contractivity helpers, the Jacobian regulariser and diagnose()."""
import pytest
import torch
from torch import nn

import deqlite
from deqlite import problems as P
from deqlite.diagnostics import diagnose, jacobian_norm, spectral_radius
from deqlite.regularize import jacobian_frobenius, make_contractive
from deqlite.solvers import solve



def test_lazy_top_level_names():
    assert deqlite.diagnose is diagnose and deqlite.spectral_radius is spectral_radius
    assert deqlite.make_contractive is make_contractive and deqlite.jacobian_frobenius is jacobian_frobenius
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = deqlite.nope


def test_spectral_radius_and_norm_of_linear_maps():
    # non-normal: radius 0.5, norm much larger
    A = torch.tensor([[0.5, 3.0], [0.0, 0.4]], dtype=torch.float64)
    z = torch.zeros(2, 2, dtype=torch.float64)
    rho = spectral_radius(lambda z: z @ A.T, z, n_iter=200)
    nrm = jacobian_norm(lambda z: z @ A.T, z)
    torch.testing.assert_close(rho, torch.full((2,), 0.5, dtype=torch.float64), atol=5e-3, rtol=0)
    torch.testing.assert_close(nrm, torch.full((2,), torch.linalg.matrix_norm(A, 2).item(), dtype=torch.float64), rtol=1e-6, atol=0)


def test_spectral_radius_complex_pair():
    prob = P.rotation_map(radius=0.9)  # eigenvalues 0.9 e^{+-i theta}
    rho = spectral_radius(prob.f, prob.z0, n_iter=100)
    assert abs(rho.item() - 0.9) < 0.02


def test_make_contractive_bounds_spectral_norm_and_trains():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    with torch.no_grad():
        f[0].weight.mul_(10)
    make_contractive(f, radius=0.8)
    assert torch.linalg.matrix_norm(f[0].weight.detach(), 2) <= 0.8 + 1e-4
    opt = torch.optim.SGD(f.parameters(), 1.0)
    for _ in range(5):
        loss = -f(torch.randn(8, 16)).pow(2).sum()  # pushes weights up
        opt.zero_grad()
        loss.backward()
        opt.step()
    f.eval()
    assert torch.linalg.matrix_norm(f[0].weight.detach(), 2) <= 0.8 + 1e-3


def test_make_contractive_errors_and_names():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Linear(4, 4)
            self.U = nn.Linear(4, 4)

    m = make_contractive(Two(), radius=0.5, names=["W"])
    assert hasattr(m.W, "parametrizations") and not hasattr(m.U, "parametrizations")
    with pytest.raises(ValueError, match=r"found no Linear/Conv layers named \['V'\]"):
        make_contractive(Two(), names=["V"])
    with pytest.raises(ValueError, match="found no Linear/Conv layers"):
        make_contractive(nn.Tanh())
    with pytest.raises(ValueError, match="method must be"):
        make_contractive(Two(), method="lipschitz")


def test_jacobian_frobenius_hutchinson_is_unbiased():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    z = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    est = jacobian_frobenius(torch.tanh(z @ A.T), z, n_samples=4000, generator=g)
    J = torch.func.vmap(torch.func.jacrev(lambda zz: torch.tanh(zz @ A.T)))(z.detach())
    exact = J.pow(2).sum((1, 2))
    assert ((est - exact).abs() / exact).max() < 0.08
    est.sum().backward()  # differentiable (create_graph=True)
    with pytest.raises(ValueError, match="must require grad"):
        jacobian_frobenius(z.detach() * 2, z.detach())


def test_diagnose_explains_non_contractive_map():
    prob = P.rotation_map(radius=1.05)
    _, tr = solve(prob.f, prob.z0, solver="picard", tol=1e-8, max_iter=60, return_iterates=True)
    d = diagnose(prob.f, prob.z0, tr)
    assert d.spectral_radius > 1.0 and d.trend == "growing"
    text = str(d)
    assert "NOT locally contractive" in text and "broyden" in text


def test_diagnose_slow_linear_convergence_suggests_more_steps():
    prob = P.affine(D=8, B=2, rho=0.97)
    _, tr = solve(prob.f, prob.z0, solver="picard", tol=1e-10, max_iter=40)
    d = diagnose(prob.f, prob.z0, tr)
    assert d.spectral_radius < 1 and tr.status == "max_iter"
    assert "more steps" in str(d)


def test_diagnose_reports_anderson_conditioning():
    prob = P.tanh_layer(D=32, B=2, dtype=torch.float64)
    d = diagnose(prob.f, prob.z0, solver="anderson", tol=1e-14, max_iter=30)
    assert d.anderson_condition is not None and d.anderson_condition > 1.0
    assert "condition number" in str(d) and d._repr_markdown_().startswith("**Diagnosis**")
