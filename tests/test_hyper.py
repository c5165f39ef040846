"""Tests for deqlite.hyper: the neural equilibrium solver (Bai, Koltun & Kolter 2022)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deqlite import solve
from deqlite.hyper import (ConvInitializer, HyperAndersonNet, HyperSolver, LeastSquaresMixer,
                           MLPInitializer, anderson_weights, budget_curve, fixed_points,
                           hyper_losses, hyper_solve, loss_weights, matched_nfe, normalize_alpha,
                           train_hypersolver, unroll)
from deqlite.problems import conv_groupnorm, tanh_layer
from deqlite.solvers import Anderson, get_solver


def _tanh_map(D: int = 16, seed: int = 0, rho: float = 0.8, dtype=torch.float64):
    """A contractive ``f(z, x) = tanh(W z + U x)`` taking the input explicitly."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=dtype)
    W = W * (rho / torch.linalg.matrix_norm(W, ord=2))
    U = torch.randn(D, D, generator=g, dtype=dtype) / D ** 0.5
    return lambda z, x: torch.tanh(z @ W.T + x @ U.T)


# ---------------------------------------------------------------- Anderson as a special case


@pytest.mark.parametrize("beta", [1.0, 0.7])
@pytest.mark.parametrize("memory", [2, 5])
def test_least_squares_mixer_reproduces_anderson(beta, memory):
    """With the net replaced by least-squares weights, every step equals Anderson's."""
    p = tanh_layer(D=32, B=6, rho=0.95, dtype=torch.float64)
    kw = dict(tol=1e-30, max_iter=12, return_iterates=True, on_failure="ignore")
    _, ta = solve(p.f, p.z0, solver=Anderson(m=memory, beta=beta), **kw)
    hyper = HyperSolver(mixer=LeastSquaresMixer(beta=beta), m=memory)  # the same m: iterates mixed
    _, th = solve(p.f, p.z0, solver=hyper, **kw)
    assert th.solver == "hyper"
    assert len(ta.iterates) == len(th.iterates) == 12
    for za, zh in zip(ta.iterates, th.iterates):
        torch.testing.assert_close(zh, za, rtol=0, atol=1e-12)


def test_one_step_matches_anderson_step_directly():
    g = torch.Generator().manual_seed(1)
    f = lambda z: torch.tanh(0.5 * z + 1.0)  # noqa: E731
    z = torch.randn(3, 8, generator=g, dtype=torch.float64)
    a, h = Anderson(m=4), HyperSolver(m=4)  # the same m: iterates mixed
    sa, sh = a.setup(z), h.setup(z)
    for _ in range(6):
        fz = f(z)
        za, sa = a.step(f, z, fz, sa)
        zh, sh = h.step(f, z, fz, sh)
        torch.testing.assert_close(zh, za, rtol=0, atol=1e-12)
        z = za


def test_solver_by_name_is_anderson_and_takes_options():
    assert isinstance(get_solver("hyper", m=3), HyperSolver)
    assert get_solver("hyper", m=3).m == 3
    z, tr = solve(torch.cos, torch.zeros(2, 1, dtype=torch.float64), solver="hyper", tol=1e-10)
    assert tr.status == "converged"
    assert abs(z[0, 0].item() - 0.7390851332151607) < 1e-9


# ---------------------------------------------------------------- normalisation


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=7))
def test_shift_normalisation_sums_to_one_and_keeps_differences(values):
    a = torch.tensor([values], dtype=torch.float64)
    alpha = normalize_alpha(a, "shift")
    assert abs(alpha.sum().item() - 1.0) < 1e-12
    diff = alpha - a  # the same shift for every entry
    assert torch.allclose(diff, diff[:, :1].expand_as(diff))


def test_other_normalisations():
    a = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    sm = normalize_alpha(a, "softmax")
    assert (sm > 0).all() and abs(sm.sum().item() - 1) < 1e-12
    assert torch.equal(normalize_alpha(a, "none"), a)
    with pytest.raises(ValueError, match="alpha_mode must be one of"):
        normalize_alpha(a, "l1")


