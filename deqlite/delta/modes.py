"""Whole-model controls of the delta layers: find, reset, configure, convert, and the
:func:`delta_mode` block that binds one :class:`~deqlite.delta.config.DeltaConfig` to a
model's layers; :func:`mac_summary` adds up what their calls cost."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import _BOUND, DeltaConfig, check_memory, check_threshold
from .layers import DeltaConv2d, DeltaLayer, DeltaLinear

__all__ = ["MacSummary", "configure", "delta_layers", "delta_mode", "mac_summary", "reset_all",
           "to_delta"]

_NO_LAYERS = ("model has no delta layers; build it with DeltaLinear/DeltaConv2d or convert it "
              "with deqlite.delta.to_delta(model)")


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


def _check_sparse(layers: list[DeltaLayer], sparse: Any) -> None:
    if sparse is True and any(isinstance(m, DeltaConv2d) and m.groups != 1 for m in layers):
        raise ValueError("sparse=True needs groups=1 convolutions; use sparse=False")


def configure(model: nn.Module, *, enabled: Any = _UNSET, threshold: Any = _UNSET,
              train_threshold: Any = _UNSET, memory: Any = _UNSET, sparse: Any = _UNSET,
              track: Any = _UNSET, record_fired: Any = _UNSET) -> dict[str, Any]:
    """Change the default settings (``layer.config``) of every delta layer in ``model``, for
    good; returns the previous values of the first layer. For settings that hold only
    inside a block, use :func:`delta_mode`. Raises ``ValueError`` when the model has no delta
    layer."""
    layers = delta_layers(model)
    if not layers:
        raise ValueError(_NO_LAYERS)
    options = {"enabled": enabled, "threshold": threshold, "train_threshold": train_threshold,
               "memory": memory, "sparse": sparse, "track": track, "record_fired": record_fired}
    changes = {k: v for k, v in options.items() if v is not _UNSET}
    if "threshold" in changes:
        check_threshold("threshold", threshold)
    if "train_threshold" in changes:
        check_threshold("train_threshold", train_threshold)
    if "memory" in changes:
        check_memory(memory)
    _check_sparse(layers, sparse)
    old = {k: getattr(layers[0].config, k) for k in options}
    for layer in layers:
        layer.config = layer.config.replace(**changes)
    return old


@contextlib.contextmanager
def delta_mode(model: nn.Module, threshold: float | None, *, memory: str = "reset",
               sparse: bool = False, train_threshold: float | None = None,
               record_fired: bool = False, track: bool = True) -> Iterator[nn.Module]:
    """Run ``model``'s delta layers under one :class:`DeltaConfig` inside the block.

    ``threshold`` turns the delta rule on (also used in training mode unless
    ``train_threshold`` is given); ``threshold=None`` runs the layers dense, still recording
    their MACs (a baseline measured the same way). The config is bound to the layers in a
    context variable, not written into them: on exit the layers are back on their own
    ``layer.config`` with nothing to restore (this also holds when the block raises, and
    blocks nest). Caches are cleared on entry and exit; the records are cleared on entry and
    stay after exit for :func:`mac_summary`. The binding is seen by the thread that entered
    the block (a context variable), not by worker threads it starts.

    Example:
        >>> net = nn.Sequential(DeltaLinear(2, 2, enabled=False))
        >>> with delta_mode(net, threshold=0.1):
        ...     _ = net(torch.zeros(1, 2)); _ = net(torch.ones(1, 2))
        >>> mac_summary(net).n_calls, net[0].enabled
        (2, False)
    """
    layers = delta_layers(model)
    if not layers:
        raise ValueError(_NO_LAYERS)
    if threshold is None:
        cfg = DeltaConfig(enabled=False, track=track, record_fired=record_fired)
    else:
        cfg = DeltaConfig(True, threshold, train_threshold, memory, sparse, track, record_fired)
        _check_sparse(layers, sparse)
    token = _BOUND.set({**_BOUND.get(), **{layer: cfg for layer in layers}})
    reset_all(model)
    try:
        yield model
    finally:
        _BOUND.reset(token)
        for layer in layers:
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
        raise ValueError(_NO_LAYERS)
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
