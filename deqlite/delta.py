"""DeltaDEQ: linear and convolution layers that recompute only what changed.

A DEQ applies the same layers again and again while its state settles. Seed 000 (Wang et
al., *DeltaDEQ*, NeurIPS 2024) observes that the state's dimensions settle at different
speeds, and rewrites each linear operation ``y = W a + b`` in terms of the change of its
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
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MEMORY_RULES",
    "CallRecord",
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
]

MEMORY_RULES = ("reset", "accumulate")


def _check_threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 reproduces the dense layer), "
                         f"got {value!r}")
    return float(value)


def _check_memory(value: Any) -> str:
    if value not in MEMORY_RULES:
        raise ValueError(f"memory must be one of {MEMORY_RULES} ('reset': the cache takes the "
                         f"full new input, as in the DeltaDEQ release; 'accumulate': only the "
                         f"entries that fired, as in the delta RNN), got {value!r}")
    return value


@dataclass
class CallRecord:
    """What one call of a delta layer cost.

    Attributes:
        dense_macs: MACs of the dense layer for this input (weights incl. kernel area, plus
            one per output element for the bias).
        performed_macs: MACs the call performed: dense on a first/dense call, else one per
            (fired input entry, weight it meets).
        sub_ops: the subtraction ``a - a_prev`` (one per input element; 0 on a dense call).
        active: number of input entries that fired (``numel`` on a dense call).
        numel: number of input entries.
        dense_call: True when the call ran the dense layer (first call, disabled, autograd).
        fired_per_dim: optional (in_features,) or (C_in,) fraction of the batch (and pixels)
            whose entry fired, recorded when ``record_fired=True``.
        patch_macs: convolutions only (None otherwise): MACs at the output positions whose
            input patch has at least one fired entry (see :attr:`patch`).
    """

    dense_macs: int
    performed_macs: int
    sub_ops: int
    active: int
    numel: int
    dense_call: bool
    fired_per_dim: Tensor | None = None
    patch_macs: int | None = None

    @property
    def patch(self) -> int:
        """MACs when a convolution skips an output position only if its whole input patch
        (all input channels under the kernel window) did not fire, as dense hardware can
        (DeltaDEQ, Fig. 2b); ``performed_macs`` for linear layers and dense calls."""
        return self.performed_macs if self.patch_macs is None else self.patch_macs

    @property
    def cost(self) -> int:
        """What the delta rule really spends, the performed MACs plus the subtractions."""
        return self.performed_macs + self.sub_ops


class DeltaLayer:
    """State and settings shared by :class:`DeltaLinear` and :class:`DeltaConv2d`.

    Mixed into an ``nn.Module`` subclass of the dense layer, so a delta layer has the same
    parameters (and ``state_dict``) as the dense one.
    """

    def _init_delta(self, threshold: float, train_threshold: float | None, memory: str,
                    sparse: bool, enabled: bool, track: bool, record_fired: bool) -> None:
        self.threshold = _check_threshold("threshold", threshold)
        self.train_threshold = _check_threshold(
            "train_threshold", self.threshold if train_threshold is None else train_threshold)
        self.memory = _check_memory(memory)
        self.sparse = bool(sparse)
        self.enabled = bool(enabled)
        self.track = bool(track)
        self.record_fired = bool(record_fired)
        self.records: list[CallRecord] = []
        self._a_prev: Tensor | None = None
        self._y_prev: Tensor | None = None
        self._bufs: tuple | None = None

    # -- public controls ------------------------------------------------------------------
    @property
    def active_threshold(self) -> float:
        """``train_threshold`` in training mode, ``threshold`` in eval mode."""
        return self.train_threshold if self.training else self.threshold  # type: ignore[attr-defined]

    def reset(self) -> None:
        """Forget the cached input and output: the next call runs dense. Call between inputs."""
        self._a_prev = None
        self._y_prev = None

    def reindex_cache(self, index: Tensor) -> None:
        """Reorder the cached samples: row ``i`` of the next input continues from cached row
        ``index[i]`` (e.g. a window that moved, so a pixel sits at a new batch position).
        ``index`` is a ``(B_new,)`` long tensor; no-op when the cache is empty."""
        if self._a_prev is None or self._y_prev is None:
            return
        if index.dim() != 1 or index.dtype != torch.long:
            raise ValueError(f"index must be a 1-D long tensor of batch positions, got "
                             f"shape {tuple(index.shape)} and dtype {index.dtype}")
        self._a_prev = self._a_prev.index_select(0, index)
        self._y_prev = self._y_prev.index_select(0, index)

    def clear_records(self) -> None:
        """Drop the per-call MAC records."""
        self.records = []

    # -- the shared delta step --------------------------------------------------------------
    def _dense(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply_delta(self, d_hat: Tensor) -> Tensor:
        """W d_hat without bias (the dense masked path)."""
        raise NotImplementedError

    def _sparse_update(self, d: Tensor, fired: Tensor, y_prev: Tensor) -> Tensor:
        raise NotImplementedError

    def _dense_macs(self, a: Tensor, y: Tensor) -> int:
        raise NotImplementedError

    def _performed_macs(self, fired: Tensor) -> int:
        raise NotImplementedError

    def _check_input(self, a: Tensor) -> None:
        raise NotImplementedError

    def _patch_macs(self, fired: Tensor) -> int | None:
        return None

    def _record(self, a: Tensor, y: Tensor, fired: Tensor | None) -> None:
        if not self.track:
            return
        dense = self._dense_macs(a, y)
        per_dim = None
        if fired is None:
            if self.record_fired:
                per_dim = torch.ones(a.shape[1])
            self.records.append(CallRecord(dense, dense, 0, a.numel(), a.numel(), True, per_dim))
            return
        if self.record_fired:
            dims = [0] + list(range(2, fired.dim()))
            per_dim = fired.float().mean(dim=dims).cpu()
        self.records.append(CallRecord(dense, self._performed_macs(fired), a.numel(),
                                       int(fired.sum()), a.numel(), False, per_dim,
                                       self._patch_macs(fired)))

    def forward(self, a: Tensor) -> Tensor:
        return self._delta_forward(a)

    def _share_parameters(self, layer: nn.Module):
        """Use ``layer``'s weight and bias Parameters (no copy); built on the meta device."""
        self.weight = layer.weight
        self.bias = layer.bias
        self.train(layer.training)
        return self

    def _delta_forward(self, a: Tensor) -> Tensor:
        self._check_input(a)
        needs_graph = torch.is_grad_enabled() and (
            a.requires_grad or any(p.requires_grad for p in self.parameters()))  # type: ignore[attr-defined]
        fresh = (self._a_prev is None or self._a_prev.shape != a.shape
                 or self._a_prev.dtype != a.dtype or self._a_prev.device != a.device)
        if not self.enabled or needs_graph or fresh:
            y = self._dense(a)
            if self.enabled:
                # The cache holds values only: the delta form has no graph to differentiate.
                self._a_prev, self._y_prev = a.detach(), y.detach()
            self._record(a, y, None)
            return y
        a_prev, y_prev = self._a_prev, self._y_prev
        assert a_prev is not None and y_prev is not None
        if self.sparse:
            # Reuse work buffers: on a CPU, allocating fresh (B, D) tensors every iteration
            # costs as much as the arithmetic the delta rule saves.
            if self._bufs is None or self._bufs[0].shape != a.shape or self._bufs[0].dtype != a.dtype:
                self._bufs = (torch.empty_like(a), torch.empty_like(a),
                              torch.empty(a.shape, dtype=torch.bool, device=a.device))
            d = torch.sub(a, a_prev, out=self._bufs[0])
            fired = torch.gt(torch.abs(d, out=self._bufs[1]), self.active_threshold,
                             out=self._bufs[2])
        else:
            d = a - a_prev
            fired = d.abs() > self.active_threshold
        if self.sparse:
            y = self._sparse_update(d, fired, y_prev)
        else:
            # torch.where, not d * fired: a mask product would turn inf * 0 into NaN.
            y = y_prev + self._apply_delta(torch.where(fired, d, torch.zeros((), dtype=d.dtype)))
        if self.memory == "reset":
            # The input is kept by reference: callers must not modify it in place.
            self._a_prev = a.detach()
        else:
            self._a_prev = torch.where(fired, a, a_prev).detach()
        self._y_prev = y
        self._record(a, y, fired)
        return y

    def extra_delta_repr(self) -> str:
        return (f"threshold={self.threshold}, train_threshold={self.train_threshold}, "
                f"memory={self.memory!r}, sparse={self.sparse}, enabled={self.enabled}")


