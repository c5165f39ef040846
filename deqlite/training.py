"""Small training loops and honest measurements for the book's comparisons.

- :func:`train_classifier`: mini-batch Adam on a classifier, seeded, with per-epoch loss
  and accuracy, and the wall time;
- :func:`accuracy`, :func:`count_params`;
- :func:`peak_memory`: the peak of tensor memory allocated while a function runs (CPU),
  from the PyTorch profiler's allocation events; :func:`training_step_memory` applies it to
  one forward + backward pass of a model.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int

__all__ = ["count_params", "accuracy", "TrainResult", "train_classifier", "peak_memory",
           "training_step_memory"]


def count_params(*modules: Optional[nn.Module], trainable_only: bool = True) -> int:
    """Number of scalars in the parameters of ``modules`` (``None`` counts as 0): the trainable
    ones (``requires_grad``), or all of them with ``trainable_only=False`` (a frozen model).

    Example:
        >>> count_params(nn.Linear(3, 2))
        8
        >>> count_params(nn.Linear(3, 2).requires_grad_(False), None, trainable_only=False)
        8
    """
    return sum(p.numel() for mod in modules if mod is not None for p in mod.parameters()
               if p.requires_grad or not trainable_only)


@torch.no_grad()
def accuracy(model: nn.Module, X: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``X`` ``(N, ...)`` whose arg-max logit equals ``y`` ``(N,)``; eval mode,
    restored afterwards."""
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, X.shape[0], batch_size):
            logits = model(X[i:i + batch_size])
            correct += int((logits.argmax(dim=1) == y[i:i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / X.shape[0]


@dataclass
class TrainResult:
    """What :func:`train_classifier` measured."""

    losses: List[float]  # mean training loss per epoch
    train_accuracy: float
    test_accuracy: Optional[float]
    seconds: float  # wall time of the training loop only
    steps: int
    history: List[Dict[str, float]] = field(default_factory=list)


def train_classifier(model: nn.Module, X: Tensor, y: Tensor, *, epochs: int = 10, lr: float = 1e-2,
                     batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0,
                     X_test: Optional[Tensor] = None, y_test: Optional[Tensor] = None,
                     extra_loss: Optional[Callable[[nn.Module], Tensor]] = None) -> TrainResult:
    """Train ``model`` with Adam and cross-entropy on ``(X, y)``; the batch order comes from
    ``seed``. ``extra_loss(model)`` (optional) is added to every step's loss.

    Returns a :class:`TrainResult`; accuracy is measured after training (and per epoch on
    the test set when given).

    Example:
        >>> X = torch.randn(64, 4); y = (X[:, 0] > 0).long()
        >>> res = train_classifier(nn.Linear(4, 2), X, y, epochs=20, lr=0.1)
        >>> res.train_accuracy > 0.9
        True
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_int(name, value)
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses: List[float] = []
    history: List[Dict[str, float]] = []
    steps = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(X.shape[0], generator=gen)
        total, count = 0.0, 0
        for i in range(0, X.shape[0], batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(X[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            opt.step()
            total += loss.detach().item() * idx.numel()
            count += idx.numel()
            steps += 1
        losses.append(total / count)
        row = {"epoch": epoch + 1, "loss": losses[-1]}
        if X_test is not None and y_test is not None:
            row["test_accuracy"] = accuracy(model, X_test, y_test)
        history.append(row)
    seconds = time.perf_counter() - t0
    test_acc = accuracy(model, X_test, y_test) if X_test is not None and y_test is not None else None
    return TrainResult(losses, accuracy(model, X, y), test_acc, seconds, steps, history)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a moment: the profiler's C++ side logs a line
    at every start and stop (``profiler_start`` / ``profiler_stop``), which would clutter
    notebook outputs. Python exceptions are unaffected (they are raised, not printed)."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (some embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            sys.stderr.flush()
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensor memory allocated by ``fn()`` above what was allocated before it.

    Measured with the PyTorch profiler (``profile_memory=True``, CPU): every allocation and
    free it records is replayed in time order and the running total's maximum is returned.
    Memory held before the call (parameters, inputs) is not counted; memory ``fn`` allocates
    and keeps counts until freed. Python objects and allocator caching are not included:
    this is the tensor memory a computation needs, the quantity that grows with depth in
    backpropagation. (Tracing with ``tracemalloc`` would miss it: PyTorch allocates tensors
    outside Python's allocator.)

    Example:
        >>> peak_memory(lambda: torch.ones(1000, dtype=torch.float64).sum()) >= 8000
        True
    """
    import inspect

    from torch.profiler import ProfilerActivity, profile

    # One profiling cycle: acc_events=True changes nothing in what is recorded, and keeps
    # torch 2.11 (Colab) from printing "Profiler clears events at the end of each cycle".
    one_cycle = {"acc_events": True} if "acc_events" in inspect.signature(profile.__init__).parameters else {}
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                            **one_cycle) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return int(peak)


def training_step_memory(model: nn.Module, X: Tensor, y: Tensor,
                         loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> int:
    """:func:`peak_memory` of one training step's forward and backward pass on ``(X, y)``
    (gradients are zeroed first and left in place; no optimiser step)."""
    model.train()
    model.zero_grad(set_to_none=False)
    for p in model.parameters():  # allocate .grad now so that it is not counted as the step's memory
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)

    def step() -> None:
        loss = loss_fn(model(X), y)
        loss.backward()

    return peak_memory(step)
