"""Convergence diagnostics on trajectories of a fixed-point iteration.

The functions take a trajectory ``traj`` of shape ``(T, B, D)``: ``T`` iterates ``z_0 ..
z_{T-1}`` of ``B`` samples with ``D`` state dimensions (e.g. ``torch.stack(trace.iterates)``
flattened, or :meth:`deqlite.models.rnn.SineRNN.forward` with ``return_trajectory=True``), and
return numpy arrays ready to plot. They quantify *heterogeneous convergence* (DeltaDEQ, seed
000, Fig. 1): the dimensions of the state settle at different iterations, which is what the
delta rule exploits.

Example:
    >>> import torch
    >>> rates = torch.tensor([0.1, 0.5, 0.9])            # three dimensions, three speeds
    >>> traj = rates ** torch.arange(20.0)[:, None, None]  # (20, 1, 3): z_t = rate^t
    >>> convergence_iteration(traj, tol=0.01)[0].tolist()
    [3, 7, 20]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from ._checks import check_int, check_number

__all__ = [
    "PCAResult",
    "convergence_histogram",
    "convergence_iteration",
    "delta_profile",
    "step_deltas",
    "trajectory_pca",
]

ArrayLike = Tensor | np.ndarray


def _as_traj(traj: ArrayLike) -> np.ndarray:
    arr = traj.detach().cpu().numpy() if isinstance(traj, Tensor) else np.asarray(traj)
    if arr.ndim == 2:
        raise ValueError(f"traj must have shape (T, B, D), got {arr.shape}; for a single sample "
                         f"use traj[:, None, :]")
    if arr.ndim != 3 or arr.shape[0] < 2:
        raise ValueError(f"traj must have shape (T, B, D) with T >= 2 iterates, got {arr.shape}")
    return arr.astype(np.float64)


def step_deltas(traj: ArrayLike) -> np.ndarray:
    """``|z_{t+1} - z_t|`` per step, sample and dimension: ``(T - 1, B, D)``."""
    arr = _as_traj(traj)
    return np.abs(np.diff(arr, axis=0))


def delta_profile(traj: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over the batch of ``|z_{t+1} - z_t|``: two ``(T - 1, D)``
    arrays (Fig. 1e of the DeltaDEQ paper: one curve per dimension, shaded by the spread over inputs)."""
    d = step_deltas(traj)
    return d.mean(axis=1), d.std(axis=1)


def convergence_iteration(traj: ArrayLike, tol: float = 0.01, mode: str = "first") -> np.ndarray:
    """The step at which each dimension of each sample converges: ``(B, D)`` int.

    Step ``t`` (1-based) is the change ``|z_t - z_{t-1}|``. ``mode="first"``: the first step
    whose change is below ``tol`` (the paper's Fig. 1f). ``mode="stays"``: the first step
    after which every change stays below ``tol``. Dimensions that never converge within the
    trajectory get ``T`` (one past the last step); count them with
    :func:`convergence_histogram`.
    """
    check_number("tol", tol, lo=0.0, low_open=True)
    if mode not in ("first", "stays"):
        raise ValueError(f"mode must be 'first' or 'stays', got {mode!r}")
    d = step_deltas(traj)  # (S, B, D), S = T - 1
    S = d.shape[0]
    below = d < tol
    if mode == "first":
        hit = below.any(axis=0)
        first = below.argmax(axis=0) + 1
        return np.where(hit, first, S + 1).astype(np.int64)
    # stays: one past the last step that was not below tol
    above = ~below
    any_above = above.any(axis=0)
    last_above = S - 1 - above[::-1].argmax(axis=0)  # 0-based index of the last large change
    stays = np.where(any_above, last_above + 2, 1)
    return np.where(stays <= S, stays, S + 1).astype(np.int64)


def convergence_histogram(conv_iter: ArrayLike, n_steps: int) -> tuple[np.ndarray, int]:
    """How many (sample, dimension) pairs converge at each step.

    Args:
        conv_iter: output of :func:`convergence_iteration`, any shape.
        n_steps: the number of steps ``S = T - 1`` of the trajectory.

    Returns:
        ``(counts, never)``: ``counts[t - 1]`` = pairs converging at step ``t`` (``(S,)``),
        and the number that never converged.
    """
    c = np.asarray(conv_iter).reshape(-1)
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if c.size and (c.min() < 1 or c.max() > n_steps + 1):
        raise ValueError(f"conv_iter values must lie in [1, {n_steps + 1}] for n_steps={n_steps}; "
                         f"got range [{c.min()}, {c.max()}]: pass the trajectory's T - 1")
    counts = np.bincount(c, minlength=n_steps + 2)
    return counts[1:n_steps + 1], int(counts[n_steps + 1])


@dataclass
class PCAResult:
    """PCA of all hidden states of a trajectory.

    Attributes:
        projected: ``(T, B, k)`` the trajectories in the first ``k`` principal components.
        components: ``(k, D)`` principal directions.
        explained_variance_ratio: ``(min(T*B, D),)`` for every component.
        cumulative: its cumulative sum (Fig. 1c of the DeltaDEQ paper).
        mean: ``(D,)`` the centre.
    """

    projected: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    cumulative: np.ndarray
    mean: np.ndarray

    def n_components_for(self, fraction: float) -> int:
        """Smallest number of components explaining at least ``fraction`` of the variance."""
        return int(np.searchsorted(self.cumulative, fraction - 1e-12) + 1)


def trajectory_pca(traj: ArrayLike, n_components: int = 2) -> PCAResult:
    """PCA (by SVD of the centred states) of every state in ``traj`` ``(T, B, D)``.

    The states of all steps and samples are pooled, so the projected trajectories of
    different inputs share one coordinate system (Fig. 1b of the DeltaDEQ paper).
    """
    arr = _as_traj(traj)
    T, B, D = arr.shape
    check_int("n_components", n_components, hi=D)
    X = arr.reshape(T * B, D)
    mean = X.mean(axis=0)
    Xc = X - mean
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    var = s ** 2
    total = var.sum()
    ratio = var / total if total > 0 else np.zeros_like(var)
    comps = Vt[:n_components]
    proj = (Xc @ comps.T).reshape(T, B, n_components)
    return PCAResult(proj, comps, ratio, np.cumsum(ratio), mean)