def _as_index(mask: Tensor) -> Tensor:
    return mask.nonzero().squeeze(1)


class DeltaLinear(DeltaLayer, nn.Linear):
    """``nn.Linear`` with the delta rule: ``y = y_prev + W d_hat``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        threshold: inference threshold (eval mode) on ``|a - a_prev|``; 0 = dense result.
        train_threshold: threshold used in training mode (default: ``threshold``).
        memory: ``"reset"`` or ``"accumulate"`` (see the module docstring).
        sparse: gather the fired rows and columns and multiply only those (same result).
        enabled: False makes the layer an ordinary ``nn.Linear`` (calls still recorded).
        track: record the MACs of every call in ``self.records``.
        record_fired: also record the per-input-dimension fraction that fired.

    Shapes: input ``(B, in_features)``, output ``(B, out_features)``.

    Example:
        >>> lin = DeltaLinear(4, 2)
        >>> lin(torch.ones(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 threshold: float = 0.0, train_threshold: float | None = None, memory: str = "reset",
                 sparse: bool = False, enabled: bool = True, track: bool = True,
                 record_fired: bool = False, device: Any = None, dtype: Any = None) -> None:
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DeltaLinear: {name} must be an integer >= 1, got {v!r}")
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_delta(threshold, train_threshold, memory, sparse, enabled, track, record_fired)

    @classmethod
    def from_dense(cls, layer: nn.Linear, **options: Any) -> DeltaLinear:
        """A delta layer sharing ``layer``'s weight and bias Parameters (no copy)."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(layer).__name__}")
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device="meta",
                  **options)
        return new._share_parameters(layer)

    def _check_input(self, a: Tensor) -> None:
        if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[1] != self.in_features:
            got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(f"DeltaLinear expects input of shape (B, {self.in_features}), got "
                             f"{got}; flatten leading dimensions first (a.reshape(-1, "
                             f"{self.in_features}))")

    def _dense(self, a: Tensor) -> Tensor:
        return F.linear(a, self.weight, self.bias)

    def _apply_delta(self, d_hat: Tensor) -> Tensor:
        return F.linear(d_hat, self.weight)

    def _sparse_update(self, d: Tensor, fired: Tensor, y_prev: Tensor) -> Tensor:
        rows = _as_index(fired.any(dim=1))  # samples with at least one fired entry
        if rows.numel() == 0:
            return y_prev
        sub = fired.index_select(0, rows)  # (R, in)
        cols = _as_index(sub.any(dim=0))  # input columns fired in any of those samples
        W = self.weight
        d_r = d.index_select(0, rows)
        if cols.numel() < self.in_features:
            sub, d_r, W = sub.index_select(1, cols), d_r.index_select(1, cols), W.index_select(1, cols)
        d_hat = torch.where(sub, d_r, torch.zeros((), dtype=d.dtype))  # (R, C)
        return y_prev.index_add(0, rows, d_hat @ W.T)  # only R x C x out MACs

    def _dense_macs(self, a: Tensor, y: Tensor) -> int:
        B = a.shape[0]
        return B * self.in_features * self.out_features + (y.numel() if self.bias is not None else 0)

    def _performed_macs(self, fired: Tensor) -> int:
        return int(fired.sum()) * self.out_features

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + ", " + self.extra_delta_repr()


