"""Tests of the DEQ INRs, the camera / digits data and the compact delta iteration."""
import math

import pytest
import torch
from torch.nn.utils import parametrize

from deqlite.data import camera_image, image_coordinates, load_digits_tensors
from deqlite.delta import delta_mode, mac_summary
from deqlite.models.inr import (
    DEQFourier,
    DEQSiren,
    delta_picard_compact,
    evaluate_delta,
    fit_inr,
    psnr,
    time_compact,
    time_iterations,
)



def test_camera_image_and_coordinates():
    coords, pixels = camera_image(32)
    assert coords.shape == (1024, 2) and pixels.shape == (1024, 1)
    assert coords.min() == -1 and coords.max() == 1
    assert -1 <= pixels.min() < -0.5 and 0.5 < pixels.max() <= 1  # uses the range
    # row-major: the second coordinate is the row
    assert coords[1].tolist() == pytest.approx([-1 + 2 / 31, -1.0])
    with pytest.raises(ValueError, match="size must be an integer in"):
        camera_image(1000)
    with pytest.raises(ValueError, match="size must be an integer >= 2"):
        image_coordinates(1)


def test_load_digits_tensors():
    Xtr, ytr, Xte, _yte = load_digits_tensors(test_size=0.2, seed=1)
    assert Xtr.shape[1] == 64 and Xtr.shape[0] + Xte.shape[0] == 1797
    assert Xtr.dtype == torch.float32 and ytr.dtype == torch.long
    assert Xtr.mean(0).abs().max() < 1e-5  # standardised on the training set
    assert sorted(set(ytr.tolist())) == list(range(10))
    with pytest.raises(ValueError, match="test_size"):
        load_digits_tensors(test_size=2)


def test_psnr():
    assert psnr(torch.zeros(10), torch.full((10,), 0.1)) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(torch.ones(3), torch.ones(3)) == math.inf
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("cls", [DEQFourier, DEQSiren])
def test_spectral_norm_is_097(cls):
    net = cls(width=24, resolution=16)
    s = torch.linalg.matrix_norm(net.layer.weight.detach(), ord=2).item()
    assert s == pytest.approx(0.97, rel=1e-5)


def _fitted(kind=DEQFourier, steps=40):
    torch.manual_seed(0)
    coords, pixels = camera_image(16)
    net = kind(width=32, resolution=16, freq_factor=0.5, seed=0)
    fit = fit_inr(net, coords, pixels, steps=steps, lr=1e-2)
    return net, coords, pixels, fit


@pytest.mark.parametrize("kind", [DEQFourier, DEQSiren])
def test_fit_improves_psnr_and_reuse_saves_iterations(kind):
    _net, coords, pixels, fit = _fitted(kind)
    assert fit.psnr[-1] > fit.psnr[0] + 3
    assert sum(fit.nfe[-10:]) / 10 < fit.nfe[0]  # warm starts need fewer iterations
    net2 = kind(width=32, resolution=16, freq_factor=0.5, seed=0)
    cold = fit_inr(net2, coords, pixels, steps=40, lr=1e-2, reuse=False)
    assert sum(cold.nfe) > sum(fit.nfe)


def test_training_solve_with_delta_rule_records_sparse_calls():
    torch.manual_seed(0)
    coords, pixels = camera_image(16)
    net = DEQFourier(width=32, resolution=16, freq_factor=0.5)
    fit = fit_inr(net, coords, pixels, steps=5, lr=1e-2, train_threshold=0.01, reuse=False)
    s = mac_summary(net)
    assert len(fit.psnr) == 5 and s.total_cost < s.total_dense
    assert not net.layer.enabled  # delta_mode restored the setting


def test_evaluate_delta_threshold_trades_macs_for_accuracy():
    net, coords, pixels, _ = _fitted()
    dense = evaluate_delta(net, coords, pixels, None)
    zero = evaluate_delta(net, coords, pixels, 0.0)
    big = evaluate_delta(net, coords, pixels, 0.1)
    assert zero.psnr == pytest.approx(dense.psnr, abs=1e-3)
    assert zero.iterations == dense.iterations
    assert big.cost < zero.cost <= zero.dense_macs
    assert big.reduction_vs(dense) > 0.3
    assert dense.cost == dense.dense_macs  # the dense run performs every MAC
    fired = evaluate_delta(net, coords, pixels, 0.05, record_fired=True).fired_per_dim
    assert fired.shape[1] == 32


