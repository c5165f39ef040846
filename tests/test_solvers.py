"""The solve loop and every solver: known answers, traces, errors, properties."""
import warnings

import pytest
import numpy as np
import torch
from hypothesis import given, settings, strategies as st

import deqlite

from deqlite import problems as P
from deqlite.solvers import (Anderson, Broyden, ConvergenceError, KrasnoselskiiMann, Picard,
                             Solver, available_solvers, get_solver, register_solver, solve)

# from the registry: a newly registered solver is tested here without editing a list
ALL = available_solvers()
PLAIN = {"picard", "km"}  # the un-accelerated iterations; every other solver must beat them
ACCEL = [name for name in ALL if name not in PLAIN]


def opts(name):
    return {"beta": 0.7} if name == "km" else {}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_contraction_known_fixed_point(name, dtype):
    prob = P.affine(D=12, B=3, rho=0.7, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    z, tr = solve(prob.f, prob.z0, solver=name, tol=tol, max_iter=300, **opts(name))
    assert tr.status == "converged", tr
    err = (z - prob.z_star).norm() / prob.z_star.norm()
    assert err < (1e-4 if dtype == torch.float32 else 1e-9)
    assert z.dtype == dtype


@pytest.mark.parametrize("name", ALL)
def test_cosine(name):
    prob = P.cosine(B=2)
    z, tr = solve(prob.f, prob.z0, solver=name, tol=1e-12, max_iter=200, stop="abs", **opts(name))
    assert tr.status == "converged"
    torch.testing.assert_close(z, prob.z_star, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_tanh_layer(name):
    prob = P.tanh_layer(D=32, B=4, dtype=torch.float64)
    z, tr = solve(prob.f, prob.z0, solver=name, tol=1e-10, max_iter=200, **opts(name))
    assert tr.status == "converged"
    assert ((prob.f(z) - z).norm(dim=1) / prob.f(z).norm(dim=1)).max() <= 1e-10


@pytest.mark.parametrize("name", ACCEL)
def test_accelerated_solvers_succeed_where_picard_fails(name):
    # a rotation scaled by 1.02: plain iteration spirals out, the fixed point still exists
    prob = P.rotation_map(B=2, radius=1.02)
    _, tr_p = solve(prob.f, prob.z0, solver="picard", tol=1e-8, max_iter=100)
    assert tr_p.status == "max_iter" and tr_p.residual[-1].min() > tr_p.residual[0].max()
    z, tr = solve(prob.f, prob.z0, solver=name, tol=1e-10, max_iter=100)
    assert tr.status == "converged"
    torch.testing.assert_close(z, prob.z_star, atol=1e-8, rtol=1e-8)


def test_anderson_and_broyden_beat_picard_on_expansive_tanh():
    # P2b: plain iteration stalls on tanh(Wz + Ux + b) with W = 1.5 x orthogonal
    prob = P.expansive_tanh(D=64, B=4, averaged=False, dtype=torch.float64)
    _, tr_p = solve(prob.f, prob.z0, solver="picard", tol=1e-6, max_iter=150)
    _, tr_a = solve(prob.f, prob.z0, solver="anderson", tol=1e-6, max_iter=150, m=10)
    _, tr_b = solve(prob.f, prob.z0, solver="broyden", tol=1e-6, max_iter=150)
    assert tr_p.status == "max_iter" and tr_p.best_residual.max() > 1e-4
    assert tr_a.status == "converged" and tr_b.status == "converged"


def test_scaled_ridge_beats_fixed_ridge():
    prob = P.conv_groupnorm(B=4, dtype=torch.float64)
    _, scaled = solve(prob.f, prob.z0, solver="anderson", tol=1e-6, max_iter=100)
    _, fixed = solve(prob.f, prob.z0, solver="anderson", tol=1e-6, max_iter=100, scale_ridge=False)
    assert scaled.status == "converged"
    assert scaled.nfe < fixed.nfe


def test_trace_has_one_row_per_step_and_no_padding():
    prob = P.affine(D=8, B=5, rho=0.5)
    z, tr = solve(prob.f, prob.z0, solver="picard", tol=1e-8, max_iter=500, return_iterates=True)
    assert tr.n_steps == tr.nfe == len(tr.iterates) == tr.abs_residual.shape[0] == tr.rel_residual.shape[0]
    assert tr.n_steps < 500
    assert tr.abs_residual.shape == (tr.n_steps, 5)
    # the last row is the step that met tol; earlier rows did not all meet it
    assert (tr.rel_residual[-1] <= 1e-8).all() and not (tr.rel_residual[-2] <= 1e-8).all()
    # residuals match the definition for the recorded iterates
    for k in (0, tr.n_steps - 1):
        zk = tr.iterates[k]
        torch.testing.assert_close(tr.abs_residual[k], (prob.f(zk) - zk).norm(dim=1))
        torch.testing.assert_close(tr.rel_residual[k], (prob.f(zk) - zk).norm(dim=1) / prob.f(zk).norm(dim=1))
    d = tr.to_dict()
    assert d["abs_residual"].shape == (tr.n_steps, 5) and d["iterates"].shape[0] == tr.n_steps
    assert d["status"] == "converged"


def test_max_iter_rows_and_status():
    prob = P.affine(D=8, B=2, rho=0.9)
    _, tr = solve(prob.f, prob.z0, solver="picard", tol=1e-12, max_iter=7)
    assert tr.status == "max_iter" and tr.n_steps == 7 and tr.nfe == 7
    assert not tr.converged.any()
    with pytest.raises(ConvergenceError, match="did not converge"):
        solve(prob.f, prob.z0, solver="picard", tol=1e-12, max_iter=7, on_failure="raise")


def test_per_sample_stopping_keeps_best_iterate():
    prob = P.affine(D=8, B=3, rho=0.5)
    z, tr = solve(prob.f, prob.z0, solver="picard", tol=1e-6, max_iter=200, return_iterates=True)
    for b in range(3):
        k = int(tr.best_step[b])
        torch.testing.assert_close(z[b], tr.iterates[k][b])
        assert tr.residual[k, b] == tr.residual[:, b].min()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_best_iterate_is_exact_when_residuals_go_up_and_down(dtype):
    """The best iterate is blended in with torch.lerp and 0/1 weights: it must be exactly the
    iterate at best_step, with residuals that rise and fall per sample."""
    g = torch.Generator().manual_seed(3)
    W = (torch.randn(16, 16, generator=g, dtype=torch.float64) * 0.6).to(dtype)  # not a contraction
    x = torch.randn(5, 16, generator=g, dtype=torch.float64).to(dtype)
    z, tr = solve(lambda z: torch.tanh(z @ W.T + x), torch.zeros(5, 16, dtype=dtype), solver="picard",
                  tol=1e-30, max_iter=40, return_iterates=True, on_failure="ignore")
    steps = tr.best_step.tolist()
    assert len(set(steps)) > 1 and min(steps) < 39, "some sample's best is an earlier iterate"
    for b in range(5):
        assert torch.equal(z[b], tr.iterates[steps[b]][b])
        assert tr.residual[steps[b], b] == tr.residual[:, b].min()


def test_best_iterate_blend_falls_back_to_where_near_the_dtype_range():
    """Near finfo.max, z - best overflows and lerp would return NaN: once a norm reaches
    finfo.max / 8 the loop's records choose with torch.where instead."""
    from deqlite.solvers.loop import _Records

    z = torch.tensor([[3e38, -3e38], [1.0, 2.0]])
    best = torch.tensor([[-3e38, 3e38], [5.0, 6.0]])
    better = np.array([True, False])
    rec = _Records(z, 1e-3, True, 10)
    assert torch.isnan(rec.blend(better, z, best)).any(), "plain lerp overflows here"
    rec.norm_buf.copy_(torch.tensor([[4.3e37, 1.0], [1.0, 1.0]]))  # a norm at finfo.max / 8
    rec.record(0)
    assert rec.large
    assert torch.equal(rec.blend(better, z, best), torch.tensor([[3e38, -3e38], [5.0, 6.0]]))


def test_abs_stop():
    prob = P.affine(D=8, B=3, rho=0.5)
    _, tr = solve(prob.f, prob.z0, solver="picard", tol=1e-9, stop="abs", max_iter=200)
    assert tr.status == "converged" and (tr.best_residual <= 1e-9).all()
    assert torch.equal(tr.residual, tr.abs_residual)


def test_divergence_keeps_best_finite_iterate_and_warns():
    B = 3
    scale = torch.tensor([[0.5], [0.5], [50.0]], dtype=torch.float64)

    def f(z):  # sample 2 explodes: exp of ever larger numbers overflows to inf
        return torch.where(scale > 1, torch.exp(scale * z.abs()) + 1.0, 0.5 * z + 1.0)

    z0 = torch.zeros(B, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="Non-finite"):
        z, tr = solve(f, z0, solver="picard", tol=1e-12, max_iter=100)
    assert tr.status == "diverged"
    assert tr.diverged.tolist() == [False, False, True]
    assert torch.isfinite(z).all()
    # the best finite iterate of the exploding sample is its start (its residual only grows)
    assert tr.best_step[2] == 0
    torch.testing.assert_close(z[2], z0[2])
    assert not torch.isfinite(tr.abs_residual[-1, 2])
    # the well-behaved samples keep their progress
    assert (tr.best_residual[:2] < 1e-3).all()


def test_nan_in_f_does_not_poison_other_samples():
    def f(z):
        out = 0.5 * z + 1.0
        out[1] = out[1] + (float("nan") if bool((z[1] > 1.5).any()) else 0.0)
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z, tr = solve(f, torch.zeros(2, 3, dtype=torch.float64), solver="anderson", tol=1e-10, max_iter=50)
    assert tr.status == "diverged" and tr.diverged.tolist() == [False, True]
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_batch_permutation_permutes_result(name):
    prob = P.tanh_layer(D=16, B=6, dtype=torch.float64, seed=3)
    z, _ = solve(prob.f, prob.z0 + 0.1 * torch.arange(6, dtype=torch.float64)[:, None], solver=name, tol=1e-10, max_iter=100)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    # the map's injection is per sample, so permute it with a permuted map
    g = torch.Generator().manual_seed(3)
    W = P.spectral_rescale(torch.randn(16, 16, generator=g, dtype=torch.float64), 0.9)
    U = torch.randn(16, 16, generator=g, dtype=torch.float64) / 4
    x = torch.randn(6, 16, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(16, generator=g, dtype=torch.float64)

    def f(z, x=x):
        return torch.tanh(z @ W.T + x @ U.T + b)

    z0 = 0.1 * torch.arange(6, dtype=torch.float64)[:, None].expand(6, 16)
    za, _ = solve(f, z0, solver=name, tol=1e-10, max_iter=100)
    zb, _ = solve(lambda z: f(z, x[perm]), z0[perm], solver=name, tol=1e-10, max_iter=100)
    torch.testing.assert_close(zb, za[perm], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(za, z, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("shape", [(4, 10), (3, 2, 5), (2, 3, 4, 4)])
def test_any_trailing_shape(shape):
    A = 0.5
    c = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    z, tr = solve(lambda z: A * torch.tanh(z) + c, torch.zeros(shape), solver="anderson", tol=1e-6)
    assert z.shape == shape and tr.status == "converged"
    assert tr.abs_residual.shape[1] == shape[0]


def test_callback_sees_every_step():
    prob = P.affine(D=4, B=2, rho=0.5)
    seen = []
    _, tr = solve(prob.f, prob.z0, solver="anderson", tol=1e-8, callback=lambda info: seen.append(
        (info.step, info.nfe, info.abs_residual.clone(), info.z.shape)))
    assert [s[0] for s in seen] == list(range(tr.n_steps))
    assert [s[1] for s in seen] == list(range(1, tr.nfe + 1))
    torch.testing.assert_close(torch.stack([s[2] for s in seen]), tr.abs_residual)


def test_newton_counts_jacobians_and_converges_quadratically():
    prob = P.cosine(B=1)
    _, tr = solve(prob.f, prob.z0 + 1.0, solver="newton", tol=1e-14, stop="abs", max_iter=20)
    assert tr.status == "converged" and tr.n_steps <= 6
    assert tr.extra["jacobian_evals"] == tr.n_steps - 1
    r = tr.abs_residual[:, 0]
    # quadratic: the error exponent roughly doubles per step once close
    assert r[-2] < r[-3] ** 1.5


def test_steps_to_and_batch_residual():
    prob = P.affine(D=8, B=3, rho=0.5)
    _, tr = solve(prob.f, prob.z0, solver="picard", tol=1e-8, max_iter=200)
    st_ = tr.steps_to(1e-4)
    for b in range(3):
        k = int(st_[b])
        assert tr.rel_residual[k - 1, b] <= 1e-4 and (k == 1 or tr.rel_residual[k - 2, b] > 1e-4)
    assert (tr.steps_to(1e-30) == -1).all()
    br = tr.batch_residual("abs")
    torch.testing.assert_close(br, tr.abs_residual.pow(2).sum(1).sqrt())


# ------------------------------------------------------------------ errors


def test_unknown_solver_lists_registered():
    with pytest.raises(ValueError, match="unknown solver 'andersen'; registered solvers: ") as err:
        solve(torch.cos, torch.zeros(1, 1), solver="andersen")
    listed = str(err.value).split("registered solvers: ")[1].split(", ")
    assert set(ALL) <= set(listed) and listed == sorted(listed)


def test_unknown_option_names_valid_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['mem'\] for solver 'anderson'; valid options: m, beta, ridge, scale_ridge"):
        solve(torch.cos, torch.zeros(1, 1), solver="anderson", mem=5)
    with pytest.raises(TypeError, match="valid options: beta"):
        solve(torch.cos, torch.zeros(1, 1), solver="km", m=3)
    with pytest.raises(TypeError, match="set them on the object"):
        solve(torch.cos, torch.zeros(1, 1), solver=Anderson(), m=3)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(tol=0), r"tol must be a finite number in \(0.0, inf\)"),
    (dict(tol=-1e-3), r"tol must be a finite number in \(0.0, inf\)"),
    (dict(tol=float("nan")), r"tol must be a finite number in \(0.0, inf\)"),
    (dict(max_iter=0), "max_iter must be an integer >= 1"),
    (dict(max_iter=2.5), "max_iter must be an integer >= 1"),
    (dict(solver="anderson", m=0), r"m must be an integer >= 1"),
    (dict(solver="anderson", beta=1.5), r"beta must be a finite number in \(0.0, 1.0\]"),
    (dict(solver="km", beta=0.0), r"beta must be a finite number in \(0.0, 1.0\]"),
    (dict(solver="anderson", ridge=-1.0), "ridge must be"),
    (dict(stop="relative"), "stop must be one of 'abs', 'rel'; got 'relative'"),
    (dict(on_failure="explode"), "on_failure must be"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        solve(torch.cos, torch.zeros(1, 1), **kwargs)


def test_unbatched_state_suggests_unsqueeze():
    with pytest.raises(ValueError, match=r"shape \(5,\).*z0.unsqueeze\(0\)"):
        solve(torch.cos, torch.zeros(5))


def test_wrong_output_shape_says_both_shapes():
    with pytest.raises(ValueError, match=r"z has shape \(2, 3\), f\(z\) has shape \(2, 4\)"):
        solve(lambda z: torch.zeros(2, 4), torch.zeros(2, 3))


def test_non_tensor_and_integer_state():
    with pytest.raises(TypeError, match="torch.Tensor"):
        solve(torch.cos, [[0.0]])
    with pytest.raises(TypeError, match="floating-point"):
        solve(torch.cos, torch.zeros(1, 1, dtype=torch.long))


def test_newton_refuses_large_states():
    with pytest.raises(ValueError, match="use solver='broyden'|Use solver='broyden'"):
        solve(torch.tanh, torch.zeros(1, 5000), solver="newton")


# ------------------------------------------------------------------ registry


def test_registry_and_custom_solver():
    assert set(ALL) <= set(available_solvers())

    @register_solver("halfstep_test")
    class HalfStep(Solver):
        def step(self, f, z, fz, state):
            return 0.5 * (z + fz), state

    try:
        z, tr = solve(torch.cos, torch.zeros(1, 1, dtype=torch.float64), solver="halfstep_test", tol=1e-10, max_iter=100)
        assert tr.solver == "halfstep_test" and abs(z.item() - 0.7390851332) < 1e-8
        assert isinstance(get_solver("halfstep_test"), HalfStep)
    finally:
        deqlite.solvers.SOLVERS.pop("halfstep_test")
    assert isinstance(get_solver(Picard), Picard)
    assert get_solver("km", beta=0.3) == KrasnoselskiiMann(beta=0.3)


def test_trace_rows_past_the_preallocated_block_are_the_residuals():
    # the loop keeps the trace rows in a host block grown by doubling (64, 128, ...)
    prob = P.affine(D=6, B=3, rho=0.995)
    _, tr = solve(prob.f, prob.z0, solver="picard", tol=1e-30, max_iter=150, return_iterates=True,
                  on_failure="ignore")
    assert tr.n_steps == 150 and tr.abs_residual.shape == (150, 3)
    Z = torch.stack(tr.iterates)
    FZ = torch.stack([prob.f(z) for z in tr.iterates])
    torch.testing.assert_close(tr.abs_residual, (FZ - Z).norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(tr.rel_residual, (FZ - Z).norm(dim=-1) / FZ.norm(dim=-1), rtol=1e-5, atol=0)


# ------------------------------------------------------------------ shared pieces, two code paths


def _run_steps(solver, f, z, n, grad):
    """``n`` steps of ``solver`` by hand (with or without autograd), returning the iterates."""
    out = []
    with torch.set_grad_enabled(grad):
        state = solver.setup(z)
        for _ in range(n):
            fz = f(z)
            z, state = solver.step(f, z, fz, state)
            out.append(z.detach())
    return out


@pytest.mark.parametrize("grad", [False, True], ids=["ring", "autograd"])
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_anderson_history_is_shared_with_the_neural_solver(grad, beta):
    # one history class: a HyperSolver whose mixer is the least-squares choice is Anderson
    from deqlite.hyper import HyperSolver, LeastSquaresMixer
    from deqlite.solvers.anderson import AndersonHistory

    p = P.expansive_tanh(D=24, B=3, averaged=True, dtype=torch.float64)
    a, h = Anderson(m=4, beta=beta), HyperSolver(mixer=LeastSquaresMixer(beta=beta), m=4)  # the same m: 4 iterates each
    assert isinstance(a.setup(p.z0), AndersonHistory) and isinstance(h.setup(p.z0), AndersonHistory)
    za, zh = _run_steps(a, p.f, p.z0, 12, grad), _run_steps(h, p.f, p.z0, 12, grad)  # the ring wraps twice
    for x, y in zip(za, zh):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    # and through the loop: the same evaluation count and iterates (the weights come from two
    # LAPACK calls, numpy's and torch's, so rounding differences grow over 60 steps)
    kw = dict(tol=1e-10, max_iter=60, return_iterates=True, on_failure="ignore")
    _, ta = solve(p.f, p.z0, solver=a, **kw)
    _, th = solve(p.f, p.z0, solver=h, **kw)
    assert ta.nfe == th.nfe
    for x, y in zip(ta.iterates, th.iterates):
        torch.testing.assert_close(y, x, rtol=1e-8, atol=1e-8)


def test_anderson_ring_and_autograd_paths_agree():
    p = P.expansive_tanh(D=16, B=4, averaged=True, dtype=torch.float64)
    for m in (1, 2, 5):
        ring, stacked = (_run_steps(Anderson(m=m), p.f, p.z0, 10, g) for g in (False, True))
        for x, y in zip(ring, stacked):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m", [1, 3, 100])
@pytest.mark.parametrize("step_size", [1.0, 0.7])
def test_broyden_two_applications_equal_three(m, step_size):
    # without autograd Broyden applies its low-rank inverse twice per step (H dg from the last
    # step, the new H g by one rank-one term); with autograd the textbook three times
    p = P.expansive_tanh(D=16, B=4, averaged=False, dtype=torch.float64)
    b = Broyden(m=m, step_size=step_size)
    lean, textbook = (_run_steps(b, p.f, p.z0, 12, g) for g in (False, True))
    for k, (x, y) in enumerate(zip(lean, textbook)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9, msg=f"step {k}")


def test_broyden_old_alpha_is_refused_with_the_new_name():
    with pytest.raises(TypeError, match="step_size"):
        Broyden(alpha=0.5)
    with pytest.raises(TypeError, match=r"use Broyden\(step_size=0.5\)"):
        get_solver("broyden", alpha=0.5)
    assert Broyden(step_size=0.5).step_size == 0.5 and "step_size" in Broyden.options()


# ------------------------------------------------------------------ properties


@settings(max_examples=25, deadline=None)
@given(D=st.integers(2, 12), B=st.integers(1, 4), rho=st.floats(0.05, 0.9), seed=st.integers(0, 10_000),
       name=st.sampled_from(["picard", "anderson", "broyden", "km"]))
def test_random_contractions_converge_to_the_unique_fixed_point(D, B, rho, seed, name):
    g = torch.Generator().manual_seed(seed)
    W = P.spectral_rescale(torch.randn(D, D, generator=g, dtype=torch.float64), rho)
    c = torch.randn(B, D, generator=g, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ W.T + c)

    z, tr = solve(f, torch.zeros(B, D, dtype=torch.float64), solver=name, tol=1e-10, max_iter=400, stop="abs")
    assert tr.status == "converged"
    # uniqueness: Picard from another start lands on the same point (contraction mapping theorem)
    z2, _ = solve(f, torch.randn(B, D, generator=g, dtype=torch.float64), solver="picard", tol=1e-11,
                  max_iter=2000, stop="abs")
    # error bound of a contraction: ||z - z*|| <= ||f(z) - z|| / (1 - rho)
    assert (z - z2).norm(dim=1).max() <= 2e-10 / (1 - rho) + 1e-12
    assert tr.n_steps == tr.abs_residual.shape[0]