class DeltaConv2d(DeltaLayer, nn.Conv2d):
    """``nn.Conv2d`` with the delta rule (zero padding only, so the layer stays linear in
    its input and ``conv(a) - conv(a_prev) = conv(a - a_prev)``).

    Dense MACs per call: ``numel(y) * C_in / groups * kh * kw`` plus ``numel(y)`` for the bias
    (the kernel area counted from the weight shape; the public release's counter dropped it).
    Performed MACs: each fired input entry meets ``C_out / groups`` output channels at every
    kernel tap that lands on an output position; counted exactly by convolving the fired mask
    with a ones kernel, so taps that fall into the zero padding or between strides are not
    counted.

    Args: as ``nn.Conv2d``, plus the delta options of :class:`DeltaLinear`.
    Shapes: input ``(B, C_in, H, W)``, output ``(B, C_out, H', W')``.

    Example:
        >>> conv = DeltaConv2d(2, 4, 3, padding=1)
        >>> conv(torch.ones(1, 2, 5, 5)).shape
        torch.Size([1, 4, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, threshold: float = 0.0,
                 train_threshold: float | None = None, memory: str = "reset", sparse: bool = False,
                 enabled: bool = True, track: bool = True, record_fired: bool = False,
                 device: Any = None, dtype: Any = None) -> None:
        ks = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size,)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"DeltaConv2d: kernel_size must be a positive int or a pair of them, "
                             f"got {kernel_size!r}")
        if padding_mode != "zeros":
            raise ValueError(f"DeltaConv2d supports padding_mode='zeros' only, got "
                             f"{padding_mode!r}; pad the input yourself (F.pad) before the layer")
        if sparse and groups != 1:
            raise ValueError(f"the sparse path of DeltaConv2d needs groups=1, got groups={groups}; "
                             f"use sparse=False for grouped convolutions")
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, bias, padding_mode, device=device, dtype=dtype)
        self._init_delta(threshold, train_threshold, memory, sparse, enabled, track, record_fired)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, **options: Any) -> DeltaConv2d:
        """A delta layer sharing ``layer``'s weight and bias Parameters (no copy)."""
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(layer).__name__}")
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                  layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                  layer.padding_mode, device="meta", **options)
        return new._share_parameters(layer)

    def _check_input(self, a: Tensor) -> None:
        if not isinstance(a, Tensor) or a.dim() != 4 or a.shape[1] != self.in_channels:
            got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(f"DeltaConv2d expects input of shape (B, {self.in_channels}, H, W), "
                             f"got {got}; add a batch dimension with a.unsqueeze(0) if needed")

    def _dense(self, a: Tensor) -> Tensor:
        return self._conv_forward(a, self.weight, self.bias)

    def _apply_delta(self, d_hat: Tensor) -> Tensor:
        return self._conv_forward(d_hat, self.weight, None)

    def _sparse_update(self, d: Tensor, fired: Tensor, y_prev: Tensor) -> Tensor:
        rows = _as_index(fired.flatten(1).any(dim=1))  # samples with any fired entry
        if rows.numel() == 0:
            return y_prev
        sub = fired.index_select(0, rows)  # (R, C, H, W)
        chans = _as_index(sub.transpose(0, 1).flatten(1).any(dim=1))  # input channels that fired
        W = self.weight
        d_r = d.index_select(0, rows)
        if chans.numel() < self.in_channels:
            sub, d_r, W = sub.index_select(1, chans), d_r.index_select(1, chans), W.index_select(1, chans)
        d_hat = torch.where(sub, d_r, torch.zeros((), dtype=d.dtype))
        out = F.conv2d(d_hat, W, None, self.stride, self.padding, self.dilation, 1)
        return y_prev.index_add(0, rows, out)

    def _dense_macs(self, a: Tensor, y: Tensor) -> int:
        kh, kw = self.weight.shape[2], self.weight.shape[3]
        per_out = (self.in_channels // self.groups) * kh * kw
        return y.numel() * per_out + (y.numel() if self.bias is not None else 0)

    def _performed_macs(self, fired: Tensor) -> int:
        # Count (output position, fired input entry, kernel tap) triples: convolve the number
        # of fired channels per pixel with a ones kernel of the layer's geometry.
        per_pixel = fired.sum(dim=1, keepdim=True, dtype=torch.float64)  # (B, 1, H, W)
        ones = torch.ones(1, 1, *self.weight.shape[2:], dtype=torch.float64, device=fired.device)
        hits = F.conv2d(per_pixel, ones, None, self.stride, self.padding, self.dilation)
        return round(float(hits.sum())) * (self.out_channels // self.groups)

    def _patch_macs(self, fired: Tensor) -> int:
        # An output position is computed when any entry of its input patch fired.
        any_fired = fired.any(dim=1, keepdim=True).to(torch.float64)  # (B, 1, H, W)
        ones = torch.ones(1, 1, *self.weight.shape[2:], dtype=torch.float64, device=fired.device)
        hits = F.conv2d(any_fired, ones, None, self.stride, self.padding, self.dilation)
        kh, kw = self.weight.shape[2], self.weight.shape[3]
        return int((hits > 0).sum()) * (self.in_channels // self.groups) * kh * kw * self.out_channels

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + ", " + self.extra_delta_repr()


# -- whole-model helpers ----------------------------------------------------------------------

def delta_layers(model: nn.Module) -> list[DeltaLayer]:
    """All delta layers inside ``model`` (including ``model`` itself), in module order."""
    return [m for m in model.modules() if isinstance(m, DeltaLayer)]


def reset_all(model: nn.Module, records: bool = True) -> None:
    """Reset every delta layer's cache (and, by default, its MAC records)."""
    for layer in delta_layers(model):
        layer.reset()
        if records:
            layer.clear_records()


_UNSET: Any = object()


def configure(model: nn.Module, *, enabled: Any = _UNSET, threshold: Any = _UNSET,
              train_threshold: Any = _UNSET, memory: Any = _UNSET, sparse: Any = _UNSET,
              track: Any = _UNSET, record_fired: Any = _UNSET) -> dict[str, Any]:
    """Set options on every delta layer in ``model``; returns the previous values of the first
    layer (for restoring). Raises ``ValueError`` when the model has no delta layer."""
    layers = delta_layers(model)
    if not layers:
        raise ValueError("model has no delta layers; build it with DeltaLinear/DeltaConv2d or "
                         "convert it with deqlite.delta.to_delta(model)")
    options = {"enabled": enabled, "threshold": threshold, "train_threshold": train_threshold,
               "memory": memory, "sparse": sparse, "track": track, "record_fired": record_fired}
    if threshold is not _UNSET:
        _check_threshold("threshold", threshold)
    if train_threshold is not _UNSET:
        _check_threshold("train_threshold", train_threshold)
    if memory is not _UNSET:
        _check_memory(memory)
    old = {k: getattr(layers[0], k) for k in options}
    for layer in layers:
        if sparse is True and isinstance(layer, DeltaConv2d) and layer.groups != 1:
            raise ValueError("sparse=True needs groups=1 convolutions; use sparse=False")
        for k, v in options.items():
            if v is not _UNSET:
                setattr(layer, k, float(v) if k.endswith("threshold") else v)
    return old


@contextlib.contextmanager
def delta_mode(model: nn.Module, threshold: float, *, memory: str = "reset",
               sparse: bool = False, train_threshold: float | None = None,
               record_fired: bool = False) -> Iterator[nn.Module]:
    """Run ``model``'s delta layers with the delta rule inside the block.

    On entry: enable the rule with ``threshold`` (also used in training mode unless
    ``train_threshold`` is given) and ``memory``, clear caches and records. On
    exit: restore the previous settings and clear the caches; the records stay for
    :func:`mac_summary`.

    Example:
        >>> net = nn.Sequential(DeltaLinear(2, 2, enabled=False))
        >>> with delta_mode(net, threshold=0.1):
        ...     _ = net(torch.zeros(1, 2)); _ = net(torch.ones(1, 2))
        >>> mac_summary(net).n_calls
        2
    """
    opts: dict[str, Any] = dict(enabled=True, threshold=threshold, memory=memory, sparse=sparse,
                                track=True, record_fired=record_fired)
    opts["train_threshold"] = threshold if train_threshold is None else train_threshold
    layers = delta_layers(model)
    saved = [{k: getattr(layer, k) for k in opts} for layer in layers]
    configure(model, **opts)
    reset_all(model)
    try:
        yield model
    finally:
        for layer, old in zip(layers, saved):
            for k, v in old.items():
                setattr(layer, k, v)
            layer.reset()


def to_delta(model: nn.Module, **options: Any) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` inside ``model`` (in place) with a delta
    layer sharing its parameters; returns ``model``. A bare layer is returned converted.

    Parametrized layers (e.g. ``torch.nn.utils.parametrizations.spectral_norm``) are refused:
    build those with :class:`DeltaLinear` / :class:`DeltaConv2d` directly and parametrize them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_delta expects an nn.Module (a model or a Linear/Conv2d layer), got "
                        f"{type(model).__name__}")

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, DeltaLayer):
            return m
        if hasattr(m, "parametrizations"):
            raise ValueError(f"{type(m).__name__} has parametrized weights; build it as a "
                             f"DeltaLinear/DeltaConv2d and register the parametrization on it")
        if isinstance(m, nn.Conv2d):
            return DeltaConv2d.from_dense(m, **options)
        if isinstance(m, nn.Linear):
            return DeltaLinear.from_dense(m, **options)
        return m

    if isinstance(model, (nn.Linear, nn.Conv2d)):
        return convert(model)
    for name, child in list(model.named_children()):
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            setattr(model, name, convert(child))
        else:
            to_delta(child, **options)
    return model


@dataclass
class MacSummary:
    """MACs of a model's delta layers, per call index (= per DEQ iteration when each layer is
    called once per evaluation of ``f``), summed over layers. The arrays have one entry per
    call index.

    Attributes:
        dense: MACs the dense layers would have done for the same calls.
        performed: MACs the delta rule performed.
        sub_ops: subtraction operations.
        active_fraction: fired input entries / input entries (1 on dense calls).
        per_layer: totals per layer name, ``{"dense": ..., "performed": ..., "sub_ops": ...}``.
        fired_per_dim: ``(n_calls, D)`` fraction fired per input dimension of the first layer
            that recorded it, or None.
    """

    dense: np.ndarray
    performed: np.ndarray
    sub_ops: np.ndarray
    active_fraction: np.ndarray
    per_layer: dict[str, dict[str, int]] = field(default_factory=dict)
    fired_per_dim: np.ndarray | None = None

    @property
    def n_calls(self) -> int:
        return len(self.dense)

    @property
    def total_dense(self) -> int:
        return int(self.dense.sum())

    @property
    def total_cost(self) -> int:
        """Performed MACs plus subtractions."""
        return int(self.performed.sum() + self.sub_ops.sum())

    @property
    def reduction(self) -> float:
        """1 - (performed + subtraction) / dense, for the same calls."""
        return 1.0 - self.total_cost / max(self.total_dense, 1)

    @property
    def sparsity(self) -> float:
        """Fraction of input entries skipped over all non-dense calls (0 if there are none)."""
        rest = self.active_fraction[1:]
        return float(1.0 - rest.mean()) if len(rest) else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.tolist(), "performed": self.performed.tolist(),
                "sub_ops": self.sub_ops.tolist(), "active_fraction": self.active_fraction.tolist(),
                "total_dense": self.total_dense, "total_cost": self.total_cost,
                "reduction": self.reduction, "per_layer": self.per_layer}


def mac_summary(model: nn.Module) -> MacSummary:
    """Add up the records of every delta layer in ``model`` per call index.

    Example:
        >>> lin = DeltaLinear(2, 3, bias=False)
        >>> _ = lin(torch.ones(1, 2)); _ = lin(torch.zeros(1, 2))
        >>> s = mac_summary(lin); s.dense.tolist(), s.performed.tolist()
        ([6, 6], [6, 6])
    """
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, DeltaLayer)]
    if not named:
        raise ValueError("model has no delta layers; build it with DeltaLinear/DeltaConv2d or "
                         "convert it with deqlite.delta.to_delta(model)")
    T = max((len(m.records) for _, m in named), default=0)
    dense = np.zeros(T, dtype=np.int64)
    performed = np.zeros(T, dtype=np.int64)
    sub = np.zeros(T, dtype=np.int64)
    active = np.zeros(T)
    numel = np.zeros(T)
    per_layer: dict[str, dict[str, int]] = {}
    fired = None
    for name, m in named:
        for i, r in enumerate(m.records):
            dense[i] += r.dense_macs
            performed[i] += r.performed_macs
            sub[i] += r.sub_ops
            active[i] += r.active
            numel[i] += r.numel
        per_layer[name or type(m).__name__] = {
            "dense": int(sum(r.dense_macs for r in m.records)),
            "performed": int(sum(r.performed_macs for r in m.records)),
            "sub_ops": int(sum(r.sub_ops for r in m.records))}
        if fired is None and m.records and all(r.fired_per_dim is not None for r in m.records):
            fired = torch.stack([r.fired_per_dim for r in m.records]).numpy()  # type: ignore[misc]
    frac = np.divide(active, numel, out=np.ones(T), where=numel > 0)
    return MacSummary(dense, performed, sub, frac, per_layer, fired)