@pytest.mark.parametrize("memory", ["reset", "accumulate"])
@pytest.mark.parametrize("kind", [DEQFourier, DEQSiren])
def test_compact_picard_equals_delta_layer_iteration(memory, kind):
    torch.manual_seed(0)
    coords, _ = camera_image(16)
    net = kind(width=32, resolution=16, freq_factor=0.5).double()
    x = coords.double()
    run = delta_picard_compact(net, x, 0.05, max_iter=12, tol=0.0, memory=memory)
    with torch.no_grad(), parametrize.cached(), delta_mode(net, 0.05, memory=memory):
        g, h = net.injection(x)
        z = torch.zeros(x.shape[0], 32, dtype=torch.float64)
        for _ in range(run.iterations):
            z = net.f(z, g, h)
        s = mac_summary(net)
    torch.testing.assert_close(run.z_star, z, rtol=0, atol=1e-12)
    assert run.active_rows[0] == 256 and run.active_rows[-1] <= run.active_rows[1]
    # the compact path performs the same MACs, and subtracts only for active samples
    assert run.cost <= s.total_cost
    # active_rows[k] samples are subtracted in step k + 1
    assert run.cost - sum(n * 32 for n in run.active_rows[:-1]) == s.performed.sum()


def test_timing_helpers_report_consistent_fields():
    net, coords, _pixels, _ = _fitted(steps=5)
    t = time_iterations(net, coords, 0.05, n_iter=3, repeats=2, warmup=0)
    assert len(t.dense_runs) == 2 and t.speedup == pytest.approx(t.dense_seconds / t.delta_seconds)
    assert len(t.active_fraction) == 3 and t.active_fraction[0] == 1.0
    assert not net.layer.enabled  # settings restored
    c = time_compact(net, coords, 0.05, max_iter=4, repeats=2, warmup=0)
    assert c["delta_iterations"] <= 4 and 0 < c["mac_reduction"] < 1


