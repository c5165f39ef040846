"""The bad-input suite, part two: delta layers, models, analysis, hyper, data, training and
the figure builders (viz, race). Same contract as tests/test_bad_input.py."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

import deqlite
from deqlite import analysis, delta, hyper, models
from deqlite.delta import DeltaConv2d, DeltaLinear
from test_bad_input import Err, Ok, run_case

CASES: list = []


def add(name, fn, expected):
    CASES.append((name, fn, expected))


def inr():
    return models.DEQFourier(width=8, resolution=8)


P2 = lambda n=4: torch.zeros(n, 2)  # noqa: E731
PX = lambda n=4: torch.zeros(n, 1)  # noqa: E731

# ------------------------------------------------------------------ delta layers
add("delta/threshold<0", lambda: DeltaLinear(3, 3, threshold=-1), Err(ValueError, "threshold must be a finite number >= 0"))
add("delta/threshold-nan", lambda: DeltaLinear(3, 3, threshold=float("nan")), Err(ValueError, "threshold must be a finite number >= 0"))
add("delta/threshold-str", lambda: DeltaLinear(3, 3, threshold="0.1"), Err(ValueError, "threshold must be a finite number >= 0"))
add("delta/train_threshold<0", lambda: DeltaLinear(3, 3, train_threshold=-0.1), Err(ValueError, "train_threshold must be"))
add("delta/memory-typo", lambda: DeltaLinear(3, 3, memory="keep"), Err(ValueError, "memory must be one of 'reset', 'accumulate'"))
add("delta/in_features=0", lambda: DeltaLinear(0, 3), Err(ValueError, "in_features must be an integer >= 1"))
add("delta/out_features=2.0", lambda: DeltaLinear(3, 2.0), Err(ValueError, "out_features must be an integer >= 1"))
add("delta/input-width", lambda: DeltaLinear(3, 3)(torch.zeros(2, 4)), Err(ValueError, "a.reshape(-1, 3)"))
add("delta/conv-kernel0", lambda: DeltaConv2d(1, 1, 0), Err(ValueError, "kernel_size must be a positive int"))
add("delta/conv-padding-mode", lambda: DeltaConv2d(1, 1, 3, padding_mode="reflect"), Err(ValueError, "F.pad"))
add("delta/conv-sparse-groups", lambda: DeltaConv2d(2, 2, 3, groups=2, sparse=True), Err(ValueError, "use sparse=False"))
add("delta/threshold0-equals-dense", lambda: _delta_equals_dense(), Ok(lambda e: e < 1e-6))
add("delta/mode-no-layers", lambda: delta.delta_mode(nn.Linear(2, 2), 0.1).__enter__(), Err(ValueError, "to_delta(model)"))
add("delta/mode-threshold<0", lambda: delta.delta_mode(inr(), -1.0).__enter__(), Err(ValueError, "threshold must be"))
add("delta/mode-memory-typo", lambda: delta.delta_mode(inr(), 0.1, memory="x").__enter__(), Err(ValueError, "memory must be one of"))
add("delta/mac-summary-no-layers", lambda: delta.mac_summary(nn.Linear(2, 2)), Err(ValueError, "to_delta(model)"))
add("delta/to_delta-str", lambda: delta.to_delta("model"), Err(TypeError, "to_delta expects an nn.Module"))
add("delta/to_delta-linear", lambda: type(delta.to_delta(nn.Linear(2, 2))).__name__, Ok(lambda n: n == "DeltaLinear"))
add("delta/to_delta-parametrized", lambda: delta.to_delta(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2))), Err(ValueError, "parametrized"))
add("delta/configure-threshold-str", lambda: delta.configure(inr(), threshold="a"), Err(ValueError, "threshold must be"))
add("delta/configure-ok", lambda: delta.configure(inr(), threshold=0.2), Ok(lambda old: old["threshold"] == 0.0 and old["enabled"] is False))
add("delta/config-threshold<0", lambda: delta.DeltaConfig(threshold=-1), Err(ValueError, "threshold must be a finite number >= 0"))
add("delta/config-unknown-field", lambda: delta.DeltaConfig().replace(treshold=0.1), Err(TypeError, "DeltaConfig has no field(s) ['treshold']"))
add("delta/mode-sparse-groups", lambda: delta.delta_mode(DeltaConv2d(2, 2, 3, groups=2), 0.1, sparse=True).__enter__(), Err(ValueError, "use sparse=False"))


def _delta_equals_dense():
    torch.manual_seed(0)
    dense = nn.Linear(5, 4)
    d = DeltaLinear.from_dense(dense, threshold=0.0)
    a = torch.randn(3, 5)
    d(a)  # first call: dense, caches
    b = a + 0.1 * torch.randn(3, 5)
    return float((d(b) - dense(b)).abs().max())


# ------------------------------------------------------------------ INR models
add("inr/width=0", lambda: models.DEQFourier(width=0), Err(ValueError, "width must be an integer >= 1, got 0"))
add("inr/kind-typo", lambda: models.DEQINR(kind="fourrier"), Err(ValueError, "kind must be one of 'fourier', 'siren'; got 'fourrier'"))
add("inr/resolution=-1", lambda: models.DEQSiren(resolution=-1), Err(ValueError, "resolution must be an integer >= 1, got -1"))
add("inr/x-shape", lambda: inr()(torch.zeros(3, 3)), Err(ValueError, "x must have shape (B, 2)"))
add("inr/z0-shape", lambda: inr()(P2(3), z0=torch.zeros(3, 5)), Err(ValueError, "z0 must have shape (3, 8)"))
add("inr/forward-shapes", lambda: tuple(inr()(P2(5))[0].shape), Ok(lambda s: s == (5, 1)))
add("inr/W-gets-grad", lambda: _inr_w_grad(), Ok(lambda g: g is not None and float(g.abs().sum()) > 0))
add("inr/psnr-shape", lambda: models.psnr(torch.zeros(3), torch.zeros(4)), Err(ValueError, "same shape"))
add("inr/psnr-identical", lambda: models.psnr(torch.zeros(3), torch.zeros(3)), Ok(lambda v: v == float("inf")))
add("inr/fit-steps=0", lambda: models.fit_inr(inr(), P2(), PX(), steps=0), Err(ValueError, "steps must be an integer >= 1, got 0"))
add("inr/fit-rows", lambda: models.fit_inr(inr(), P2(4), PX(5), steps=1), Err(ValueError, "same number of rows"))
add("inr/evaluate-threshold<0", lambda: models.evaluate_delta(inr(), P2(), PX(), -1.0), Err(ValueError, "threshold must be"))
add("inr/sine-rnn-hidden=0", lambda: models.SineRNN(hidden=0), Err(ValueError, "hidden must be an integer >= 1"))


def _inr_w_grad():
    net = inr()
    out, _, _ = net(torch.rand(6, 2) * 2 - 1)
    out.pow(2).mean().backward()
    return net.layer.parametrizations.weight.original.grad


# ------------------------------------------------------------------ data and training
add("data/camera-size=0", lambda: deqlite.data.camera_image(0), Err(ValueError, "size must be an integer in [2, 512]"))
add("data/digits-test_size=2", lambda: deqlite.data.load_digits_tensors(test_size=2), Err(ValueError, "test_size must be a float in (0, 1)"))
add("train/epochs=0", lambda: deqlite.training.train_classifier(nn.Linear(2, 2), P2(), torch.zeros(4, dtype=torch.long), epochs=0), Err(ValueError, "epochs must be an integer >= 1"))
add("train/accuracy-rows", lambda: deqlite.training.accuracy(nn.Linear(2, 2), P2(4), torch.zeros(5, dtype=torch.long)), Err(ValueError, "X has 4 rows but y has 5"))
add("train/count-params", lambda: deqlite.training.count_params(nn.Linear(2, 3)), Ok(lambda n: n == 9))

# ------------------------------------------------------------------ analysis
add("analysis/conv-iter-1d", lambda: analysis.convergence_iteration(np.zeros(5)), Err(ValueError, "(T, B, D)"))
add("analysis/conv-iter-tol<0", lambda: analysis.convergence_iteration(np.zeros((5, 1, 3)), tol=-1), Err(ValueError, "tol must be a finite number in (0.0, inf)"))
add("analysis/conv-iter-mode", lambda: analysis.convergence_iteration(np.zeros((5, 1, 3)), mode="last"), Err(ValueError, "mode must be 'first' or 'stays'"))
add("analysis/pca-2d", lambda: analysis.trajectory_pca(np.random.rand(5, 3)), Err(ValueError, "traj[:, None, :]"))
add("analysis/pca-n=0", lambda: analysis.trajectory_pca(np.random.rand(5, 1, 3), n_components=0), Err(ValueError, "n_components"))
add("analysis/pca-ok", lambda: analysis.trajectory_pca(np.random.default_rng(0).random((6, 2, 3)), n_components=2).cumulative[-1], Ok(lambda v: 0 < v <= 1 + 1e-9))
add("analysis/step-deltas-1", lambda: analysis.step_deltas(np.zeros((1, 1, 3))), Err(ValueError, "T >= 2"))
add("analysis/histogram-n=0", lambda: analysis.convergence_histogram([1, 2], 0), Err(ValueError, "n_steps must be a positive int"))

# ------------------------------------------------------------------ hyper
add("hyper/solver-m=0", lambda: hyper.HyperSolver(m=0), Err(ValueError, "m must be an integer >= 1"))
add("hyper/alpha-mode", lambda: hyper.HyperSolver(alpha_mode="sigmoid"), Err(ValueError, "alpha_mode must be one of"))
add("hyper/normalize-mode", lambda: hyper.normalize_alpha(torch.zeros(2, 3), "x"), Err(ValueError, "alpha_mode must be one of"))
add("hyper/normalize-shift-sums-to-one", lambda: hyper.normalize_alpha(torch.randn(4, 3), "shift").sum(-1), Ok(lambda s: torch.allclose(s, torch.ones(4))))
add("hyper/loss-weights-kind", lambda: hyper.loss_weights(5, "random"), Err(ValueError, "weights must be one of"))
add("hyper/loss-weights-K=0", lambda: hyper.loss_weights(0, "uniform"), Err(ValueError, "K must be an integer >= 1"))
add("hyper/net-m=0", lambda: hyper.HyperAndersonNet(m=0), Err(ValueError, "m must be an integer >= 1"))
add("hyper/default-is-anderson", lambda: deqlite.solve(torch.cos, torch.zeros(1, 2).double(), solver=hyper.HyperSolver(), tol=1e-8)[1].status, Ok(lambda s: s == "converged"))

# ------------------------------------------------------------------ viz builders and explorers
_, TR = deqlite.solve(torch.cos, torch.zeros(2, 3), return_iterates=True)
_, TR1 = deqlite.solve(torch.cos, torch.zeros(1, 1), return_iterates=True)
_, NOIT = deqlite.solve(torch.cos, torch.zeros(1, 2))


def _viz():
    import deqlite.viz as viz
    return viz


add("viz/residual-empty-list", lambda: _viz().residual_figure([]), Err(ValueError, "no traces to plot"))
add("viz/residual-empty-dict", lambda: _viz().residual_figure({}), Err(ValueError, "no traces to plot"))
add("viz/residual-no-steps", lambda: _viz().residual_figure({"rel_residual": np.zeros((0, 2)), "abs_residual": np.zeros((0, 2))}), Err(ValueError, "holds no steps"))
add("viz/residual-sample-range", lambda: _viz().residual_figure(TR, reduce=5), Err(ValueError, "use 0..1"))
add("viz/residual-reduce-typo", lambda: _viz().residual_figure(TR, reduce="worst"), Err(ValueError, "reduce must be"))
add("viz/residual-kind-typo", lambda: _viz().residual_figure(TR, kind="relative"), Err(ValueError, "kind must be one of"))
add("viz/residual-none", lambda: _viz().residual_figure(None), Err(TypeError, "expected a deqlite SolverTrace"))
add("viz/residual-ok", lambda: len(_viz().residual_figure(TR).data), Ok(lambda n: n >= 1))
add("viz/anim-sample-range", lambda: _viz().convergence_animation(TR, sample=9), Err(ValueError, "B=2 sample(s)"))
add("viz/anim-no-iterates", lambda: _viz().convergence_animation(NOIT), Err(ValueError, "return_iterates=True"))
add("viz/anim-empty-list", lambda: _viz().convergence_animation([]), Err(ValueError, "no iterates"))
add("viz/anim-dims-range", lambda: _viz().convergence_animation(TR, dims=(0, 7)), Err(ValueError, "pick two of 0..2"))
add("viz/anim-ok", lambda: len(_viz().convergence_animation(TR).frames), Ok(lambda n: n == TR.n_steps))
add("viz/iterate-sample-range", lambda: _viz().iterate_figure(TR, sample=-3), Err(ValueError, "use 0..1"))
add("viz/iterate-dims-range", lambda: _viz().iterate_figure(TR, dims=(0, 7)), Err(ValueError, "pick two of 0..2"))
add("viz/iterate-1d-state", lambda: _viz().iterate_figure(TR1), Err(ValueError, "residual_figure"))
add("viz/iterate-mismatch", lambda: _viz().iterate_figure({"iterates": np.zeros((5, 2, 3)), "rel_residual": np.ones((3, 2)), "abs_residual": np.ones((3, 2))}), Err(ValueError, "5 iterates but 3 residual rows"))
add("viz/explorer-empty-grid", lambda: _viz().Explorer(lambda a: a, {}, lambda a: None), Err(ValueError, "grid is empty"))
add("viz/explorer-empty-values", lambda: _viz().Explorer(lambda a: a, {"a": []}, lambda a: None), Err(ValueError, "has no values"))
add("viz/explorer-initial-unknown", lambda: _viz().Explorer(lambda a: a, {"a": [1]}, lambda a: None, initial={"b": 1}), Err(ValueError, "not in grid"))
add("viz/explorer-initial-value", lambda: _viz().Explorer(lambda a: a, {"a": [1, 2]}, lambda a: None, initial={"a": 5}), Err(ValueError, "is not one of the grid values"))
add("viz/explorer-render-not-figure", lambda: _viz().Explorer(lambda a: a, {"a": [1]}, lambda a: 3).figure(), Err(TypeError, "render must return a plotly go.Figure"))
add("viz/explorer-compute-not-callable", lambda: _viz().Explorer(3, {"a": [1]}, lambda a: None), Err(TypeError, "compute must be callable"))
add("race/figure-empty", lambda: deqlite.race.race_figure({}), Err(ValueError, "non-empty {name: SolverTrace}"))
add("race/figure-not-trace", lambda: deqlite.race.race_figure({"a": 1}), Err(TypeError, "must be a SolverTrace"))
add("race/animation-empty", lambda: deqlite.race.race_animation({}), Err(ValueError, "non-empty"))
add("race/animation-sample", lambda: deqlite.race.race_animation({"a": TR}, sample=4), Err(ValueError, "use 0..1"))
add("race/animation-no-iterates", lambda: deqlite.race.race_animation({"a": NOIT}), Err(ValueError, "return_iterates=True"))


@pytest.mark.parametrize("name,call,expected", CASES, ids=[c[0] for c in CASES])
def test_case(name, call, expected):
    run_case(name, call, expected)


def test_suite_size():
    assert len(CASES) >= 60, len(CASES)
