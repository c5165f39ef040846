"""DEQ with gradient-strategy objects, multi-tensor states and structured inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deqlite
from deqlite import DEQ, Implicit, JacobianFree, Phantom, Unrolled
from deqlite.backward import available_gradients, get_gradient, register_gradient
from deqlite.problems import spectral_rescale

D = 3


def _mats(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = spectral_rescale(torch.randn(2 * D, 2 * D, generator=g, dtype=torch.float64), 0.6)
    return nn.Parameter(A)


class TwoPart(nn.Module):
    """A state of two tensors (u: (B, D), v: (B, D)) coupled through one matrix; the same
    map as a single (B, 2D) state, so the two forms can be compared exactly."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.A = _mats()
        self.as_dict = as_dict

    def flat(self, z, x):
        return torch.tanh(z @ self.A.T + x)

    def forward(self, z, x):
        u, v = (z["u"], z["v"]) if self.as_dict else z
        inj = torch.cat([x["a"], x["b"]], 1) if isinstance(x, dict) else x
        out = self.flat(torch.cat([u, v], 1), inj)
        u2, v2 = out[:, :D], out[:, D:]
        return {"u": u2, "v": v2} if self.as_dict else (u2, v2)


def _x(B=4):
    return torch.randn(B, 2 * D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("backward", available_gradients())
def test_multi_tensor_state_equals_single_tensor(as_dict, backward):
    f = TwoPart(as_dict)
    x = _x().requires_grad_(True)
    zeros = torch.zeros(4, D, dtype=torch.float64)
    init = (lambda x: {"u": zeros, "v": zeros}) if as_dict else (lambda x: (zeros, zeros))
    opts = dict(tol=1e-12, max_iter=200, backward=backward)
    structured = DEQ(f, init_state=init, **opts)
    single = DEQ(f.flat, **opts)
    z_s, tr = structured(x)
    u, v = (z_s["u"], z_s["v"]) if as_dict else z_s
    assert isinstance(z_s, dict if as_dict else tuple) and tr.status == "converged"
    z_1, _ = single(x)
    assert torch.allclose(torch.cat([u, v], 1), z_1, atol=1e-10)
    (ga, gx) = torch.autograd.grad((u.sum() + 2 * v.sum()), [f.A, x])
    w = torch.cat([torch.ones(D), 2 * torch.ones(D)]).double()
    (ga1, gx1) = torch.autograd.grad((z_1 * w).sum(), [f.A, x])
    assert torch.allclose(ga, ga1, atol=1e-9) and torch.allclose(gx, gx1, atol=1e-9)


def test_dict_injection_and_gradcheck_through_tuple_state():
    f = TwoPart()
    zeros = torch.zeros(2, D, dtype=torch.float64)
    deq = DEQ(f, init_state=lambda x: (zeros, zeros), tol=1e-13, max_iter=300, backward=Implicit(tol=1e-13, max_iter=300))
    a = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, D, dtype=torch.float64)

    def out(a):
        u, v = deq({"a": a, "b": b}).z_star
        return u * v

    assert torch.autograd.gradcheck(out, (a,), eps=1e-6, atol=1e-7)


def test_strategy_objects_equal_their_names():
    x = _x()
    f = TwoPart().flat
    for obj, name, kw in [(Implicit(tol=1e-12, max_iter=200), "implicit", dict(backward_tol=1e-12, backward_max_iter=200)),
                          (Phantom(k=7, tau=0.3), "phantom", dict(phantom_k=7, phantom_tau=0.3)),
                          (JacobianFree(), "jacobian_free", {}), (Unrolled(), "unrolled", {})]:
        A = DEQ(f, tol=1e-12, max_iter=200, backward=obj)
        B = DEQ(f, tol=1e-12, max_iter=200, backward=name, **kw)
        assert A.gradient == B.gradient if not isinstance(obj, Implicit) else A.gradient.tol == B.gradient.tol
        assert A.backward == name
        # and they compute the same gradient
        grads = []
        for deq in (A, B):
            xi = x.clone().requires_grad_(True)
            z, _ = deq(xi)
            (g,) = torch.autograd.grad(z.sin().sum(), xi)
            grads.append(g)
        assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-12)


def test_object_and_shortcut_conflict_is_an_error():
    with pytest.raises(TypeError, match="set its options on it"):
        DEQ(lambda z, x: z, backward=Implicit(), backward_tol=1e-8)


def test_bad_strategy_inputs():
    with pytest.raises(TypeError, match="GradientStrategy object"):
        DEQ(lambda z, x: z, backward=3)
    with pytest.raises(TypeError, match="valid options: k, tau"):
        get_gradient("phantom", steps=3)
    with pytest.raises(ValueError, match="phantom_k must be an integer >= 1"):
        Phantom(k=0)
    with pytest.raises(TypeError, match="expects a GradientStrategy subclass"):
        register_gradient("x")(int)


def test_structured_state_errors_name_the_fix():
    f = lambda z, x: z  # noqa: E731
    with pytest.raises(TypeError, match="init_state=lambda x"):
        DEQ(f)({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="same batch size"):
        DEQ(f, init_state=lambda x: (torch.zeros(2, 3), torch.zeros(3, 3)))(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="one dtype"):
        DEQ(f, init_state=lambda x: (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)))(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="f must return a tuple of 2 tensors"):
        DEQ(lambda z, x: z[0], init_state=lambda x: (torch.zeros(2, 3), torch.zeros(2, 3)))(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="state's keys"):
        DEQ(lambda z, x: {"b": z["a"]}, init_state=lambda x: {"a": torch.zeros(2, 3)})(torch.zeros(2, 3))


def test_a_new_strategy_registers_and_runs():
    from dataclasses import dataclass

    @register_gradient("zero_test")
    @dataclass(frozen=True)
    class Zero(deqlite.GradientStrategy):
        def attach(self, f, z_star, on_failure="warn", callback=None):
            return z_star.detach() + 0 * f(z_star.detach())

    try:
        lin = nn.Linear(3, 3)
        z, _ = DEQ(lambda z, x: torch.tanh(0.3 * lin(z) + x), backward="zero_test")(torch.randn(2, 3))
        z.sum().backward()
        assert torch.equal(lin.weight.grad, torch.zeros_like(lin.weight))
    finally:
        from deqlite.backward import GRADIENTS
        GRADIENTS.pop("zero_test")


def test_warm_start_with_tuple_state():
    f = TwoPart()
    zeros = torch.zeros(4, D, dtype=torch.float64)
    deq = DEQ(f, init_state=lambda x: (zeros, zeros), warm_start=True, tol=1e-10, max_iter=100)
    x = _x()
    with torch.no_grad():
        _, first = deq(x)
        _, second = deq(x)
    assert second.nfe < first.nfe


def test_last_solve_is_the_fixed_point_even_when_the_output_is_not():
    """JacobianFree returns f(z*) (carrying the gradient); last_solve keeps the solve's z*,
    detached, in the state's structure (what a warm start of the next call needs)."""
    f = TwoPart()
    x = _x().requires_grad_(True)
    zeros = torch.zeros(4, D, dtype=torch.float64)
    deq = DEQ(f, init_state=lambda x: (zeros, zeros), tol=1e-12, max_iter=300, backward=JacobianFree())
    (u, v), _ = deq(x)
    su, sv = deq.last_solve
    assert not su.requires_grad and u.requires_grad
    fu, fv = f((su, sv), x)
    assert torch.allclose(fu, su, atol=1e-10) and torch.allclose(u, fu, atol=1e-10)
