"""DEQ under torch.nn.parallel.DistributedDataParallel: two CPU processes (gloo) against
one process on the same global batch.

Each rank solves its half of the batch, so the ranks' forward and adjoint solves may take
different numbers of steps (per-rank stopping). DEQ gradients depend on the fixed point, not
on the path to it, so gradients and parameters after a few optimiser steps must agree with the
single-process run up to the solver tolerance: float64, forward and adjoint tolerance 1e-11,
compared at 1e-7 relative (the unrolled strategy differentiates the path itself, so it gets
a fixed number of steps instead of a tolerance).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from deqlite.models.mlp import DEQClassifier

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("implicit", "jacobian_free", "phantom", "unrolled")
B, IN, WIDTH, N_CLASSES, STEPS = 16, 12, 10, 3, 3
TOL = 1e-11


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(strategy: str) -> DEQClassifier:
    torch.manual_seed(0)
    opts = dict(backward=strategy, tol=TOL, max_iter=200, backward_tol=TOL, backward_max_iter=200)
    if strategy == "unrolled":  # the gradient follows the path: give every rank the same path
        opts.update(solver="picard", tol=1e-300, max_iter=25, on_failure="ignore")
    return DEQClassifier(IN, WIDTH, N_CLASSES, radius=0.8, **opts).double()


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, IN, generator=g, dtype=torch.float64),
            torch.randint(0, N_CLASSES, (B,), generator=g))


def train(model, X, y):
    """Gradients of the first step, then the parameters after STEPS SGD steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = None
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        if step == 0:
            grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        X, y = data()
        shard = slice(rank * B // world, (rank + 1) * B // world)
        result = {}
        for strategy in STRATEGIES:
            ddp = torch.nn.parallel.DistributedDataParallel(make_model(strategy))
            grads, params = train(ddp, X[shard], y[shard])
            result[strategy] = {"grads": grads, "params": params,
                                "nfe": ddp.module.last_trace.nfe}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    t0 = time.perf_counter()
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    seconds = time.perf_counter() - t0
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], seconds


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ddp_matches_single_process(ddp_results, strategy):
    ranks, seconds = ddp_results
    torch.set_num_threads(1)
    X, y = data()
    grads, params = train(make_model(strategy), X, y)
    for r, res in enumerate(ranks):
        got = res[strategy]
        for name, want, have in (("gradient", grads, got["grads"]), ("parameter", params, got["params"])):
            for i, (a, b) in enumerate(zip(want, have)):
                err = (a - b).abs().max() / a.abs().max().clamp_min(1e-30)
                assert err < 1e-7, (f"{strategy}: rank {r} {name} {i} differs from the single-process "
                                    f"run by {err:.2e} (relative)")
    assert all(g.abs().max() > 0 for g in grads), f"{strategy}: a zero gradient compares nothing"
    assert seconds < 120, f"the two-process run took {seconds:.0f} s"


def test_train_ddp_example_under_torchrun(tmp_path):
    """examples/train_ddp.py under torchrun with two CPU processes (gloo), a few steps."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "train_ddp.py"), "--epochs", "1", "--max-steps", "4",
           "--out", str(tmp_path / "result.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["world_size"] == 2 and res["backend"] == "gloo", res
    assert res["steps"] == 4, res
    assert all(map(lambda v: v == v and v < 10, res["losses"])), res
    assert 0.0 <= res["test_accuracy"] <= 1.0, res
