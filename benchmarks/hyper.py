"""Benchmark: the neural equilibrium solver (deqlite.hyper) against Anderson, per seed.

Bai, Koltun & Kolter (ICLR 2022) report 1.6-2x faster DEQ inference at equal accuracy, a
solver of 1-3% of the DEQ's parameters and ~1% extra training time. This script measures
the same quantities on the chapter's setting, a digits DEQ with a *slow* map
(:func:`deqlite.hyper.slow_digits_deq`: ``W`` = gain x orthogonal, unconstrained, so
Anderson needs 15-30 evaluations), for several seeds and at a larger size:

* evaluations of ``f`` (nfe) until the median relative residual over the test digits stays
  below ``target`` (1e-3 and 1e-4), and the test accuracy each solver has at that budget;
* wall-clock *and* CPU time (``time.process_time``) of those solves, medians over
  ``repeats`` interleaved runs after a warm-up, one torch thread; the neural solver's time
  includes its initializer. Ratios are taken within one run (the machine may be shared);
* parameters, and the training cost the way the paper counts it (Fig. 4d): the solver's
  training time (here including the precise fixed points it trains on) over the DEQ's.

Run: ``python benchmarks/hyper.py`` (several minutes on one core; ``--quick`` for a smoke
run). The chapter's parameters cell scales the same way (``width``, ``train_steps``, ...):
``--chapter-width 512`` also executes the chapter itself with papermill at that width and
records what it glued (and the assert it stopped at, if one fails at that size).
Results go to ``benchmarks/results/hyper.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict

import torch

from deqlite import solve
from deqlite.data import load_digits_tensors
from deqlite.hyper import (HyperSolver, budget_curve, count_parameters, fixed_points, frozen_map,
                           matched_nfe, median_times, slow_digits_deq, train_hypersolver)
from deqlite.training import train_classifier

RESULTS = Path(__file__).resolve().parent / "results" / "hyper.json"
TARGETS = (1e-3, 1e-4)


def run_setting(width: int, gain: float, seed: int, *, epochs: int, steps: int, K: int, m: int,
                init_hidden: int, max_nfe: int, repeats: int) -> Dict[str, Any]:
    Xtr, ytr, Xte, yte = load_digits_tensors(seed=seed)
    model = slow_digits_deq(width, gain, seed=seed)
    fit = train_classifier(model, Xtr, ytr, epochs=epochs, lr=3e-3, seed=seed)
    f = frozen_map(model)
    u = model.inject(Xte)

    def fx(z):
        return torch.tanh(z @ model.cell.W.weight.T + u)

    t0 = time.perf_counter()
    z_train, worst_train = fixed_points(f, Xtr, state_shape=(width,), max_iter=80)
    t_fixed = time.perf_counter() - t0
    hyper = HyperSolver.build(state_dim=width, input_dim=64, m=m, init_hidden=init_hidden, compress_dim=0,
                              gram=True, seed=seed)
    log = train_hypersolver(hyper, f, Xtr, z_train, K=K, steps=steps, batch_size=32, lr=3e-3, conv_loss="log",
                            init_lr=1e-2, init_batch_size=256, seed=seed)
    z_star, worst = fixed_points(f, Xte, state_shape=(width,), max_iter=300)
    with torch.no_grad():
        acc_star = 100.0 * float((model.head(z_star).argmax(-1) == yte).double().mean())
        z_init = hyper.initial_state(Xte)
    zero = torch.zeros(len(Xte), width)
    starts = {"picard": ("picard", zero), "anderson": ("anderson", zero), "neural": (hyper, z_init)}
    curves = {n: budget_curve(fx, z0, s, max_nfe, z_star=z_star, readout=model.head, labels=yte, m=m)
              if n == "anderson" else budget_curve(fx, z0, s, max_nfe, z_star=z_star, readout=model.head, labels=yte)
              for n, (s, z0) in starts.items()}
    out: Dict[str, Any] = {
        "width": width, "gain": gain, "seed": seed, "epochs": epochs, "batch": len(Xte), "m": m, "K": K,
        "deq_parameters": count_parameters(model), "solver_parameters": hyper.num_parameters(),
        "solver_share": hyper.num_parameters() / count_parameters(model),
        "deq_train_seconds": fit.seconds, "solver_train_seconds": log.seconds,
        "fixed_points_seconds": t_fixed, "anderson_memory": m, "solver_train_steps": log.steps,
        "training_cost_ratio": (log.seconds + t_fixed) / fit.seconds,
        "z_star_worst_rel_residual": max(worst, worst_train), "converged_accuracy": acc_star,
        "curves": curves, "targets": {},
    }
    for target in TARGETS:
        nfe = {n: matched_nfe(c["rel_residual"], target, 0.0, higher_is_better=False) for n, c in curves.items()}
        row: Dict[str, Any] = {"nfe": nfe}
        if nfe["anderson"] and nfe["neural"]:
            row["accuracy"] = {n: curves[n]["accuracy"][k - 1] for n, k in nfe.items() if k}

            def run_anderson(k=nfe["anderson"]):
                with torch.no_grad():
                    solve(fx, zero, solver="anderson", m=m, tol=1e-30, max_iter=k, on_failure="ignore")

            def run_neural(k=nfe["neural"]):
                with torch.no_grad():
                    solve(fx, hyper.initial_state(Xte), solver=hyper, tol=1e-30, max_iter=k, on_failure="ignore")

            t = median_times({"anderson": run_anderson, "neural": run_neural}, repeats=repeats)
            row["seconds"] = t
            row["speedup"] = {"nfe": nfe["anderson"] / nfe["neural"],
                              "wall": t["anderson"]["wall"] / t["neural"]["wall"],
                              "cpu": t["anderson"]["cpu"] / t["neural"]["cpu"]}
        out["targets"][f"{target:g}"] = row
        print(f"  width {width} seed {seed} target {target:g}: {json.dumps({k: v for k, v in row.items() if k != 'seconds'})}",
              flush=True)
    print(f"  params {out['solver_parameters']} / {out['deq_parameters']} = {100 * out['solver_share']:.2f}%; "
          f"training {log.seconds + t_fixed:.1f} s vs DEQ {fit.seconds:.1f} s", flush=True)
    return out


def run_chapter(parameters: Dict[str, Any]) -> Dict[str, Any]:
    """Execute ``book/hyper.ipynb`` with papermill at the given ``parameters`` (the chapter's
    parameters cell scales up) and return every number it glued, or the error it stopped at."""
    import tempfile

    import nbformat
    import papermill

    book = Path(__file__).resolve().parents[1] / "book"
    with tempfile.TemporaryDirectory() as tmp:
        out_nb = Path(tmp) / "hyper.ipynb"
        error = None
        try:
            papermill.execute_notebook(str(book / "hyper.ipynb"), str(out_nb), parameters=parameters,
                                       cwd=str(book), progress_bar=False)
        except Exception as exc:  # an assert that fails at this size is a result, not a crash
            error = f"{type(exc).__name__}: {str(exc)[-400:]}"
        glued: Dict[str, Any] = {}
        if out_nb.exists():
            for cell in nbformat.read(str(out_nb), as_version=4).cells:
                for o in cell.get("outputs", []):
                    name = o.get("metadata", {}).get("scrapbook", {}).get("name")
                    text = o.get("data", {}).get("application/papermill.record/text/plain")
                    if name and text is not None:
                        try:
                            glued[name] = json.loads(text)
                        except ValueError:
                            glued[name] = text
    return {"parameters": parameters, "error": error, "glued": glued}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--large-width", type=int, default=512)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--chapter-width", type=int, default=0,
                    help="also run the chapter itself (papermill) at this width, e.g. 512")
    ap.add_argument("--chapter-only", action="store_true",
                    help="with --chapter-width: only run the chapter, and add its record to the existing --out file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    q = args.quick
    results: Dict[str, Any] = {
        "what": "deqlite.hyper vs Anderson on a slow digits DEQ: nfe, wall and CPU time at matched residual, "
                "accuracy, parameters, training cost; per seed",
        "paper": {"speedup": "1.6-2x at equal accuracy", "solver_share": "0.6-3.9% (Fig. 4d)",
                  "training_cost": "0.76-1.1% of the DEQ's training time (Fig. 4d)"},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "quick": q, "settings": [],
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    chapter = dict(epochs=2 if q else 3, steps=20 if q else 150, K=10, m=6, init_hidden=5,
                   max_nfe=40, repeats=2 if q else 7)
    if args.chapter_only:
        if not args.chapter_width:
            raise SystemExit("--chapter-only needs --chapter-width N")
        results = json.loads(args.out.read_text())
        args.seeds, args.large_width = [], 0
    for seed in args.seeds:
        print(f"chapter size (width 256), seed {seed}", flush=True)
        results["settings"].append({"size": "chapter", **run_setting(256, 1.1, seed, **chapter)})
    if args.large_width:
        print(f"large size (width {args.large_width}), seed {args.seeds[0]}", flush=True)
        large = dict(chapter, epochs=2 if q else 4, steps=20 if q else 600, init_hidden=10)
        results["settings"].append({"size": "large", **run_setting(args.large_width, 1.1, args.seeds[0], **large)})

    if args.chapter_width:
        print(f"the chapter at width {args.chapter_width} (papermill)", flush=True)
        results["chapter_run"] = run_chapter({"width": args.chapter_width, "train_budget": 120.0})

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    results["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(plain(results), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