@pytest.mark.parametrize("mode", ["shift", "softmax"])
def test_learned_weights_sum_to_one_during_a_solve(mode):
    hyper = HyperSolver.build(state_dim=16, input_dim=16, m=3, alpha_mode=mode).eval()
    f = _tanh_map(16, dtype=torch.float32)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        run = unroll(hyper, lambda z: f(z, x), hyper.initial_state(x), K=7)
    lengths = [a.shape[1] for a in run["alpha"]]
    assert lengths == [1, 2, 3, 3, 3, 3, 3]  # min(m, k + 1) iterates at step k, m = 3
    for alpha in run["alpha"]:
        torch.testing.assert_close(alpha.sum(-1), torch.ones(5), rtol=0, atol=1e-5)
    for beta in run["beta"]:
        assert ((beta > 0) & (beta < 1)).all()


@pytest.mark.parametrize("channels", [None, 4])
def test_ring_buffer_and_autograd_paths_agree(channels):
    """Inside solve() the history is a ring buffer; under autograd a list: same iterates."""
    torch.manual_seed(0)
    if channels is None:
        net = HyperAndersonNet(3, state_dim=12, compress_dim=3, hidden=8)
        shape = (3, 12)
    else:
        net = HyperAndersonNet(3, channels=channels, hidden=8)
        shape = (3, channels, 3, 1)
    with torch.no_grad():  # make every feature matter
        net.conv2.weight.normal_()
    hyper = HyperSolver(mixer=net, m=3)
    A = 0.3 * torch.randn(12, 12)
    f = lambda z: torch.tanh(z.reshape(3, 12) @ A.T + 1.0).reshape(shape)  # noqa: E731
    z0 = torch.randn(shape)
    _, tr = solve(f, z0, solver=hyper, tol=1e-30, max_iter=9, return_iterates=True, on_failure="ignore")
    with torch.enable_grad():
        run = unroll(hyper, f, z0, K=8)
    for z_ring, z_list in zip(tr.iterates[1:], run["z"]):
        torch.testing.assert_close(z_ring.reshape(3, -1), z_list.detach(), rtol=1e-5, atol=1e-6)


def test_anderson_weights_minimise_the_mixed_residual():
    G = torch.randn(4, 3, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = anderson_weights(G, ridge=0.0)
    torch.testing.assert_close(a.sum(-1), torch.ones(4, dtype=torch.float64))
    best = torch.bmm(a.unsqueeze(1), G).norm(dim=-1).squeeze(1)
    for _ in range(20):  # no other weights summing to one do better
        b = normalize_alpha(torch.randn(4, 3, dtype=torch.float64))
        other = torch.bmm(b.unsqueeze(1), G).norm(dim=-1).squeeze(1)
        assert (best <= other + 1e-12).all()


# ---------------------------------------------------------------- losses and training


def test_loss_weights():
    w = loss_weights(4, "increasing")
    torch.testing.assert_close(w, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    assert torch.allclose(loss_weights(5, "uniform"), torch.full((5,), 0.2, dtype=torch.float64))
    assert loss_weights(3, "last").tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="weights must be one of"):
        loss_weights(3, "decreasing")


def test_training_reduces_the_convergence_loss():
    torch.manual_seed(0)
    D, N = 16, 96
    lin = torch.nn.Linear(D, D)  # a frozen DEQ map whose parameters still require grad
    with torch.no_grad():
        lin.weight.mul_(0.9 / torch.linalg.matrix_norm(lin.weight, ord=2))
    f = lambda z, x: torch.tanh(lin(z) + x)  # noqa: E731
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(3))
    z_star, worst = fixed_points(f, x, state_shape=(D,))
    assert worst < 1e-5
    hyper = HyperSolver.build(state_dim=D, input_dim=D, m=3, hidden=8, seed=0)
    xb, zb = x[:48], z_star[:48]

    def losses():
        with torch.no_grad():
            return hyper_losses(hyper, lambda z: f(z, xb), xb, zb, K=4)

    before = losses()
    log = train_hypersolver(hyper, f, x, z_star, K=4, steps=80, batch_size=16, lr=1e-2, seed=0)
    after = losses()
    assert log.steps == 80 and len(log.conv) >= 2
    assert after["conv"] < 0.7 * before["conv"], (before["conv"], after["conv"])
    assert after["init"] < 0.8 * before["init"], (before["init"], after["init"])
    assert lin.weight.grad is None, "training the solver must not touch the DEQ's gradients"
    assert all(p.grad is None for p in hyper.parameters())


