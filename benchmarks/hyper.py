"""Benchmark: the neural equilibrium solver (deqlite.hyper) against Anderson at matched accuracy.

Bai, Koltun & Kolter (ICLR 2022) report 1.6-2x faster DEQ inference at equal accuracy. This
script measures, on a digits DEQ classifier (``f(z, u) = tanh(W z + u)``, ``||W|| <= 0.99``):

* evaluations of ``f`` (nfe) each solver needs to (a) reach the converged test accuracy
  within 0.1 points and stay there, (b) bring every sample's relative residual below
  ``1e-2``, ``1e-3``, ``1e-4``;
* the wall-clock time of the same solves (median of ``repeats`` runs after a warm-up,
  ``torch.set_num_threads(1)``), the hypersolver's time including its initializer;

at two sizes: the chapter's model (width 256, the 450 test digits) and one where ``f``
dominates the cost (width 512, a batch of 1024 digits). The hypersolver never sees the
evaluation inputs while training. Results go to ``benchmarks/results/hyper.json``.

Run: ``python benchmarks/hyper.py`` (about 5 minutes on one core; ``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from deqlite import solve
from deqlite.data import load_digits_tensors
from deqlite.hyper import (HyperSolver, budget_curve, fixed_points, matched_nfe,
                           train_hypersolver)
from deqlite.models.mlp import DEQClassifier
from deqlite.training import train_classifier

RESULTS = Path(__file__).resolve().parent / "results" / "hyper.json"
TOLS = (1e-2, 1e-3, 1e-4)


def train_deq(width: int, epochs: int, seed: int, Xtr, ytr) -> DEQClassifier:
    """A contractive DEQ classifier (``||W|| <= 0.99``), trained with the Jacobian-free backward,
    then frozen. The injection starts scaled down (x0.3) so the model leans on its equilibrium."""
    torch.manual_seed(seed)
    model = DEQClassifier(64, width, 10, radius=0.99, tol=1e-4, max_iter=40, backward="jacobian_free")
    with torch.no_grad():
        model.inject.weight.mul_(0.3)
    train_classifier(model, Xtr, ytr, epochs=epochs, lr=3e-3, seed=seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run_size(name: str, width: int, X_hyper, X_eval, y_eval, Xtr, ytr, *, epochs: int, budget: float,
             steps: int, max_nfe: int, repeats: int, seed: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    model = train_deq(width, epochs, seed, Xtr, ytr)
    t_deq = time.perf_counter() - t0

    # the spectral-norm parametrisation of W recomputes an SVD at every call; frozen, W is one
    # matrix: evaluate it once, or every solver's step would be dominated by that SVD
    W = model.cell.W.weight.detach().clone()

    def f(z, x):  # the frozen DEQ map on raw inputs
        return torch.tanh(z @ W.T + model.inject(x))

    u = model.inject(X_eval)

    def fx(z):
        return torch.tanh(z @ W.T + u)

    probe = torch.randn(len(X_eval), width)
    assert torch.allclose(fx(probe), model.cell(probe, u), atol=1e-6)

    z_hyper, worst = fixed_points(f, X_hyper, state_shape=(width,))
    hyper = HyperSolver.build(state_dim=width, input_dim=64, init_hidden=6, compress_dim=0, seed=seed)
    log = train_hypersolver(hyper, f, X_hyper, z_hyper, K=8, steps=steps, batch_size=32, lr=3e-3,
                            conv_loss="log", init_lr=1e-2, init_batch_size=256, time_budget=budget, seed=seed)
    z_star, worst_eval = fixed_points(f, X_eval, state_shape=(width,))
    with torch.no_grad():
        acc_star = 100.0 * float((model.head(z_star).argmax(-1) == y_eval).double().mean())
        z0h = hyper.initial_state(X_eval)
        acc_init = 100.0 * float((model.head(z0h).argmax(-1) == y_eval).double().mean())
    zero = torch.zeros(len(X_eval), width)
    starts = {"picard": ("picard", zero), "anderson": ("anderson", zero), "broyden": ("broyden", zero),
              "hyper": (hyper, z0h)}
    out: Dict[str, Any] = {
        "width": width, "batch": len(X_eval), "deq_parameters": sum(p.numel() for p in model.parameters()),
        "hyper_parameters": hyper.num_parameters(), "deq_train_seconds": t_deq,
        "hyper_train_seconds": log.seconds, "hyper_train_steps": log.steps,
        "z_star_worst_rel_residual": max(worst, worst_eval), "converged_accuracy": acc_star,
        "initializer_accuracy": acc_init,
        "initializer_rel_error": float(((z0h - z_star).norm(dim=1) / z_star.norm(dim=1)).median()),
        "solvers": {},
    }
    jobs: Dict[Any, Any] = {}  # (solver name, max_iter, tol) -> a closure running that solve
    for sname, (solver, z0) in starts.items():
        curve = budget_curve(fx, z0, solver, max_nfe, z_star=z_star, readout=model.head, labels=y_eval)
        k_acc = matched_nfe(curve["accuracy"], acc_star, 0.1)
        rec: Dict[str, Any] = {"curve": curve, "nfe_matched_accuracy": k_acc}
        for tol in TOLS:
            with torch.no_grad():
                _, tr = solve(fx, z0, solver=solver, tol=tol, max_iter=100, on_failure="ignore")
            rec[f"tol_{tol:g}"] = {"nfe": tr.nfe, "status": tr.status}
        out["solvers"][sname] = rec

        def make(solver=solver, z0=z0, with_init=sname == "hyper"):
            def run(max_iter: int, tol: float) -> None:
                with torch.no_grad():  # the hypersolver's time includes its initializer
                    zz = hyper.initial_state(X_eval) if with_init else z0
                    solve(fx, zz, solver=solver, tol=tol, max_iter=max_iter, on_failure="ignore")
            return run

        run = make()
        if k_acc:
            jobs[(sname, "matched_accuracy")] = (run, k_acc, 1e-30)
        for tol in TOLS:
            jobs[(sname, f"tol_{tol:g}")] = (run, 100, tol)
        jobs[(sname, "per_step")] = (run, 20, 1e-30)
    # time every solve `repeats` times, interleaved, so that load from other processes
    # falls on all solvers alike; report medians after one warm-up round
    times: Dict[Any, List[float]] = {key: [] for key in jobs}
    for r in range(repeats + 1):
        for key, (run, max_iter, tol) in jobs.items():
            t1 = time.perf_counter()
            run(max_iter, tol)
            if r:
                times[key].append(time.perf_counter() - t1)
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    for sname, rec in out["solvers"].items():
        rec["seconds_matched_accuracy"] = med.get((sname, "matched_accuracy"))
        for tol in TOLS:
            rec[f"tol_{tol:g}"]["seconds"] = med[(sname, f"tol_{tol:g}")]
        rec["seconds_per_step"] = med[(sname, "per_step")] / 20
        print(f"  {name} {sname:8s} acc-matched nfe {rec['nfe_matched_accuracy']}  " +
              "  ".join(f"tol {t:g}: {rec[f'tol_{t:g}']['nfe']} nfe {rec[f'tol_{t:g}']['seconds'] * 1e3:.1f} ms"
                        for t in TOLS) + f"  step {rec['seconds_per_step'] * 1e3:.2f} ms", flush=True)
    a, h = out["solvers"]["anderson"], out["solvers"]["hyper"]
    sp: Dict[str, Any] = {}
    if a["nfe_matched_accuracy"] and h["nfe_matched_accuracy"]:
        sp["matched_accuracy"] = {"nfe": a["nfe_matched_accuracy"] / h["nfe_matched_accuracy"],
                                  "wall": a["seconds_matched_accuracy"] / h["seconds_matched_accuracy"]}
    for tol in TOLS:
        ka, kh = a[f"tol_{tol:g}"], h[f"tol_{tol:g}"]
        if ka["status"] == kh["status"] == "converged":
            sp[f"tol_{tol:g}"] = {"nfe": ka["nfe"] / kh["nfe"], "wall": ka["seconds"] / kh["seconds"]}
    out["speedup_vs_anderson"] = sp
    out["step_cost_ratio_hyper_over_anderson"] = h["seconds_per_step"] / a["seconds_per_step"]
    print(f"  {name} speedup vs Anderson: {json.dumps(sp)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    Xtr, ytr, Xte, yte = load_digits_tensors(seed=0)
    q = args.quick
    common = dict(max_nfe=12 if q else 30, repeats=2 if q else 7, seed=args.seed)
    results: Dict[str, Any] = {
        "what": "deqlite.hyper vs classic solvers on a digits DEQ; nfe and wall-clock at matched accuracy",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "quick": q, "sizes": {},
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    print("chapter size (width 256, 450 test digits)")
    results["sizes"]["chapter"] = run_size(
        "chapter", 256, Xtr, Xte, yte, Xtr, ytr, epochs=2 if q else 4, budget=None,
        steps=30 if q else 600, **common)
    # f dominates: width 512, a batch of 1024 digits the hypersolver did not train on
    n_h = len(Xtr) + len(Xte) - 1024
    X_all, y_all = torch.cat([Xtr, Xte]), torch.cat([ytr, yte])
    print(f"large size (width 512, batch 1024; hypersolver trained on {n_h} other digits)")
    results["sizes"]["large"] = run_size(
        "large", 512, X_all[:n_h], X_all[n_h:], y_all[n_h:], Xtr, ytr, epochs=1 if q else 6,
        budget=None, steps=30 if q else 600, **common)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    results["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    args.out.write_text(json.dumps(plain(results), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
