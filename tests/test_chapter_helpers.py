"""Tests for the helpers chapters 1-3 use: deqlite.models.weight_tied, deqlite.training,
deqlite.race."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deqlite
from deqlite import race as R
from deqlite.models.weight_tied import (BlockActivation, ExplicitMLP, WeightTiedNet, last_block,
                                        universal_weight_tied)
from deqlite.training import (accuracy, count_params, peak_memory, train_classifier,
                              training_step_memory)


# ---- weight-tied networks ------------------------------------------------------------


@pytest.mark.parametrize("dims", [[3, 5, 2], [8, 16, 12, 10, 4], [4, 4, 4, 4, 4, 4]])
def test_universality_reproduces_mlp(dims):
    torch.manual_seed(0)
    acts = [torch.tanh, torch.relu, torch.sigmoid, nn.Identity(), torch.sin][: len(dims) - 1]
    acts = acts + [torch.tanh] * (len(dims) - 1 - len(acts))
    mlp = ExplicitMLP(dims, acts).double()
    tied = universal_weight_tied(mlp)
    x = torch.randn(17, dims[0], dtype=torch.float64)
    assert tied.width == sum(dims[1:])
    out = last_block(tied(x, depth=mlp.depth), mlp)
    assert torch.allclose(out, mlp(x), atol=1e-12, rtol=0)
    # W_z is nilpotent: more steps change nothing, and the state is a fixed point
    z_L = tied(x, depth=mlp.depth)
    assert torch.allclose(tied.layer(z_L, x), z_L, atol=1e-12, rtol=0)
    assert torch.allclose(tied(x, depth=mlp.depth + 3), z_L, atol=1e-12, rtol=0)


def test_universality_block_structure():
    mlp = ExplicitMLP([3, 5, 4, 2])
    tied = universal_weight_tied(mlp)
    W_z, W_x = tied.W_z.detach(), tied.W_x.detach()
    assert torch.equal(W_x[:5], mlp.layers[0].weight.detach()) and not W_x[5:].any()
    assert torch.equal(W_z[5:9, 0:5], mlp.layers[1].weight.detach())
    assert torch.equal(W_z[9:11, 5:9], mlp.layers[2].weight.detach())
    mask = torch.ones_like(W_z, dtype=torch.bool)
    mask[5:9, 0:5] = False
    mask[9:11, 5:9] = False
    assert not W_z[mask].any(), "zero outside the sub-diagonal blocks"
    assert torch.equal(tied.b.detach(), torch.cat([l.bias.detach() for l in mlp.layers]))


def test_universality_gradients_match():
    torch.manual_seed(1)
    mlp = ExplicitMLP([4, 6, 3]).double()
    tied = universal_weight_tied(mlp)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    (gx_mlp,) = torch.autograd.grad(mlp(x).sum(), x)
    (gx_tied,) = torch.autograd.grad(last_block(tied(x, depth=2), mlp).sum(), x)
    assert torch.allclose(gx_mlp, gx_tied, atol=1e-12)


def test_weight_tied_errors():
    with pytest.raises(ValueError, match="at least two"):
        ExplicitMLP([3])
    with pytest.raises(ValueError, match="activations"):
        ExplicitMLP([3, 4, 5], [torch.tanh])
    with pytest.raises(ValueError, match="square"):
        WeightTiedNet(torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="W_x"):
        WeightTiedNet(torch.zeros(3, 3), torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="b must"):
        WeightTiedNet(torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(4))
    net = WeightTiedNet(torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="depth"):
        net(torch.zeros(1, 2), depth=-1)
    with pytest.raises(TypeError, match="ExplicitMLP"):
        universal_weight_tied(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="block sizes"):
        BlockActivation([2, 3], [torch.tanh])


# ---- training helpers ----------------------------------------------------------------


def test_count_params_and_accuracy():
    model = nn.Linear(3, 2)
    assert count_params(model) == 8
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
        model.bias.zero_()
    X = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [2.0, 0, 0], [-3.0, 0, 0]])
    y = torch.tensor([0, 1, 0, 0])
    assert accuracy(model, X, y, batch_size=3) == 0.75
    model.train()
    accuracy(model, X, y)
    assert model.training, "accuracy restores the training mode"
    with pytest.raises(ValueError, match="rows"):
        accuracy(model, X, y[:2])


def test_train_classifier_is_seeded_and_learns():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 4, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long()

    def run():
        torch.manual_seed(0)
        return train_classifier(nn.Linear(4, 2), X, y, epochs=15, lr=0.05, batch_size=32, seed=3,
                                X_test=X, y_test=y)

    a, b = run(), run()
    assert a.losses == b.losses, "same seed, same run"
    assert a.train_accuracy > 0.9 and a.test_accuracy == a.train_accuracy
    assert a.steps == 15 * 4 and len(a.history) == 15 and a.losses[-1] < a.losses[0]
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(nn.Linear(4, 2), X, y, epochs=0)


def test_train_classifier_trains_a_deq_layer_weight():
    from deqlite.models.mlp import DEQClassifier

    torch.manual_seed(0)
    X = torch.randn(64, 8)
    y = (X[:, 0] > 0).long()
    model = DEQClassifier(8, 8, 2)
    before = model.cell.W.weight.detach().clone()
    train_classifier(model, X, y, epochs=2, lr=1e-2)
    assert not torch.allclose(model.cell.W.weight.detach(), before), "the equilibrium layer is trained"


def test_peak_memory_counts_tensors():
    n = 100_000
    peak = peak_memory(lambda: torch.ones(n, dtype=torch.float64).sum())
    assert 8 * n <= peak <= 8 * n + 4096
    keep = []
    peak2 = peak_memory(lambda: keep.extend([torch.ones(n), torch.ones(n)]))
    assert peak2 >= 8 * n


def test_training_step_memory_grows_only_when_unrolled():
    from deqlite.models.mlp import DEQClassifier

    X, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    def mem(backward: str, n: int) -> int:
        torch.manual_seed(0)
        model = DEQClassifier(8, 64, 3, backward=backward, solver="picard", tol=1e-30, max_iter=n,
                              on_failure="ignore")
        return training_step_memory(model, X, y)

    assert mem("unrolled", 40) > 2 * mem("unrolled", 5)
    assert mem("implicit", 40) <= 1.5 * mem("implicit", 5)


# ---- solver races --------------------------------------------------------------------


def test_slow_tanh_is_a_contraction_with_the_given_factor():
    p = R.slow_tanh(0.9, D=16, B=3, seed=2)
    z = torch.randn(3, 16, dtype=torch.float64)
    w = torch.randn(3, 16, dtype=torch.float64)
    ratio = (p.f(z) - p.f(w)).norm(dim=1) / (z - w).norm(dim=1)
    assert bool((ratio <= 0.9 + 1e-12).all())
    z_star, tr = deqlite.solve(p.f, p.z0, solver="newton", tol=1e-12, max_iter=30)
    rho = deqlite.spectral_radius(p.f, z_star)
    assert tr.ok and bool((rho < 0.9).all()) and bool((rho > 0.5).all())
    with pytest.raises(ValueError, match="contraction"):
        R.slow_tanh(0.0)


def test_race_acceleration_on_the_slow_map():
    p = R.slow_tanh(0.95, D=32, B=4)
    traces = R.race(p.f, p.z0, tol=1e-6, max_iter=400)
    assert set(traces) == set(R.DEFAULT_RACE)
    evals = {k: R.evals_to(t, 1e-6) for k, t in traces.items()}
    assert all(v > 0 for v in evals.values())
    assert evals["anderson (m=5)"] < evals["picard"] and evals["broyden"] < evals["picard"]
    rows = R.race_table(traces, 1e-6)
    assert [r["solver"] for r in rows] == list(traces)
    newton = next(r for r in rows if r["solver"] == "newton")
    assert newton["jacobians"] >= 1
    fixed = R.race(p.f, p.z0, {"fixed": {"solver": "anderson", "scale_ridge": False},
                               "scaled": {"solver": "anderson"}}, tol=1e-6, max_iter=400)
    nf, ns = R.evals_to(fixed["fixed"], 1e-6), R.evals_to(fixed["scaled"], 1e-6)
    assert ns > 0 and (nf < 0 or nf > ns)


def test_race_errors_and_repeats():
    p = R.spiral_2d()
    with pytest.raises(ValueError, match="solver"):
        R.race(p.f, p.z0, {"x": {"m": 3}})
    with pytest.raises(ValueError, match="repeats"):
        R.race(p.f, p.z0, repeats=0)
    t = R.race(p.f, p.z0, {"p": {"solver": "picard"}}, tol=1e-8, max_iter=200, repeats=2)
    assert t["p"].ok and R.evals_to(t["p"], 1e-8) == t["p"].n_steps
    assert R.evals_to(t["p"], 1e-300) == -1


def test_anderson_conditioning_records_one_value_per_step():
    p = R.slow_tanh(0.95, D=16, B=2)
    out = R.anderson_conditioning(p.f, p.z0, m=4, max_iter=30, tol=1e-10)
    assert len(out["cond"]) == out["trace"].n_steps
    assert math.isnan(out["cond"][0]) and all(c >= 1 for c in out["cond"][1:])


def test_race_figures():
    pytest.importorskip("plotly")
    p = R.spiral_2d()
    traces = R.race(p.f, p.z0, tol=1e-8, max_iter=100, return_iterates=True)
    fig = R.race_figure(traces, tol=1e-8)
    assert len(fig.data) == len(traces)
    anim = R.race_animation(traces, z_star=traces["newton"].iterates[-1])
    n = max(t.n_steps for t in traces.values())
    assert len(anim.frames) == n and len(anim.data) == len(traces) + 1
    assert len(anim.layout.sliders[0].steps) == n
    with pytest.raises(ValueError, match="iterates"):
        R.race_animation(R.race(p.f, p.z0, {"p": {"solver": "picard"}}))


def test_stacked_deq_layer_fixed_point_is_the_stack():
    import deqlite
    from deqlite.models.weight_tied import stacked_deq_layer

    torch.manual_seed(0)
    A1 = 0.5 * torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    A2 = 0.5 * torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    B2 = torch.randn(3, 4, dtype=torch.float64)
    f1 = lambda z, x: torch.tanh(z @ A1.T + x)  # noqa: E731
    f2 = lambda z, y: torch.tanh(z @ A2.T + y @ B2.T)  # noqa: E731
    x = torch.randn(5, 4, dtype=torch.float64)
    z1, _ = deqlite.solve(lambda z: f1(z, x), torch.zeros(5, 4, dtype=torch.float64), tol=1e-13, max_iter=300)
    z2, _ = deqlite.solve(lambda z: f2(z, z1), torch.zeros(5, 3, dtype=torch.float64), tol=1e-13, max_iter=300)
    F = stacked_deq_layer(f1, f2, 4)
    joint = torch.cat([z1, z2], 1)
    assert torch.allclose(F(joint, x), joint, atol=1e-11), "the stack's fixed point is fixed by the joint layer"
    with pytest.raises(ValueError, match="d1"):
        stacked_deq_layer(f1, f2, 0)
    with pytest.raises(TypeError, match="callables"):
        stacked_deq_layer(f1, None, 4)
    with pytest.raises(ValueError, match=r"\(B, d1 \+ d2\)"):
        F(torch.zeros(5, 4, dtype=torch.float64), x)


def test_budget_times_are_increasing_and_time_the_start():
    from deqlite import race as R

    p = R.slow_tanh()
    calls = []

    def start():
        calls.append(1)
        return p.z0.clone()

    t = R.budget_times(p.f, p.z0, "anderson", 6, repeats=2, start=start)
    assert len(t) == 6 and all(b >= a > 0 for a, b in zip(t, t[1:]))
    assert len(calls) == 3  # a warm-up and two timed runs, each from start()


def test_load_record_finds_the_repository_file_from_below_and_none_outside(tmp_path):
    from deqlite.viz import load_record

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"a": 1}')
    deep = tmp_path / "book" / "sub"
    deep.mkdir(parents=True)
    assert load_record("benchmarks/results/r.json", start=deep) == {"a": 1}
    assert load_record("benchmarks/results/r.json", start=tmp_path.parent / "elsewhere") is None
