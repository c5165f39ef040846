"""Every solver, DEQ with every gradient strategy, delta, hyper and the models run on the
device and in the dtype of their inputs.

Parametrised over the available devices (CUDA is skipped, with the reason, where torch sees
no GPU) and over float32, float64 and bfloat16. Half precision cannot reach float64's
tolerances, so each dtype gets a tolerance matched to its resolution (bfloat16 keeps 8
significant bits: a relative residual floor near 2^-8 ~ 4e-3).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deqlite
from deqlite import DEQ, solve
from deqlite import problems as P
from deqlite.models.mlp import TanhCell

NO_CUDA = "no CUDA device visible to torch (CPU-only build or no GPU): GPU runs are benchmarks/gpu.py's job"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (solver tol, error allowed against the float64 answer), relative
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 6e-2)}
SOLVER_OPTIONS = {"broyden": {"m": 30}}


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _problem(device, dtype):
    g = torch.Generator().manual_seed(0)
    W = P.spectral_rescale(torch.randn(16, 16, generator=g, dtype=torch.float64), 0.7)
    inj = torch.randn(4, 16, generator=g, dtype=torch.float64)

    def make(dt, dev):
        Wd, injd = W.to(dev, dt), inj.to(dev, dt)
        return (lambda z: torch.tanh(z @ Wd.T + injd)), torch.zeros(4, 16, device=dev, dtype=dt)

    f64, z64 = make(torch.float64, "cpu")
    z_ref, _ = solve(f64, z64, solver="picard", tol=1e-13, max_iter=500)
    f, z0 = make(dtype, device)
    return f, z0, z_ref


@pytest.mark.parametrize("dtype", DTYPES, ids=_short)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", deqlite.available_solvers())
def test_solver_keeps_device_and_dtype(solver, device, dtype):
    f, z0, z_ref = _problem(device, dtype)
    tol, err_ok = TOL[dtype]
    z, tr = solve(f, z0, solver=solver, tol=tol, max_iter=200, **SOLVER_OPTIONS.get(solver, {}))
    assert z.dtype == dtype and z.device == z0.device, (z.dtype, z.device)
    for t in (tr.abs_residual, tr.rel_residual, tr.converged, tr.best_step, tr.diverged):
        assert t.device == z0.device, f"{solver}: a trace tensor is on {t.device}"
    assert tr.status == "converged", tr.summary()
    err = _rel(z, z_ref)
    assert err <= err_ok, f"{solver} in {_short(dtype)}: error {err:.1e} against float64 > {err_ok:g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_short)  # autocast leaves float64 alone
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["anderson", "broyden", "newton"])
def test_solver_under_autocast_keeps_the_state_dtype(solver, device, dtype):
    """Under torch.autocast a GroupNorm map returns float32 for a bfloat16 state (and bfloat16
    convolutions for a float32 state): the loop casts f(z) back to the state's dtype."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(4, 4, 3, padding=1).to(device), nn.GroupNorm(2, 4).to(device)
    with torch.no_grad():
        conv.weight.mul_(0.3)
    x = torch.randn(2, 4, 4, 4, device=device)
    f = lambda z: torch.relu(norm(conv(z) + x))  # noqa: E731
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        z, tr = solve(f, torch.zeros_like(x, dtype=dtype), solver=solver, tol=3e-2, max_iter=60)
    assert z.dtype == dtype and tr.status == "converged", (z.dtype, tr.summary())


@pytest.mark.parametrize("dtype", DTYPES, ids=_short)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["implicit", "jacobian_free", "phantom", "unrolled"])
def test_deq_gradients_on_device_and_dtype(strategy, device, dtype):
    """Forward and backward in the dtype of the model; the gradient against the float64 one."""
    def grads(dt, dev):
        torch.manual_seed(0)
        f = TanhCell(8, radius=0.6).to(dev, dt)
        tol = TOL[dt][0]
        deq = DEQ(f, solver="picard" if strategy == "unrolled" else "anderson", tol=tol, max_iter=60,
                  backward=strategy, backward_tol=tol, backward_max_iter=100, on_failure="raise")
        x = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(3, 8).to(dev, dt).requires_grad_(True)
        z, _ = deq(x)
        assert z.dtype == dt and z.device == x.device
        z.pow(2).sum().backward()
        gs = [x.grad] + [p.grad for p in f.parameters()]
        for g in gs:
            assert g is not None and g.dtype == dt and g.device == x.device and torch.isfinite(g).all()
        return gs

    want = grads(torch.float64, "cpu")
    got = grads(dtype, device)
    ok = {torch.float64: 1e-7, torch.float32: 1e-3, torch.bfloat16: 1e-1}[dtype]
    for a, b in zip(got, want):
        assert _rel(a, b) <= ok, f"{strategy} in {_short(dtype)}: gradient off by {_rel(a, b):.1e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=_short)
