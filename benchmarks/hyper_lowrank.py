"""Exploration for issue 11: how much can a *start* predicted from x save Anderson?

The neural solver's measured gain (``benchmarks/hyper.py``) comes from its initializer. A
start at relative distance ``e`` from ``z*`` saves about ``log e / log r`` evaluations, so a
1.6x gain needs ``e`` of a few percent. This script builds digits DEQs whose injection is
low-rank (``U = A B``, rank ``r``) and whose ``W`` is symmetric with eigenvalues spread in
``[-rho, rho]`` (frozen during training: only the injection and the read-out learn), so that
``z*(x)`` lies near an ``r``-dimensional set, and fits the best linear rank-``h`` start
``x -> z*`` in closed form (ridge regression, truncated SVD) on the training fixed points.
It then counts Anderson's evaluations (memory 6) to a median relative residual of 1e-3 over
the test digits from zero and from that start, with the test accuracy at each budget.

It measures only the start (no learned mixing), per seed, for a few training strengths (the
DEQ's learning rate): the weaker the training, the closer the DEQ stays to linear, the
better the start and the worse the classifier.

Second part (``start_floor``): the chapter's own DEQ (:func:`deqlite.hyper.slow_digits_deq`,
gain 1.1, trained 3 epochs at lr 3e-3) at widths 256 and 512, seeds 0-2: the relative error
of the best linear rank-``h`` start for ``h`` = 4..64, and Anderson's evaluations (with the
test accuracy there) to median relative residuals 1e-1, 3e-2, 1e-2 and 1e-3 from zero and
from each start. A linear start of any rank is a lower bound on what a 1-3% initializer
(a linear layer, a ReLU, a projection) can be expected to reach only if the DEQ is close to
linear; the numbers show how far it is.

Third part (``neural``): the library's neural solver (:class:`deqlite.hyper.HyperSolver`,
trained by :func:`deqlite.hyper.train_hypersolver` as in chapter 4: learned ReLU initializer,
Gram-feature mixer, K = 10, 150 steps) on the low-rank DEQ where the start came closest to
1.6x at a usable accuracy (rank 6, W frozen, lr 1e-3), seeds 0-2: evaluations to 1e-3 and the
accuracy there for Anderson from zero, the neural solver, and Anderson from the learned start;
wall-clock and CPU time of those solves (medians of 7 interleaved runs, ratios in one run);
parameters; and the training cost the paper's way (solver training + its fixed points over
the DEQ's training time).

Run: ``python benchmarks/hyper_lowrank.py`` (about fifteen minutes on one core; ``--only
lowrank|floor|neural`` runs one part and keeps the others' recorded results); results go to
``benchmarks/results/hyper_lowrank.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from deqlite import solve
from deqlite.data import load_digits_tensors
from deqlite.hyper import (HyperSolver, budget_curve, count_parameters, fixed_points, frozen_map, matched_nfe,
                           median_times, slow_digits_deq, train_hypersolver)
from deqlite.solvers import Anderson
from deqlite.training import train_classifier

RESULTS = Path(__file__).resolve().parent / "results" / "hyper_lowrank.json"
CONFIGS = [  # (name, rho, rank, start rank h, injection scale, DEQ lr, freeze W)
    ("W trained, lr 3e-3", 0.99, 8, 8, 0.05, 3e-3, False),
    ("W frozen, lr 3e-3", 0.99, 8, 8, 0.05, 3e-3, True),
    ("W frozen, lr 1e-3, r = h = 6", 0.99, 6, 6, 0.05, 1e-3, True),
    ("W frozen, lr 3e-4", 0.99, 8, 8, 0.05, 3e-4, True),
]


def build(width, rho, rank, scale, seed):
    model = slow_digits_deq(width, 1.0, seed=seed)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        Q, _ = torch.linalg.qr(torch.randn(width, width))
        model.cell.W.weight.copy_((Q * torch.linspace(-rho, rho, width)) @ Q.T)
    inject = nn.Sequential(nn.Linear(64, rank, bias=False), nn.Linear(rank, width))
    with torch.no_grad():
        inject[1].weight.mul_(scale)
    inject.in_features = 64  # what DEQClassifier checks its input against
    model.inject = inject
    return model


def linear_start(X, Z, h):
    """Best rank-h affine map X -> Z (ridge, then truncated SVD): returns x -> z0."""
    Xa = torch.cat([X, torch.ones(len(X), 1)], 1)
    coef = torch.linalg.solve(Xa.T @ Xa + 1e-3 * torch.eye(Xa.shape[1]), Xa.T @ Z)
    pred = Xa @ coef
    mu = pred.mean(0)
    P = torch.linalg.svd(pred - mu, full_matrices=False)[2][:h]  # (h, D)
    return lambda x: ((torch.cat([x, torch.ones(len(x), 1)], 1) @ coef - mu) @ P.T) @ P + mu


FLOOR_TARGETS = (1e-1, 3e-2, 1e-2, 1e-3)


def start_floor(width, seed, ranks=(4, 8, 16, 32, 64), epochs=3, max_nfe=60):
    """The chapter's DEQ: linear-start error against rank, and Anderson's evaluations from it."""
    Xtr, ytr, Xte, yte = load_digits_tensors(seed=seed)
    model = slow_digits_deq(width, 1.1, seed=seed)
    fit = train_classifier(model, Xtr, ytr, epochs=epochs, lr=3e-3, seed=seed)
    f, f_test = frozen_map(model), frozen_map(model, Xte)
    z_train, _ = fixed_points(f, Xtr, state_shape=(width,), max_iter=100)
    z_star, worst = fixed_points(f, Xte, state_shape=(width,), max_iter=300)
    acc_star = 100.0 * float((model.head(z_star).argmax(-1) == yte).double().mean())
    n_deq = count_parameters(model)

    def counts(z0):
        c = budget_curve(f_test, z0, Anderson(m=6), max_nfe, readout=model.head, labels=yte)
        out = {}
        for t in FLOOR_TARGETS:
            n = matched_nfe(c["rel_residual"], t, 0.0, higher_is_better=False)
            out[f"{t:g}"] = {"nfe": n, "accuracy": c["accuracy"][n - 1] if n else None}
        return out

    starts = {"zero": {"rel_error": 1.0, "share": 0.0, "anderson": counts(torch.zeros_like(z_star))}}
    for h in ranks:
        z_init = linear_start(Xtr, z_train, h)(Xte)
        err = float(((z_init - z_star).norm(dim=1) / z_star.norm(dim=1)).median())
        starts[f"linear rank {h}"] = {"rel_error": err, "share": (64 * h + h * width + width) / n_deq,
                                      "anderson": counts(z_init)}
    return dict(width=width, seed=seed, gain=1.1, epochs=epochs, converged_accuracy=acc_star,
                deq_parameters=n_deq, deq_train_seconds=fit.seconds, z_star_worst_rel_residual=worst,
                starts=starts)


def neural_on_lowrank(seed, width=256, rank=6, h=4, lr=1e-3, epochs=3, steps=150, K=10, m=6, max_nfe=60):
    """The library's neural solver on a low-rank, nearly linear DEQ (see the module docstring)."""
    Xtr, ytr, Xte, yte = load_digits_tensors(seed=seed)
    model = build(width, 0.99, rank, 0.05, seed)
    model.cell.W.weight.requires_grad_(False)
    fit = train_classifier(model, Xtr, ytr, epochs=epochs, lr=lr, seed=seed)
    f, f_test = frozen_map(model), frozen_map(model, Xte)
    t0 = time.perf_counter()
    z_train, _ = fixed_points(f, Xtr, state_shape=(width,), max_iter=100)
    t_fixed = time.perf_counter() - t0
    z_star, worst = fixed_points(f, Xte, state_shape=(width,), max_iter=300)
    neural = HyperSolver.build(state_dim=width, input_dim=64, m=m, init_hidden=h, compress_dim=0, gram=True,
                               seed=seed)
    log = train_hypersolver(neural, f, Xtr, z_train, K=K, steps=steps, batch_size=32, lr=3e-3, conv_loss="log",
                            init_lr=1e-2, init_batch_size=256, seed=seed)
    with torch.no_grad():
        z_init = neural.initial_state(Xte)
    anderson, zero = Anderson(m=m), torch.zeros_like(z_star)
    runs = {"anderson": (anderson, zero), "neural": (neural, z_init), "anderson_from_learned_start": (anderson, z_init)}
    curves = {k: budget_curve(f_test, z0, s, max_nfe, readout=model.head, labels=yte) for k, (s, z0) in runs.items()}
    nfe = {k: matched_nfe(c["rel_residual"], 1e-3, 0.0, higher_is_better=False) for k, c in curves.items()}
    acc = {k: curves[k]["accuracy"][n - 1] for k, n in nfe.items()}

    def timed(solver, start, k):
        def run():
            with torch.no_grad():
                solve(f_test, start() if callable(start) else start, solver=solver, tol=1e-30, max_iter=k,
                      on_failure="ignore")
        return run

    times = median_times({"anderson": timed(anderson, zero, nfe["anderson"]),
                          "neural": timed(neural, lambda: neural.initial_state(Xte), nfe["neural"])}, repeats=7)
    n_deq = count_parameters(model)
    return dict(seed=seed, width=width, rank=rank, init_hidden=h, lr=lr, K=K, m=m, solver_train_steps=log.steps,
                converged_accuracy=100.0 * float((model.head(z_star).argmax(-1) == yte).double().mean()),
                start_rel_error=float(((z_init - z_star).norm(dim=1) / z_star.norm(dim=1)).median()),
                nfe=nfe, accuracy_at_nfe=acc, times=times,
                speedup={"nfe": nfe["anderson"] / nfe["neural"],
                         "wall": times["anderson"]["wall"] / times["neural"]["wall"],
                         "cpu": times["anderson"]["cpu"] / times["neural"]["cpu"]},
                deq_parameters=n_deq, solver_parameters=neural.num_parameters(),
                solver_share=neural.num_parameters() / n_deq, deq_train_seconds=fit.seconds,
                solver_train_seconds=log.seconds, fixed_points_seconds=t_fixed,
                training_cost_ratio=(log.seconds + t_fixed) / fit.seconds, z_star_worst_rel_residual=worst)


