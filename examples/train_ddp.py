"""Train a DEQ classifier on the bundled digits with DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py          # CPU: gloo
    torchrun --standalone --nproc_per_node=8 examples/train_ddp.py --amp    # 8 GPUs: NCCL
    python examples/train_ddp.py                                            # one process

Each process holds a replica of the model and trains on its own slice of every batch
(``DistributedSampler``); DDP averages the gradients across processes during
``backward()``. The DEQ needs nothing special: each process solves for the fixed points of
its own samples (the ranks may take different numbers of solver steps), and the implicit
backward's adjoint solve runs inside autograd before DDP's gradient hooks fire.
On GPUs (one per process, NCCL) ``--amp`` runs ``f`` under ``torch.autocast`` in bfloat16
while the solver keeps its state in float32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deqlite.data import load_digits_tensors  # noqa: E402
from deqlite.models.mlp import DEQClassifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--backward", default="implicit",
                    choices=["implicit", "jacobian_free", "phantom", "unrolled"])
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--amp", action="store_true", help="torch.autocast(bfloat16) around the model")
    ap.add_argument("--out", default=None, help="write a JSON summary here (rank 0)")
    args = ap.parse_args()

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        backend, rank, world, local_rank = "none", 0, 1, 0
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)

    Xtr, ytr, Xte, yte = load_digits_tensors()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = DEQClassifier(64, args.width, 10, backward=args.backward, tol=1e-4, max_iter=30,
                          on_failure="ignore").to(device)
    net = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if distributed else model
    train_set = TensorDataset(Xtr, ytr)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0) \
        if distributed else None
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                        shuffle=sampler is None, drop_last=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    losses, steps, t0 = [], 0, time.perf_counter()
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            losses.append(loss.item())
            if args.max_steps is not None and steps >= args.max_steps:
                break
        if args.max_steps is not None and steps >= args.max_steps:
            break
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {sum(losses[-len(loader):]) / len(loader):.3f}", flush=True)
    seconds = time.perf_counter() - t0

    if rank == 0:  # the replicas are identical after every step: evaluate one
        model.eval()
        with torch.no_grad():
            acc = (model(Xte.to(device)).argmax(1).cpu() == yte).float().mean().item()
        print(f"{world} process(es), backend {backend}, device {device.type}: {steps} steps in "
              f"{seconds:.1f} s, test accuracy {acc:.3f}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({
                "world_size": world, "backend": backend, "device": device.type, "steps": steps,
                "losses": losses, "test_accuracy": acc, "seconds": seconds}))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
