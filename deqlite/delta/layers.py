"""Delta linear and convolution layers: ``y = y_prev + W d_hat`` with a per-layer cache.

See :mod:`deqlite.delta` for the rule. A layer's settings are a
:class:`~deqlite.delta.config.DeltaConfig`: its own default (``layer.config``, from the
constructor), or the one a :func:`~deqlite.delta.delta_mode` block binds to it; each call
reads the one in force (:attr:`DeltaLayer.settings`). The layer keeps only its cache and
its records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, is_int
from .config import FIELDS, DeltaConfig, active_configs

__all__ = ["CallRecord", "DeltaConv2d", "DeltaLayer", "DeltaLinear"]


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

    def _init_delta(self, config: DeltaConfig) -> None:
        self.config = config  # the default settings; a delta_mode block binds others
        self.records: list[CallRecord] = []
        self._a_prev: Tensor | None = None
        self._y_prev: Tensor | None = None
        self._bufs: tuple | None = None

    @property
    def settings(self) -> DeltaConfig:
        """The config in force for the next call. It is the one the innermost enclosing
        :func:`~deqlite.delta.delta_mode` bound to this layer, else ``self.config``."""
        return active_configs().get(self, self.config)

    # -- public controls ------------------------------------------------------------------
    @property
    def active_threshold(self) -> float:
        """The threshold of the next call, the settings' ``train_threshold`` in training mode
        and ``threshold`` in eval mode."""
        return self.settings.for_training(self.training)  # type: ignore[attr-defined]

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

    def _record(self, cfg: DeltaConfig, a: Tensor, y: Tensor, fired: Tensor | None) -> None:
        if not cfg.track:
            return
        dense = self._dense_macs(a, y)
        per_dim = None
        if fired is None:
            if cfg.record_fired:
                per_dim = torch.ones(a.shape[1])
            self.records.append(CallRecord(dense, dense, 0, a.numel(), a.numel(), True, per_dim))
            return
        if cfg.record_fired:
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
        cfg = self.settings
        needs_graph = torch.is_grad_enabled() and (
            a.requires_grad or any(p.requires_grad for p in self.parameters()))  # type: ignore[attr-defined]
        fresh = (self._a_prev is None or self._a_prev.shape != a.shape
                 or self._a_prev.dtype != a.dtype or self._a_prev.device != a.device)
        if not cfg.enabled or needs_graph or fresh:
            y = self._dense(a)
            if cfg.enabled:
                # The cache holds values only: the delta form has no graph to differentiate.
                self._a_prev, self._y_prev = a.detach(), y.detach()
            self._record(cfg, a, y, None)
            return y
        threshold = cfg.for_training(self.training)  # type: ignore[attr-defined]
        a_prev, y_prev = self._a_prev, self._y_prev
        assert a_prev is not None and y_prev is not None
        if cfg.sparse:
            # Reuse work buffers: on a CPU, allocating fresh (B, D) tensors every iteration
            # costs as much as the arithmetic the delta rule saves.
            if self._bufs is None or self._bufs[0].shape != a.shape or self._bufs[0].dtype != a.dtype:
                self._bufs = (torch.empty_like(a), torch.empty_like(a),
                              torch.empty(a.shape, dtype=torch.bool, device=a.device))
            d = torch.sub(a, a_prev, out=self._bufs[0])
            fired = torch.gt(torch.abs(d, out=self._bufs[1]), threshold,
                             out=self._bufs[2])
        else:
            d = a - a_prev
            fired = d.abs() > threshold
        if cfg.sparse:
            y = self._sparse_update(d, fired, y_prev)
        else:
            # torch.where, not d * fired: a mask product would turn inf * 0 into NaN.
            y = y_prev + self._apply_delta(torch.where(fired, d, torch.zeros((), dtype=d.dtype)))
        if cfg.memory == "reset":
            # The input is kept by reference: callers must not modify it in place.
            self._a_prev = a.detach()
        else:
            self._a_prev = torch.where(fired, a, a_prev).detach()
        self._y_prev = y
        self._record(cfg, a, y, fired)
        return y

    def extra_delta_repr(self) -> str:
        c = self.config
        return (f"threshold={c.threshold}, train_threshold={c.train_threshold}, "
                f"memory={c.memory!r}, sparse={c.sparse}, enabled={c.enabled}")


def _config_field(name: str) -> property:
    """``layer.<name>``: reads the layer's own config; assigning replaces it (validated)."""

    def get(self: DeltaLayer) -> Any:
        return getattr(self.config, name)

    def set_(self: DeltaLayer, value: Any) -> None:
        self.config = self.config.replace(**{name: value})

    return property(get, set_, doc=f"The layer's default ``{name}`` (``self.config.{name}``).")


for _name in FIELDS:  # layer.threshold, layer.enabled, ...: the old attribute API
    setattr(DeltaLayer, _name, _config_field(_name))


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
        check_int("DeltaLinear: in_features", in_features)
        check_int("DeltaLinear: out_features", out_features)
        config = DeltaConfig(enabled, threshold, train_threshold, memory, sparse, track, record_fired)
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_delta(config)

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
        if not ks or any(not is_int(k) or k < 1 for k in ks):
            raise ValueError(f"DeltaConv2d: kernel_size must be a positive int or a pair of them, "
                             f"got {kernel_size!r}")
        if padding_mode != "zeros":
            raise ValueError(f"DeltaConv2d supports padding_mode='zeros' only, got "
                             f"{padding_mode!r}; pad the input yourself (F.pad) before the layer")
        if sparse and groups != 1:
            raise ValueError(f"the sparse path of DeltaConv2d needs groups=1, got groups={groups}; "
                             f"use sparse=False for grouped convolutions")
        config = DeltaConfig(enabled, threshold, train_threshold, memory, sparse, track, record_fired)
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, bias, padding_mode, device=device, dtype=dtype)
        self._init_delta(config)

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


