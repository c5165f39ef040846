"""The DeltaDEQ chapter's figures (deqlite.viz.delta_figures): what each panel shows."""
import numpy as np
import pytest
import torch

pytest.importorskip("plotly")

from deqlite import analysis  # noqa: E402
from deqlite.data import camera_image  # noqa: E402
from deqlite.delta import evaluate_delta  # noqa: E402
from deqlite.models.inr import DEQFourier  # noqa: E402
from deqlite.models.rnn import SineRNN, sine_data  # noqa: E402
from deqlite.viz.delta_figures import delta_threshold_figure, heterogeneous_convergence_figure  # noqa: E402


def test_heterogeneous_convergence_figure_draws_every_dimension():
    rnn = SineRNN(hidden=6, seed=0)
    x, y = sine_data(40)
    with torch.no_grad():
        _, traj = rnn(x, return_trajectory=True)  # (16, 40, 6)
    outs = rnn.outputs(x)
    counts, _ = analysis.convergence_histogram(analysis.convergence_iteration(traj, tol=0.01), n_steps=15)
    pca = analysis.trajectory_pca(traj, n_components=2)
    mean_delta, _ = analysis.delta_profile(traj)
    fig = heterogeneous_convergence_figure(x, y, outs, traj, pca, mean_delta, counts, sample=10,
                                           n_neighbours=3)
    # 4 read-outs + target, 3 PCA paths, 1 variance curve, 6 + 6 per-dimension lines, 1 bar
    assert len(fig.data) == 4 + 1 + 3 + 1 + 12 + 1
    assert fig.layout.title.text == "Heterogeneous convergence in a 6-unit RNN cell"
    np.testing.assert_allclose(fig.data[9].y, traj[:, 10, 0].numpy(), rtol=1e-6)  # panel d, dim 0
    assert fig.layout.template.layout.colorway[0] == "#0072B2"  # the deqlite theme
    with pytest.raises(ValueError, match="sample must be an integer in"):
        heterogeneous_convergence_figure(x, y, outs, traj, pca, mean_delta, counts, sample=39)


def test_delta_threshold_figure_shows_its_own_run():
    coords, pixels = camera_image(8)
    net = DEQFourier(width=16, resolution=8)
    dense = evaluate_delta(net, coords, pixels, None)
    runs = [evaluate_delta(net, coords, pixels, th, record_fired=True) for th in (0.01, 0.2)]
    sweep = [(r.reduction_vs(dense), r.psnr) for r in runs]
    for ev in runs:
        fig = delta_threshold_figure(ev, dense, sweep, size=8, iterations_shown=12)
        titles = [a.text for a in fig.layout.annotations]
        assert titles[0] == f"{ev.psnr:.2f} dB, {ev.iterations} it."
        assert titles[2] == f"{ev.reduction_vs(dense):.1%} MACs saved"
        heat = np.asarray(fig.data[1].z, dtype=float)  # (D, iterations_shown)
        assert heat.shape == (16, 12)
        assert np.isnan(heat[:, ev.iterations:]).all() and not np.isnan(heat[:, :ev.iterations]).any()
        assert fig.data[3].x[0] == pytest.approx(100 * ev.reduction_vs(dense))
    with pytest.raises(ValueError, match="record_fired=True"):
        delta_threshold_figure(dense, dense, sweep, size=8)
