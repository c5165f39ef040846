"""The compact delta iteration of an INR DEQ: the delta rule carried through the whole map,
so that samples whose input stopped firing are skipped entirely, not only their products.

It is a second solve loop next to :func:`deqlite.solve` on purpose: it drops samples from
the working tensors as they freeze, which a solver that sees only ``f(z)`` cannot do (see
:func:`delta_picard_compact`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_choice, check_int, check_number
from ..models.inr import DEQINR
from ..regularize import weight_cache
from .config import MEMORY_RULES, check_threshold

__all__ = ["CompactRun", "delta_picard_compact"]


@dataclass
class CompactRun:
    """Result of :func:`delta_picard_compact`.

    Attributes:
        output: ``(B, out_dim)``; z_star: ``(B, D)``.
        iterations: evaluations of the layer (the first one dense).
        active_rows: per iteration, how many samples were still computed.
        active_fraction: per iteration, fired entries / all ``B * D`` entries (1 for the first).
        dense_macs: MACs of the dense layer for the same number of iterations.
        cost: MACs performed plus subtractions (only active samples are subtracted).
        converged: every sample's relative change fell to ``tol`` or froze.
    """

    output: Tensor
    z_star: Tensor
    iterations: int
    active_rows: list[int]
    active_fraction: list[float]
    dense_macs: int
    cost: int
    converged: bool
    state: tuple[Tensor, Tensor, Tensor] | None = None

    def warm_state(self, index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, a_prev, y_prev)`` to continue from, rows picked by ``index`` (optional)."""
        assert self.state is not None
        if index is None:
            return self.state
        return tuple(t.index_select(0, index) for t in self.state)  # type: ignore[return-value]