def test_initializer_gets_gradient_only_from_its_own_loss():
    D = 8
    f = _tanh_map(D, dtype=torch.float32)
    x = torch.randn(4, D)
    hyper = HyperSolver.build(state_dim=D, input_dim=D, m=2)
    zs, _ = fixed_points(f, x, state_shape=(D,))
    L = hyper_losses(hyper, lambda z: f(z, x), x, zs, K=3)
    grads = torch.autograd.grad(L["conv"], list(hyper.initializer.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
    grads = torch.autograd.grad(L["conv"], list(hyper.mixer.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- shapes and integration


def test_flat_states_and_the_deq_layer():
    from deqlite.deq import DEQ

    D = 16
    f = _tanh_map(D, dtype=torch.float32)
    hyper = HyperSolver.build(state_dim=D, input_dim=D, m=3).eval()
    x = torch.randn(5, D)
    z, tr = hyper_solve(hyper, f, x, tol=1e-5, max_iter=60)
    assert z.shape == (5, D) and tr.solver == "hyper" and tr.abs_residual.shape[1] == 5
    assert "init_time" in tr.extra
    deq = DEQ(f, solver=hyper, tol=1e-5, max_iter=60).eval()
    with torch.no_grad():
        z2, tr2 = deq(x, z0=hyper.initial_state(x))
    assert tr2.solver == "hyper" and tr2.status == tr.status
    torch.testing.assert_close(z2, z)


def test_image_states_pool_over_space_and_any_size_works():
    p = conv_groupnorm(B=4, C=8, H=6)
    net = HyperAndersonNet(m=3, channels=8, hidden=8)
    hyper = HyperSolver(mixer=net, m=3, initializer=ConvInitializer(8, 8, hidden=4))
    x = torch.randn(4, 8, 6, 6)
    z0 = hyper.initial_state(x)
    assert z0.shape == (4, 8, 6, 6)
    z, tr = solve(p.f, z0.detach(), solver=hyper, max_iter=5, on_failure="ignore")
    assert z.shape == (4, 8, 6, 6) and tr.n_steps == 5
    # the same net runs on a larger image: pooling makes it size-independent
    G = torch.randn(2, 3, 8 * 10 * 10)
    alpha_hat, beta = net(G)
    assert alpha_hat.shape == (2, 3) and beta.shape == (2,)
    # and training runs through (B, C, H, W) states
    f = lambda z, xx: p.f(z)  # noqa: E731
    zs, _ = fixed_points(f, x, state_shape=(8, 6, 6))
    log = train_hypersolver(hyper, f, x, zs, K=3, steps=3, batch_size=4)
    assert log.steps == 3


def test_budget_curve_matches_separate_solves():
    p = tanh_layer(D=24, B=5, rho=0.9, dtype=torch.float64)
    z_star, _ = solve(p.f, p.z0, tol=1e-12, max_iter=200)
    curve = budget_curve(p.f, p.z0, "anderson", 8, z_star=z_star)
    for K in (1, 3, 8):
        z, _ = solve(p.f, p.z0, solver="anderson", tol=1e-30, max_iter=K, on_failure="ignore")
        err = ((z - z_star).norm(dim=1) / z_star.norm(dim=1)).median().item()
        assert curve["error"][K - 1] == pytest.approx(err, rel=1e-9, abs=1e-15)


def test_matched_nfe_requires_staying_within_tolerance():
    assert matched_nfe([10, 95, 96, 95, 96, 96], 96.0, 0.1) == 4 + 1
    assert matched_nfe([10, 96, 96], 96.0, 0.1) == 2
    assert matched_nfe([10, 96, 90], 96.0, 0.1) is None
    assert matched_nfe([1.0, 1e-3, 1e-5], 1e-4, 0.0, higher_is_better=False) == 3


# ---------------------------------------------------------------- errors


def test_errors_are_clear():
    with pytest.raises(ValueError, match="exactly one of state_dim"):
        HyperAndersonNet(3)
    with pytest.raises(ValueError, match="exactly one of state_dim"):
        HyperAndersonNet(3, state_dim=4, channels=2)
    with pytest.raises(ValueError, match="m must be an integer"):
        HyperSolver(m=0)
    with pytest.raises(ValueError, match="alpha_mode must be one of"):
        HyperSolver(alpha_mode="sparsemax")
    with pytest.raises(ValueError, match="pass m=3"):
        HyperSolver(mixer=HyperAndersonNet(3, state_dim=4), m=5)
    with pytest.raises(TypeError, match="mixer must be"):
        HyperSolver(mixer="anderson")
    with pytest.raises(ValueError, match="compress_dim=0 with gram=False"):
        HyperAndersonNet(3, state_dim=4, compress_dim=0, gram=False)
    net = HyperAndersonNet(3, state_dim=10)
    with pytest.raises(ValueError, match="rebuild it with state_dim=12"):
        solve(lambda z: 0.5 * z, torch.ones(2, 12), solver=HyperSolver(mixer=net, m=3), max_iter=3)
    with pytest.raises(ValueError, match="not a multiple of channels=5"):
        HyperAndersonNet(3, channels=5)(torch.randn(2, 2, 12))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8\)"):
        MLPInitializer(8, 4)(torch.randn(3, 9))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        HyperSolver.build(state_dim=4, input_dim=8).initial_state([1.0, 2.0])
    with pytest.raises(ValueError, match="no initializer and no state_shape"):
        HyperSolver().initial_state(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="needs input_dim="):
        HyperSolver.build(state_dim=4)
    with pytest.raises(ValueError, match="nothing to train"):
        train_hypersolver(HyperSolver(), lambda z, x: z, torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="weights must be one of"):
        train_hypersolver(HyperSolver.build(state_dim=2, input_dim=2), lambda z, x: z,
                          torch.zeros(4, 2), torch.zeros(4, 2), weights="exp")
    with pytest.raises(ValueError, match="z_star has 3 samples but x has 4"):
        train_hypersolver(HyperSolver.build(state_dim=2, input_dim=2), lambda z, x: z,
                          torch.zeros(4, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="beta must be a finite number in"):
        LeastSquaresMixer(beta=1.5)


def test_docstring_examples_run():
    import doctest

    import deqlite.hyper
    import deqlite.hyper.nets
    import deqlite.hyper.solver
    import deqlite.hyper.train

    attempted = 0
    for mod in (deqlite.hyper, deqlite.hyper.nets, deqlite.hyper.solver, deqlite.hyper.train):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                              extraglobs={"torch": torch})
        assert res.failed == 0, mod.__name__
        attempted += res.attempted
    assert attempted >= 5


# ---------------------------------------------------------------- issue 11 additions


def test_paper_loss_weights_are_the_defaults():
    import inspect

    sig = inspect.signature(train_hypersolver).parameters
    assert (sig["lambda_conv"].default, sig["lambda_init"].default, sig["lambda_alpha"].default) == (0.1, 0.05, 1e-4)
    assert sig["alpha_floor"].default == 5e-8


def test_race_snapshot_gives_each_solver_its_own_budget():
    from deqlite.hyper import budget_snapshot, race_snapshot

    f = lambda z: torch.tanh(0.9 * z + 0.5)  # noqa: E731
    z0 = torch.zeros(6, 3)
    labels = torch.zeros(6, dtype=torch.long)
    readout = lambda z: torch.cat([z, -z], -1)  # noqa: E731
    snap = race_snapshot(f, {"picard": ("picard", z0), "anderson": ("anderson", z0)},
                         {"picard": 3, "anderson": 7}, readout=readout, labels=labels)
    assert set(snap) == {"picard (3)", "anderson (7)"}
    ref = budget_snapshot(f, {"picard": ("picard", z0)}, 3, readout=readout, labels=labels)["picard"]
    assert (snap["picard (3)"]["rel_residual"] == ref["rel_residual"]).all()
    assert snap["anderson (7)"]["rel_residual"].max() < snap["picard (3)"]["rel_residual"].min()
    with pytest.raises(ValueError, match="no budget"):
        race_snapshot(f, {"picard": ("picard", z0)}, {}, readout=readout, labels=labels)


def test_slow_digits_deq_is_slow_and_frozen_map_matches_the_model():
    from deqlite.hyper import frozen_map, slow_digits_deq

    model = slow_digits_deq(32, 1.1, seed=0)
    W = model.cell.W.weight.detach()
    sv = torch.linalg.svdvals(W)
    assert torch.allclose(sv, torch.full_like(sv, 1.1), atol=1e-4)  # gain x orthogonal
    f = frozen_map(model)
    x, z = torch.randn(4, 64), torch.randn(4, 32)
    assert torch.allclose(f(z, x), model.cell(z, model.inject(x)), atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="gain"):
        slow_digits_deq(8, -1.0)


def test_median_times_reports_wall_and_cpu():
    from deqlite.hyper import median_times

    out = median_times({"a": lambda: sum(range(1000)), "b": lambda: None}, repeats=3)
    assert set(out) == {"a", "b"} and set(out["a"]) == {"wall", "cpu"}
    assert out["a"]["wall"] >= 0 and out["a"]["cpu"] >= 0
    with pytest.raises(ValueError, match="repeats"):
        median_times({"a": lambda: None}, repeats=0)


def test_figures_use_the_book_theme():
    from deqlite.hyper import pareto_figure, steps_figure

    snap = {"a": {"rel_residual": [1e-3, 1e-2], "accuracy": 96.0}}
    fig = steps_figure(snap)
    assert fig.layout.template.layout.paper_bgcolor == "rgba(0,0,0,0)"
    assert fig.data[1].textposition == "inside"  # the bar labels stay clear of the panel title
    curve = {"nfe": [1, 2], "rel_residual": [1e-1, 1e-2], "accuracy": [90.0, 95.0]}
    assert pareto_figure({"a": curve}).layout.template.layout.paper_bgcolor == "rgba(0,0,0,0)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_budget_curve_and_training_on_the_gpu():
    dev = torch.device("cuda")
    f = _tanh_map(D=8, dtype=torch.float32)
    x = torch.randn(16, 8)
    zs, _ = fixed_points(f, x, state_shape=(8,))
    hyper = HyperSolver.build(state_dim=8, input_dim=8, m=2, compress_dim=0)
    for mod in (hyper.mixer, hyper.initializer):
        mod.to(dev)
    W_dev = lambda z, xx: f(z.cpu(), xx.cpu()).to(dev)  # noqa: E731  the map stays on the CPU
    train_hypersolver(hyper, W_dev, x.to(dev), zs.to(dev), K=2, steps=2, batch_size=4)
    c = budget_curve(lambda z: W_dev(z, x), hyper.initial_state(x.to(dev)).detach(), hyper, 3,
                     z_star=zs.to(dev), readout=lambda z: z, labels=torch.zeros(16, dtype=torch.long, device=dev))
    assert len(c["rel_residual"]) == 3


# ---------------------------------------------------------------- issue 13: modules by concern


def test_split_modules_keep_the_public_names():
    import deqlite.hyper as hy
    from deqlite import models, race
    from deqlite.viz import hyper_figures

    assert hy.budget_curve is race.budget_curve and hy.median_times is race.median_times
    assert hy.slow_digits_deq is models.slow_digits_deq and hy.frozen_map is models.frozen_map
    assert hy.steps_figure is hyper_figures.steps_figure and hy.ablation_figure is hyper_figures.ablation_figure
    assert set(hy.__all__) <= set(dir(hy)) | {"steps_figure", "pareto_figure", "ablation_figure"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hy.nope  # noqa: B018


def test_frozen_map_bound_to_inputs_and_counting_frozen_parameters():
    from deqlite.hyper import count_parameters, frozen_map, slow_digits_deq
    from deqlite.training import count_params

    model = slow_digits_deq(16, 1.1, seed=0)
    x, z = torch.randn(5, 64), torch.randn(5, 16)
    f_x = frozen_map(model, x)
    assert torch.allclose(f_x(z), model.cell(z, model.inject(x)), atol=1e-6)
    total = sum(p.numel() for p in model.parameters())
    assert count_params(model) == 0 and count_parameters(model) == total  # frozen: none trainable
    assert count_params(model, None, trainable_only=False) == total
    with pytest.raises(ValueError, match="x must be a batch"):
        frozen_map(model, torch.zeros(64))


def test_ablation_figure_is_relative_to_the_reference():
    from deqlite.hyper import ablation_figure

    fig = ablation_figure({"ours": 1e-3, "no L_init": 4e-3}, "ours")
    assert list(fig.data[0].y) == [1.0, 4.0]
    assert fig.layout.template.layout.paper_bgcolor == "rgba(0,0,0,0)"
    with pytest.raises(ValueError, match="reference 'x' is not one of"):
        ablation_figure({"ours": 1.0}, "x")
