"""Tests of deqlite.analysis (heterogeneous convergence) and the sin(x) RNN cell."""
import numpy as np
import pytest
import torch

from deqlite.analysis import (
    convergence_histogram,
    convergence_iteration,
    delta_profile,
    step_deltas,
    trajectory_pca,
)
from deqlite.models.rnn import SineRNN, fit_sine_rnn, sine_data



def _geometric(rates, T=20, B=1):
    """z_t = rate^t per dimension: the change at step t is rate^(t-1) (1 - rate)."""
    r = torch.tensor(rates, dtype=torch.float64)
    return (r ** torch.arange(T, dtype=torch.float64)[:, None, None]).expand(T, B, len(rates))


def test_convergence_iteration_matches_closed_form():
    rates = [0.1, 0.5, 0.8]
    traj = _geometric(rates, T=40)
    got = convergence_iteration(traj, tol=0.01)[0]
    # first t with rate^(t-1) (1 - rate) < 0.01
    want = [next(t for t in range(1, 100) if r ** (t - 1) * (1 - r) < 0.01) for r in rates]
    assert got.tolist() == want


def test_first_versus_stays_and_never():
    # dimension 0 dips below tol once, then moves again; dimension 1 never settles
    z = np.array([[0.0, 0.0], [1.0, 1.0], [1.001, 2.0], [1.5, 3.0], [1.5005, 4.0]])[:, None, :]
    assert convergence_iteration(z, 0.01, "first")[0].tolist() == [2, 5]
    assert convergence_iteration(z, 0.01, "stays")[0].tolist() == [4, 5]
    counts, never = convergence_histogram(convergence_iteration(z, 0.01), n_steps=4)
    assert counts.tolist() == [0, 1, 0, 0] and never == 1


def test_histogram_counts_every_pair():
    traj = torch.cumsum(torch.randn(12, 5, 7, generator=torch.Generator().manual_seed(0)) *
                        0.7 ** torch.arange(12.0)[:, None, None], dim=0)
    ci = convergence_iteration(traj, tol=0.05)
    counts, never = convergence_histogram(ci, n_steps=11)
    assert counts.sum() + never == 5 * 7


def test_step_deltas_and_profile_shapes():
    traj = torch.randn(6, 4, 3)
    d = step_deltas(traj)
    assert d.shape == (5, 4, 3) and np.allclose(d, (traj[1:] - traj[:-1]).abs().numpy(), atol=1e-6)
    mean, std = delta_profile(traj)
    assert mean.shape == std.shape == (5, 3)


def test_pca_finds_a_plane():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 2, generator=g, dtype=torch.float64))[0]  # (10, 2)
    coeff = torch.randn(8, 6, 2, generator=g, dtype=torch.float64)
    traj = coeff @ basis.T + 3.0  # states on an affine plane in R^10
    p = trajectory_pca(traj, n_components=2)
    assert p.cumulative[1] == pytest.approx(1.0, abs=1e-12)
    assert p.n_components_for(0.99) == 2
    recon = p.projected @ p.components + p.mean
    assert np.allclose(recon, traj.numpy(), atol=1e-10)


@pytest.mark.parametrize("call, match", [
    (lambda: convergence_iteration(np.zeros((3, 4))), r"\(T, B, D\)"),
    (lambda: convergence_iteration(np.zeros((1, 2, 3))), "T >= 2"),
    (lambda: convergence_iteration(np.zeros((3, 2, 3)), tol=0), "tol must be"),
    (lambda: convergence_iteration(np.zeros((3, 2, 3)), mode="last"), "mode must be"),
    (lambda: convergence_histogram(np.array([1, 9]), n_steps=3), "n_steps"),
    (lambda: trajectory_pca(np.zeros((3, 2, 3)), n_components=4), "n_components"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sine_rnn_learns_and_converges_heterogeneously():
    torch.manual_seed(0)
    net = SineRNN(hidden=20, seed=0)
    x, y = sine_data(200)
    with torch.no_grad():
        before = torch.mean((net(x) - y) ** 2).item()
    fit = fit_sine_rnn(net, epochs=150)
    with torch.no_grad():
        after = torch.mean((net(x) - y) ** 2).item()
        _, traj = net(x, return_trajectory=True)
    assert after < 0.5 * before
    assert fit.losses[-1] < fit.losses[0]
    assert traj.shape == (16, 200, 20)
    ci = convergence_iteration(traj, tol=0.01)
    # heterogeneous: the dimensions do not all converge at the same step
    assert ci.max() - ci.min() >= 3
    assert net.outputs(x, 5).shape == (5, 200, 1)


def test_sine_rnn_errors():
    with pytest.raises(ValueError, match=r"shape \(B, 1\)"):
        SineRNN()(torch.zeros(4))
    with pytest.raises(ValueError, match="n_iter"):
        SineRNN()(torch.zeros(4, 1), n_iter=0)
    with pytest.raises(ValueError, match="hidden"):
        SineRNN(hidden=0)
