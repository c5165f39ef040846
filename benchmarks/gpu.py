"""GPU check and timings: the device tests on CUDA, then solver / DEQ / delta timings.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--quick]

1. Runs ``tests/test_devices.py -k cuda`` (every solver, DEQ with every gradient strategy,
   delta, hyper and the models on the GPU in float32, float64 and bfloat16).
2. Times, on the GPU (``torch.cuda.synchronize`` around each run, median of 5 after a
   warm-up): every solver on a tanh layer (D=1024, B=256; newton only at D <= 256) in
   float32 and bfloat16, with wall / (evaluations x t_f) as the loop's overhead; one DEQ training step (forward + backward) per gradient strategy, with the peak
   GPU memory (``torch.cuda.max_memory_allocated``); a DeltaLinear layer against its dense
   product.
Writes the JSON only when a GPU ran it. Without a GPU it says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deqlite import available_solvers, solve  # noqa: E402
from deqlite import problems as P  # noqa: E402


def cuda_time(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def tanh_problem(D: int, B: int, dtype, device):
    g = torch.Generator().manual_seed(0)
    W = P.spectral_rescale(torch.randn(D, D, generator=g, dtype=torch.float64), 0.9).to(device, dtype)
    inj = torch.randn(B, D, generator=g, dtype=torch.float64).to(device, dtype)
    return (lambda z: torch.tanh(z @ W.T + inj)), torch.zeros(B, D, device=device, dtype=dtype)


def solver_rows(device, quick: bool):
    rows = []
    D, B = (256, 64) if quick else (1024, 256)
    for dtype in (torch.float32, torch.bfloat16):
        f, z0 = tanh_problem(D, B, dtype, device)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for solver in available_solvers():
            if solver == "newton" and D > 256:
                continue  # builds the full D x D Jacobian per sample
            box = {}

            def run():
                box["z"], box["tr"] = solve(f, z0, solver=solver, tol=tol, max_iter=100, on_failure="ignore")

            wall = cuda_time(run)
            t_f = cuda_time(lambda: f(z0), repeats=20)
            tr = box["tr"]
            rows.append({"problem": f"tanh D={D} B={B}", "dtype": str(dtype).replace("torch.", ""),
                         "solver": solver, "status": tr.status, "nfe": tr.nfe, "wall_s": wall,
                         "t_f_s": t_f, "overhead": wall / (tr.nfe * t_f)})
            print(f"{rows[-1]['problem']:18s} {rows[-1]['dtype']:8s} {solver:9s} {tr.status:9s} "
                  f"nfe {tr.nfe:3d} wall {wall * 1e3:7.2f} ms overhead {rows[-1]['overhead']:.2f}", flush=True)
    return rows


def deq_rows(device, quick: bool):
    from deqlite.models.mlp import DEQClassifier

    rows = []
    width, B = (128, 64) if quick else (512, 256)
    x = torch.randn(B, 64, device=device)
    y = torch.randint(0, 10, (B,), device=device)
    for strategy in ("implicit", "jacobian_free", "phantom", "unrolled"):
        torch.manual_seed(0)
        model = DEQClassifier(64, width, 10, backward=strategy, solver="picard" if strategy == "unrolled" else "anderson",
                              tol=1e-30, max_iter=30, on_failure="ignore").to(device)

        def step():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()

        step()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        rows.append({"strategy": strategy, "width": width, "batch": B, "iterations": 30,
                     "step_s": cuda_time(step), "peak_bytes": int(peak)})
        print(f"DEQ step {strategy:13s} {rows[-1]['step_s'] * 1e3:7.2f} ms peak {peak / 2**20:8.2f} MiB", flush=True)
    return rows


def delta_rows(device, quick: bool):
    from deqlite.delta import DeltaLinear

    n = 256 if quick else 1024
    layer = DeltaLinear(n, n, threshold=0.05).to(device)
    a0 = torch.randn(256, n, device=device)
    a1 = a0 + 0.02 * torch.randn_like(a0)  # most changes below the threshold
    with torch.no_grad():
        layer(a0)
        t_delta = cuda_time(lambda: layer(a1))
        t_dense = cuda_time(lambda: torch.nn.functional.linear(a1, layer.weight, layer.bias))
    print(f"DeltaLinear {n}: delta {t_delta * 1e6:.0f} us, dense {t_dense * 1e6:.0f} us", flush=True)
    return [{"layer": f"DeltaLinear({n}, {n})", "batch": 256, "delta_s": t_delta, "dense_s": t_dense}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-tests", action="store_true", help="timings only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device visible to torch "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); nothing was run or "
              "written. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")
        sys.exit(2)
    device = torch.device("cuda")
    out = {"meta": {"torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name(0), "python": platform.python_version(),
                    "quick": args.quick}}
    if not args.skip_tests:
        proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_devices.py"),
                               "-k", "cuda", "-q", "-p", "no:cacheprovider"], capture_output=True, text=True)
        print(proc.stdout[-2000:], flush=True)
        out["device_tests"] = {"returncode": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:]}
    out["solvers"] = solver_rows(device, args.quick)
    out["deq_steps"] = deq_rows(device, args.quick)
    out["delta"] = delta_rows(device, args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
