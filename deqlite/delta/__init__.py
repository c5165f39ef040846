"""DeltaDEQ: linear and convolution layers that recompute only what changed.

A DEQ applies the same layers again and again while its state settles. Wang et
al. (*DeltaDEQ*, NeurIPS 2024) observe that the state's dimensions settle at different
speeds, and rewrite each linear operation ``y = W a + b`` in terms of the change of its
input since the previous call::

    d      = a - a_prev                       # (B, in) change of the input
    d_hat  = where(|d| > threshold, d, 0)     # drop the changes that are too small
    y      = y_prev + W d_hat                 # the bias was added once, on the first call

Only the non-zero entries of ``d_hat`` cost multiply-accumulates (MACs): a zero entry skips a
whole column of ``W`` (a whole input channel of a convolution kernel). With ``threshold = 0``
the result equals the dense layer (up to floating-point rounding).

Two rules decide what ``a_prev`` becomes after a call:

* ``"reset"`` (the public DeltaDEQ release): ``a_prev <- a``. A change below the threshold is
  dropped for good, so errors can build up at large thresholds.
* ``"accumulate"`` (the delta RNN of Neil et al., 2017): ``a_prev_i <- a_i`` only where the
  threshold fired, so small changes add up until they fire. ``y`` then always equals
  ``W a_prev + b`` exactly.

Every call is recorded (when ``track=True``): the MACs a dense layer would do, the MACs the
delta rule performs, and the cost of the subtraction; :func:`mac_summary` adds them up per
iteration for a whole model. ``sparse=True`` switches to an execution path that gathers the
samples and input columns (channels) that fired and multiplies only those, so the skipped
work is really skipped on a CPU, not only counted.

Calls made with autograd recording (a parameter or the input requires grad) run the dense
layer and refresh the cache: the cached output carries no graph, so the delta form could not
give the gradient of ``W a + b``. In DEQ training this is the one gradient-carrying step after
a ``no_grad`` solve; the solve itself uses ``train_threshold``.

Example:
    >>> import torch
    >>> lin = DeltaLinear(3, 2, threshold=0.1)
    >>> with torch.no_grad():                      # a call recording autograd runs dense
    ...     y0 = lin(torch.zeros(1, 3))                 # first call: dense, fills the cache
    ...     y1 = lin(torch.tensor([[0.05, 1.0, 0.0]]))  # only the second input column fires
    >>> lin.records[-1].active, lin.records[-1].performed_macs
    (1, 2)

Modules: :mod:`~deqlite.delta.config` (:class:`DeltaConfig`, the settings as one value),
:mod:`~deqlite.delta.layers` (the layers), :mod:`~deqlite.delta.modes` (:func:`delta_mode`,
:func:`configure`, :func:`to_delta`, :func:`mac_summary`), :mod:`~deqlite.delta.inference`
(the compact delta iteration of an INR DEQ) and :mod:`~deqlite.delta.evaluate` (MACs, PSNR
and wall-clock of INR inference, sequences). The last two load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from .config import MEMORY_RULES, DeltaConfig
from .layers import CallRecord, DeltaConv2d, DeltaLayer, DeltaLinear
from .modes import (
    MacSummary,
    configure,
    delta_layers,
    delta_mode,
    mac_summary,
    reset_all,
    to_delta,
)

# INR inference and evaluation import deqlite.models, which imports this package: loaded on
# first access so that either can be imported first.
_LAZY = {"CompactRun": "inference", "delta_picard_compact": "inference",
         **{name: "evaluate" for name in (
             "DeltaEval", "IterationTiming", "SequenceRun", "evaluate_delta", "follow_pixels",
             "render_sequence", "time_compact", "time_inference", "time_iterations",
             "time_sequence")}}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'deqlite.delta' has no attribute {name!r}")


__all__ = [
    "MEMORY_RULES",
    "CallRecord",
    "DeltaConfig",
    "DeltaConv2d",
    "DeltaLayer",
    "DeltaLinear",
    "MacSummary",
    "configure",
    "delta_layers",
    "delta_mode",
    "mac_summary",
    "reset_all",
    "to_delta",
]  # and, loaded on first access, the names of _LAZY
