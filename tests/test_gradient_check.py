"""deqlite.diagnostics.finite_difference_check: the gradient check of the implicit-backward
chapter as a library function."""
import pytest
import torch
from torch import nn

from deqlite.diagnostics import finite_difference_check


def _model_and_loss():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    return net, (lambda: (net(x) ** 2).mean())


def test_accepts_the_true_gradient_and_rejects_a_wrong_one():
    net, loss = _model_and_loss()
    params = list(net.parameters())
    grad = torch.autograd.grad(loss(), params)
    before = [p.detach().clone() for p in params]
    good = finite_difference_check(loss, params, grad, n_directions=6)
    assert good.rel_error < 1e-8 and len(good.finite_differences) == 6
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # parameters restored
    flat = torch.cat([g.reshape(-1) for g in grad])
    bad = finite_difference_check(loss, params, 1.1 * flat, n_directions=6)
    assert bad.rel_error == pytest.approx(0.1, rel=1e-5)  # a 10% too large gradient shows as such
    wrong_part = [grad[0], grad[1], torch.zeros_like(grad[2]), grad[3]]
    assert finite_difference_check(loss, params, wrong_part).rel_error > 1e-3


def test_same_seed_same_directions():
    net, loss = _model_and_loss()
    params = list(net.parameters())
    grad = torch.autograd.grad(loss(), params)
    a = finite_difference_check(loss, params, grad, seed=3)
    b = finite_difference_check(loss, params, grad, seed=3)
    assert a.finite_differences == b.finite_differences


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(grad=torch.zeros(3)), ValueError, "grad has 3 entries but params have 21"),
    (dict(n_directions=0), ValueError, "n_directions must be an integer >= 1, got 0"),
    (dict(eps=0.0), ValueError, r"eps must be a finite number in \(0.0, inf\)"),
    (dict(params=[]), TypeError, "params must be a non-empty sequence"),
    (dict(loss=3.0), TypeError, "loss must be a function"),
])
def test_bad_input(kwargs, err, match):
    net, loss = _model_and_loss()
    params = list(net.parameters())
    args = dict(loss=loss, params=params, grad=torch.zeros(21, dtype=torch.float64))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        finite_difference_check(args.pop("loss"), args.pop("params"), args.pop("grad"), **args)