def delta_picard_compact(model: DEQINR, x: Tensor, threshold: float, *, max_iter: int = 100,
                         tol: float = 1e-3, memory: str = "reset",
                         warm: tuple[Tensor, Tensor, Tensor] | None = None,
                         gather_below: float = 0.5) -> CompactRun:
    """Picard iteration ``z <- f(z)`` of an INR with the delta rule, skipping frozen samples.

    Under plain (Picard) iteration a sample whose layer input fired nowhere gets the same
    layer output as before, hence the same next state: its change is exactly zero from then
    on, under either memory rule. So the delta rule carried through the whole map freezes that
    sample for good, and every later operation on it (the subtraction, the threshold test,
    the filter, the update) can be skipped, not only the matrix product. This function keeps
    the still-active samples in compact (contiguous) tensors, written back when they freeze;
    its result equals running ``model.f`` with a :class:`~deqlite.delta.DeltaLinear` at
    ``threshold`` and the same ``memory`` rule, step for step (tested).

    Execution, chosen per step so that the delta rule never costs much more than the dense
    layer: the thresholded change is one fused pass (``hardshrink``); the product gathers the
    input columns that fired in some active sample only when fewer than ``gather_below * D``
    did (otherwise it multiplies the masked change densely, in place: ``y += d_hat W^T``);
    ``threshold = 0`` fires every change, so it runs the dense product ``W a + b`` with no
    subtraction at all (equal to the delta form up to rounding, counted as dense MACs).

    Stops when no sample is active, when every active sample's relative change
    ``||z_{k+1} - z_k|| / ||z_{k+1}||`` is ``<= tol``, or after ``max_iter`` evaluations.

    ``warm=(z0, a_prev, y_prev)`` (e.g. ``run.warm_state()`` of the previous frame, rows
    reordered to follow the pixels) starts from ``z0`` with the layer cache ``(a_prev,
    y_prev)`` instead of a dense first call; the first step then updates every sample (their
    filters may have changed), later steps only the active ones.

    Runs on the device and dtype of ``x`` (and the model).
    """
    threshold = check_threshold("threshold", threshold)
    check_choice("memory", memory, MEMORY_RULES)
    check_int("max_iter", max_iter)
    check_number("gather_below", gather_below, 0.0, 1.0)
    model.eval()
    act = model.activate

    with torch.no_grad(), weight_cache():
        W, bias = model.layer.weight, model.layer.bias
        D = model.width
        u, h = model.injection(x)
        B = x.shape[0]
        n_out = W.shape[0]
        dense_per = B * D * n_out + (B * n_out if bias is not None else 0)
        if warm is None:
            a_prev = u.clone()  # layer input at z_0 = 0
            y = F.linear(a_prev, W, bias)  # first call: dense, (B, D)
            z = act(y, h)  # z_1
            cost = dense_per
            rows_hist, frac_hist = [B], [1.0]
            force_all = False
        else:
            z0, a0, y0 = warm
            if z0.shape != (B, D) or a0.shape != (B, D) or y0.shape != (B, n_out):
                raise ValueError(f"warm must hold (z0, a_prev, y_prev) of shapes ({B}, {D}), "
                                 f"({B}, {D}), ({B}, {n_out}); got {tuple(z0.shape)}, "
                                 f"{tuple(a0.shape)}, {tuple(y0.shape)}")
            z, a_prev, y = z0.clone(), a0.clone(), y0.clone()
            cost = 0
            rows_hist, frac_hist = [], []
            force_all = True  # z0 need not equal f's output under the new filters
        converged = False
        tiny = torch.finfo(z.dtype).tiny
        if threshold == 0.0:
            # Every non-zero change fires: the delta form is W a + b up to rounding, so run the
            # dense product and skip the subtraction and the threshold test altogether.
            for _ in range(len(rows_hist), max_iter):
                a_prev = z + u
                y = F.linear(a_prev, W, bias)
                z_new = act(y, h)
                rel = torch.linalg.vector_norm(z_new - z, dim=1) / \
                    torch.linalg.vector_norm(z_new, dim=1).clamp_min(tiny)
                z = z_new
                cost += dense_per
                rows_hist.append(B)
                frac_hist.append(1.0)
                if bool((rel <= tol).all()):
                    converged = True
                    break
            out = model.readout(z)
            return CompactRun(out, z, len(rows_hist), rows_hist, frac_hist,
                              dense_per * len(rows_hist), cost, converged, (z, a_prev, y))
        # Working tensors hold the active samples only (global row ids in `ids`); a sample's
        # final values go to the full tensors when it freezes.
        ids = torch.arange(B, device=z.device)
        zc, uc, hc, ac, yc = z, u, h, a_prev, y
        z_out = a_out = y_out = None
        for _ in range(len(rows_hist), max_iter):
            A = ids.numel()
            a = zc + uc  # (A, D) layer input
            if memory == "reset":
                d_hat = F.hardshrink(torch.sub(a, ac, out=ac), threshold)  # ac is not needed again
                ac = a
                nz = d_hat != 0
            else:
                d_hat = F.hardshrink(a - ac, threshold)
                nz = d_hat != 0
                ac = torch.where(nz, a, ac)
            per_row = nz.sum(dim=1)
            nnz = int(per_row.sum())
            cost += A * D + nnz * n_out  # the subtraction (active samples) and the product
            frac_hist.append(nnz / (B * D))
            if not force_all and nnz < A * D:
                keep = per_row > 0
                n_keep = int(keep.sum())
                if n_keep < A:
                    if z_out is None:
                        z_out, a_out, y_out = torch.empty_like(z), torch.empty_like(z), \
                            torch.empty(B, n_out, dtype=y.dtype, device=y.device)
                    gone = (~keep).nonzero().squeeze(1)
                    gid = ids.index_select(0, gone)
                    z_out.index_copy_(0, gid, zc.index_select(0, gone))
                    a_out.index_copy_(0, gid, ac.index_select(0, gone))
                    y_out.index_copy_(0, gid, yc.index_select(0, gone))
                    kept = keep.nonzero().squeeze(1)
                    ids, zc, uc, hc, ac, yc, d_hat, nz = (
                        t.index_select(0, kept) for t in (ids, zc, uc, hc, ac, yc, d_hat, nz))
            force_all = False
            rows_hist.append(int(ids.numel()))
            if ids.numel() == 0:
                converged = True
                break
            if nnz:
                cols_fired = nz.any(dim=0)
                n_cols = int(cols_fired.sum())
                if n_cols < gather_below * D:
                    cols = cols_fired.nonzero().squeeze(1)
                    yc = yc.addmm_(d_hat.index_select(1, cols), W.index_select(1, cols).T)
                else:
                    yc = yc.addmm_(d_hat, W.T)
            z_new = act(yc, hc)
            rel = torch.linalg.vector_norm(z_new - zc, dim=1) / \
                torch.linalg.vector_norm(z_new, dim=1).clamp_min(tiny)
            zc = z_new
            if bool((rel <= tol).all()):
                converged = True
                break
        if z_out is None:  # nothing froze: the working tensors are the full ones
            z_out, a_out, y_out = zc, ac, yc
        elif ids.numel():
            z_out.index_copy_(0, ids, zc)
            a_out.index_copy_(0, ids, ac)
            y_out.index_copy_(0, ids, yc)
        iterations = len(rows_hist)
        out = model.readout(z_out)
    return CompactRun(out, z_out, iterations, rows_hist, frac_hist, dense_per * iterations, cost,
                      converged, (z_out, a_out, y_out))


def _dense_picard(model: DEQINR, x: Tensor, *, max_iter: int, tol: float | None,
                  ) -> tuple[Tensor, int]:
    """The dense DEQ's plain iteration from zero, ``tol=None``: exactly ``max_iter`` steps;
    else it stops when every sample's relative change is ``<= tol`` (the compact rule).
    Returns the read-out and the number of evaluations."""
    with torch.no_grad(), weight_cache():
        u, h = model.injection(x)
        W, b = model.layer.weight, model.layer.bias
        z = torch.zeros(x.shape[0], model.width, dtype=u.dtype, device=u.device)
        k = 0
        while k < max_iter:
            k += 1
            z_new = model.activate(F.linear(z + u, W, b), h)
            if tol is not None:
                rel = torch.linalg.vector_norm(z_new - z, dim=1) / \
                    torch.linalg.vector_norm(z_new, dim=1).clamp_min(torch.finfo(z.dtype).tiny)
                z = z_new
                if bool((rel <= tol).all()):
                    break
            else:
                z = z_new
        return model.readout(z), k