def test_model_errors():
    with pytest.raises(ValueError, match="kind must be"):
        DEQFourier.__bases__[0]("mlp")
    with pytest.raises(ValueError, match="width must be"):
        DEQFourier(width=0)
    net = DEQFourier(width=8, resolution=8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        net(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="z0 must have shape"):
        net(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same number of rows"):
        fit_inr(net, torch.zeros(3, 2), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="memory must be"):
        delta_picard_compact(net, torch.zeros(3, 2), 0.1, memory="x")


def test_pan_windows_and_follow_pixels():
    from deqlite.data import pan_windows
    from deqlite.models.inr import follow_pixels
    frames = pan_windows(8, 4, 3, step=2)
    assert len(frames) == 3 and frames[0].shape == (16,)
    assert frames[1][0] == frames[0][0] + 2
    src = follow_pixels(64, frames[0], frames[1])
    # pixels seen before come from their old batch position; new ones keep their own
    seen = torch.isin(frames[1], frames[0])
    assert torch.equal(frames[0][src[seen]], frames[1][seen])
    assert torch.equal(src[~seen], torch.arange(16)[~seen])
    with pytest.raises(ValueError, match="leaves the image"):
        pan_windows(8, 4, 6, step=1)


def test_sequence_reuse_and_delta_savings_add_up():
    from deqlite.data import pan_windows
    from deqlite.models.inr import render_sequence
    net, coords, pixels, _ = _fitted()
    frames = pan_windows(16, 10, 4)
    runs = {name: render_sequence(net, coords, pixels, frames, **kw) for name, kw in {
        "cold": {}, "reuse": dict(reuse=True), "delta": dict(threshold=0.03),
        "both": dict(threshold=0.03, reuse=True)}.items()}
    base = runs["cold"].total_cost
    assert runs["reuse"].total_iterations < runs["cold"].total_iterations
    assert runs["both"].total_cost < min(runs["reuse"].total_cost, runs["delta"].total_cost) < base
    assert not net.layer.enabled and net.layer.records == []


def test_compact_warm_start_equals_delta_layer_with_kept_cache():
    torch.manual_seed(0)
    coords, _ = camera_image(16)
    net = DEQFourier(width=32, resolution=16, freq_factor=0.5).double()
    x = coords.double()
    idx0, idx1 = torch.arange(0, 128), torch.arange(16, 144)  # two overlapping frames
    first = delta_picard_compact(net, x[idx0], 0.02, max_iter=6, tol=0.0)
    # follow the pixels (frame 1 = frame 0 shifted by one image row); new pixels keep their slot
    src = torch.where(torch.arange(128) < 112, torch.arange(128) + 16, torch.arange(128))
    second = delta_picard_compact(net, x[idx1], 0.02, max_iter=5, tol=0.0,
                                  warm=first.warm_state(src))
    with torch.no_grad(), parametrize.cached(), delta_mode(net, 0.02):
        g, h = net.injection(x[idx0])
        z = torch.zeros(128, 32, dtype=torch.float64)
        for _ in range(first.iterations):
            z = net.f(z, g, h)
        net.layer.reindex_cache(src)
        z = z.index_select(0, src)
        g, h = net.injection(x[idx1])
        for _ in range(second.iterations):
            z = net.f(z, g, h)
    torch.testing.assert_close(second.z_star, z, rtol=0, atol=1e-12)
    assert second.active_rows[-1] < 128  # old pixels froze
    with pytest.raises(ValueError, match="warm must hold"):
        delta_picard_compact(net, x[idx1], 0.02, warm=(z[:3], z, z))


@pytest.mark.parametrize("cls", [DEQFourier, DEQSiren])
def test_main_weight_is_trained(cls):
    """Regression: W (the spectrally scaled weight inside the fixed point) got no gradient,
    because the no-grad solve and the gradient step shared one cached weight."""
    coords, pixels = camera_image(8)
    net = cls(width=16, resolution=8)
    out, _, _ = net(coords)
    ((out - pixels) ** 2).mean().backward()
    W = net.layer.parametrizations.weight.original
    assert W.grad is not None and float(W.grad.abs().sum()) > 0
    net.zero_grad()
    before = W.detach().clone()
    fit_inr(net, coords, pixels, steps=3)
    assert not torch.equal(before, W.detach()), "fit_inr must change W"
    assert abs(torch.linalg.matrix_norm(net.layer.weight.detach(), 2).item() - 0.97) < 1e-4


def test_compact_threshold_zero_runs_the_dense_product():
    torch.manual_seed(0)
    coords, pixels = camera_image(16)
    net = DEQFourier(width=32, resolution=16, freq_factor=0.5).double()
    x = coords.double()
    run = delta_picard_compact(net, x, 0.0, max_iter=30, tol=1e-6)
    from deqlite.delta.inference import _dense_picard
    out, iters = _dense_picard(net, x, max_iter=30, tol=1e-6)
    assert run.iterations == iters and run.converged
    torch.testing.assert_close(run.output, out, rtol=0, atol=1e-12)
    assert run.cost == run.dense_macs and run.active_fraction == [1.0] * iters
    # the delta form at a tiny threshold agrees up to rounding
    tiny = delta_picard_compact(net, x, 1e-300, max_iter=iters, tol=1e-6)
    torch.testing.assert_close(tiny.z_star, run.z_star, rtol=0, atol=1e-10)


@pytest.mark.parametrize("memory", ["reset", "accumulate"])
def test_compact_column_gather_and_masked_product_agree(memory):
    torch.manual_seed(0)
    coords, _ = camera_image(16)
    net = DEQSiren(width=32, resolution=16, freq_factor=0.5).double()
    x = coords.double()
    runs = [delta_picard_compact(net, x, 0.05, max_iter=12, tol=0.0, memory=memory,
                                 gather_below=gb) for gb in (0.0, 1.0)]
    torch.testing.assert_close(runs[0].z_star, runs[1].z_star, rtol=0, atol=1e-12)
    assert runs[0].cost == runs[1].cost and runs[0].active_rows == runs[1].active_rows
    with pytest.raises(ValueError, match=r"gather_below must be a finite number in \[0.0, 1.0\]"):
        delta_picard_compact(net, x, 0.05, gather_below=2.0)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        delta_picard_compact(net, x, -0.1)


def test_time_inference_fields_are_consistent():
    from deqlite.models.inr import time_inference
    net, coords, pixels, _ = _fitted(steps=5)
    r = time_inference(net, coords, pixels, [0.0, 0.1], repeats=2, warmup=0)
    assert len(r["dense_km"]["runs"]) == 2 and len(r["delta"]) == 2
    zero, big = r["delta"]
    # threshold 0 performs the dense MACs of the dense plain iteration
    assert zero["mac_reduction_vs_picard"] == pytest.approx(0.0)
    assert big["macs"] < zero["macs"]
    assert big["speedup_vs_km"] == pytest.approx(r["dense_km"]["seconds"] / big["seconds"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_compact_runs_on_cuda():
    torch.manual_seed(0)
    coords, _ = camera_image(16)
    net = DEQFourier(width=32, resolution=16, freq_factor=0.5).double()
    cpu = delta_picard_compact(net, coords.double(), 0.05, max_iter=10, tol=0.0)
    gpu = delta_picard_compact(net.cuda(), coords.double().cuda(), 0.05, max_iter=10, tol=0.0)
    assert gpu.z_star.device.type == "cuda" and gpu.active_rows == cpu.active_rows
    torch.testing.assert_close(gpu.z_star.cpu(), cpu.z_star, rtol=0, atol=1e-9)
