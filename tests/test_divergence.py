"""A runaway iteration is reported as "diverged", never as "converged" (issue: overflow).

Before the fix, plain and damped iteration on an expanding map returned status
"converged" once ||f(z)|| overflowed: the relative residual became finite / inf = 0.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deqlite

DTYPES = [torch.float32, torch.float64]
SOLVERS = [s for s in deqlite.available_solvers() if s not in ("newton", "hyper")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stop", ["rel", "abs"])
@pytest.mark.parametrize("solver", ["picard", "km"])
def test_overflow_is_diverged_not_converged(solver, stop, dtype):
    # float64 needs ~320 steps of z -> 3z + 1 before ||f(z)||^2 overflows
    z, tr = deqlite.solve(lambda z: 3 * z + 1, torch.zeros(2, 5, dtype=dtype), solver=solver,
                          stop=stop, max_iter=800, on_failure="ignore")
    assert tr.status == "diverged", tr.summary()
    assert bool(tr.diverged.all()) and not bool(tr.converged.any())
    assert torch.isfinite(z).all(), "the best finite iterate is returned"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_overflow_every_solver_never_falsely_converged(solver, dtype):
    """Whatever the solver does on an expanding map, 'converged' must mean a fixed point."""
    f = lambda z: 3 * z + 1  # noqa: E731  (repelling fixed point at -1/2)
    z, tr = deqlite.solve(f, torch.zeros(2, 5, dtype=dtype), solver=solver, max_iter=800,
                          on_failure="ignore")
    if tr.status == "converged":
        assert torch.allclose(z, torch.full_like(z, -0.5), atol=1e-3), (solver, z)
    else:
        assert tr.status in ("diverged", "max_iter")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(scale=st.floats(1.05, 50.0), shift=st.floats(-5.0, 5.0).filter(lambda s: abs(s) > 1e-3),
       beta=st.floats(0.2, 1.0), f64=st.booleans(), stop=st.sampled_from(["rel", "abs"]))
def test_expanding_affine_maps_never_converge(scale, shift, beta, f64, stop):
    """Plain and damped iteration of z -> a z + b with a > 1 from z0 = 0 never converge."""
    dtype = torch.float64 if f64 else torch.float32
    for solver, opts in (("picard", {}), ("km", {"beta": beta})):
        z, tr = deqlite.solve(lambda z: scale * z + shift, torch.zeros(3, 4, dtype=dtype),
                              solver=solver, stop=stop, max_iter=2000, tol=1e-6,
                              on_failure="ignore", **opts)
        assert tr.status != "converged", (solver, scale, shift, tr.summary())
        assert torch.isfinite(z).all()


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("step", [0, 2])
def test_non_finite_at_step_k(solver, bad, step):
    """f returns a non-finite value for sample 1 at step k: that sample is 'diverged' and
    keeps its best finite iterate; sample 0 converges as if alone."""
    calls = {"n": 0}

    def f(z):
        out = 0.5 * torch.sin(z) + 1.0
        if calls["n"] == step:
            out = out.clone()
            out[1, 0] = bad
        calls["n"] += 1
        return out

    z, tr = deqlite.solve(f, torch.zeros(2, 3, dtype=torch.float64), solver=solver, tol=1e-8,
                          max_iter=200, on_failure="ignore")
    assert tr.status == "diverged"
    assert tr.diverged.tolist() == [False, True]
    assert bool(tr.converged[0])
    assert torch.isfinite(z).all()
    alone, _ = deqlite.solve(lambda z: 0.5 * torch.sin(z) + 1.0, torch.zeros(1, 3, dtype=torch.float64),
                             solver=solver, tol=1e-8, max_iter=200)
    assert torch.allclose(z[0], alone[0], atol=1e-6)


def test_warn_policy_warns_on_overflow():
    with pytest.warns(RuntimeWarning, match="Non-finite values appeared"):
        deqlite.solve(lambda z: 3 * z + 1, torch.zeros(1, 2), solver="picard", max_iter=200)


def test_raise_policy_raises_on_overflow():
    with pytest.raises(deqlite.ConvergenceError, match="diverged"):
        deqlite.solve(lambda z: 3 * z + 1, torch.zeros(1, 2), solver="picard", max_iter=200,
                      on_failure="raise")