@pytest.mark.parametrize("device", DEVICES)
def test_delta_layers_on_device_and_dtype(device, dtype):
    from deqlite.delta import DeltaConv2d, DeltaLinear

    torch.manual_seed(0)
    for layer, shape in ((DeltaLinear(6, 5, threshold=0.05), (3, 6)),
                         (DeltaConv2d(2, 3, 3, padding=1, threshold=0.05), (2, 2, 5, 5))):
        layer = layer.to(device, dtype)
        a0 = torch.randn(shape, device=device, dtype=dtype)
        a1 = a0 + 0.1 * torch.randn(shape, device=device, dtype=dtype)
        with torch.no_grad():
            layer(a0)
            y = layer(a1)
        assert y.dtype == dtype and y.device == a1.device
        dense = (F.linear(a1, layer.weight, layer.bias) if isinstance(layer, DeltaLinear)
                 else F.conv2d(a1, layer.weight, layer.bias, padding=1))
        # the reset rule: y = W a_kept + b with entries that moved less than the threshold frozen
        assert _rel(y, dense) < 0.2, _rel(y, dense)
        assert layer.records[-1].performed_macs < layer.records[-1].dense_macs


@pytest.mark.parametrize("dtype", DTYPES, ids=_short)
@pytest.mark.parametrize("device", DEVICES)
def test_hyper_on_device_and_dtype(device, dtype):
    from deqlite.hyper import HyperSolver, budget_curve

    f, z0, z_ref = _problem(device, dtype)
    hyper = HyperSolver.build(state_dim=16, input_dim=16, m=3, hidden=8, seed=0).eval()
    hyper.mixer.to(device, dtype), hyper.initializer.to(device, dtype)
    z0 = hyper.initial_state(torch.randn(4, 16, device=device, dtype=dtype))
    assert z0.dtype == dtype and z0.device.type == torch.device(device).type
    z, tr = solve(f, z0, solver=hyper, tol=TOL[dtype][0], max_iter=200, on_failure="ignore")
    assert z.dtype == dtype and z.device == z0.device and torch.isfinite(z).all()
    curve = budget_curve(f, z0, "anderson", 6, z_star=z_ref.to(device, dtype))
    assert len(curve["error"]) == 6 and curve["error"][-1] < curve["error"][0]


@pytest.mark.parametrize("dtype", DTYPES, ids=_short)
@pytest.mark.parametrize("device", DEVICES)
def test_models_on_device_and_dtype(device, dtype):
    from deqlite.models import DEQFourier, DEQSiren, SineRNN
    from deqlite.models.inr import delta_picard_compact, follow_pixels
    from deqlite.models.mlp import DEQClassifier

    coords = deqlite.data.image_coordinates(6).to(device, dtype)
    for cls in (DEQFourier, DEQSiren):
        model = cls(width=16, resolution=6).to(device, dtype).eval()
        with torch.no_grad():
            out = model(coords)
        pred = out[0] if isinstance(out, tuple) else out
        assert pred.dtype == dtype and pred.device == coords.device and torch.isfinite(pred).all()
        run = delta_picard_compact(model, coords, 0.01, max_iter=20, tol=1e-2)
        assert run.iterations >= 1
    idx = torch.arange(4, device=device)
    assert follow_pixels(36, idx, idx + 1).device == coords.device
    rnn = SineRNN(hidden=8).to(device, dtype)
    y = rnn(torch.linspace(0, 1, 5, device=device, dtype=dtype).reshape(-1, 1))
    y = y[0] if isinstance(y, tuple) else y
    assert y.dtype == dtype and y.device == coords.device
    clf = DEQClassifier(12, 8, 3, on_failure="ignore").to(device, dtype)
    logits = clf(torch.randn(4, 12, device=device, dtype=dtype))
    assert logits.dtype == dtype and logits.device == coords.device


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: benchmarks/gpu.py would run for real")
def test_gpu_benchmark_says_there_is_no_gpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout and not out.exists()