def main(width=256, epochs=3, seeds=(0, 1, 2), max_nfe=80, only=None):
    torch.set_num_threads(1)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    neural = old.get("neural", [])
    if only in (None, "neural"):
        neural = []
        for seed in seeds:
            neural.append(neural_on_lowrank(seed))
            print(json.dumps(neural[-1]), flush=True)
    floor = old.get("start_floor", [])
    if only in (None, "floor"):
        floor = []
        for w in (256, 512):
            for seed in seeds:
                floor.append(start_floor(w, seed))
                print(json.dumps(floor[-1])[:300], flush=True)
    rows = old.get("rows", []) if only not in (None, "lowrank") else []
    for name, rho, rank, h, scale, lr, freeze in (CONFIGS if only in (None, "lowrank") else []):
        for seed in seeds:
            Xtr, ytr, Xte, yte = load_digits_tensors(seed=seed)
            model = build(width, rho, rank, scale, seed)
            if freeze:
                model.cell.W.weight.requires_grad_(False)
            fit = train_classifier(model, Xtr, ytr, epochs=epochs, lr=lr, seed=seed)
            f, f_test = frozen_map(model), frozen_map(model, Xte)
            t0 = time.perf_counter()
            z_train, _ = fixed_points(f, Xtr, state_shape=(width,), max_iter=100)
            t_fixed = time.perf_counter() - t0
            z_star, worst = fixed_points(f, Xte, state_shape=(width,), max_iter=300)
            t0 = time.perf_counter()
            start = linear_start(Xtr, z_train, h)
            t_fit = time.perf_counter() - t0
            z_init = start(Xte)
            acc_star = 100.0 * float((model.head(z_star).argmax(-1) == yte).double().mean())
            err = float(((z_init - z_star).norm(dim=1) / z_star.norm(dim=1)).median())
            curves = {k: budget_curve(f_test, z0, s, max_nfe, readout=model.head, labels=yte)
                      for k, (s, z0) in {"picard": ("picard", torch.zeros_like(z_star)),
                                         "anderson": (Anderson(m=6), torch.zeros_like(z_star)),
                                         "anderson_from_start": (Anderson(m=6), z_init)}.items()}
            nfe = {k: matched_nfe(c["rel_residual"], 1e-3, 0.0, higher_is_better=False) for k, c in curves.items()}
            acc = {k: (curves[k]["accuracy"][n - 1] if n else None) for k, n in nfe.items()}
            start_params = 64 * h + h * width + width  # a rank-h linear map x -> h -> D
            row = dict(config=name, seed=seed, width=width, rho=rho, rank=rank, start_rank=h, lr=lr,
                       frozen_W=freeze, converged_accuracy=acc_star, start_rel_error=err, nfe=nfe,
                       accuracy_at_nfe=acc, z_star_worst_rel_residual=worst,
                       ratio=(nfe["anderson"] / nfe["anderson_from_start"]) if all(nfe.values()) else None,
                       start_share=start_params / count_parameters(model), deq_train_seconds=fit.seconds,
                       fixed_points_seconds=t_fixed, start_fit_seconds=t_fit)
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                                   "threads": 1, "target": 1e-3, "anderson_memory": 6, "rows": rows,
                                   "start_floor": floor, "neural": neural}, indent=1) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("lowrank", "floor", "neural"), default=None)
    main(only=ap.parse_args().only)
