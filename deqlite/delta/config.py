"""The settings of the delta rule as one value, and who owns them while a block runs.

A :class:`DeltaConfig` holds everything a delta layer needs to decide how to run a call
(enabled, threshold, memory rule, execution path, what to record). Each layer keeps one as
its default (``layer.config``, set by its constructor). :func:`deqlite.delta.delta_mode`
does not write into the layers: it binds a config to the model's layers in a context
variable for the duration of a ``with`` block, and every call made inside the block reads
it from there. Leaving the block unbinds it, so nothing has to be saved and restored.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

__all__ = ["MEMORY_RULES", "DeltaConfig", "active_configs"]

MEMORY_RULES = ("reset", "accumulate")


def check_threshold(name: str, value: Any) -> float:
    """A finite number >= 0 as a float, else a ``ValueError`` saying what 0 means."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 reproduces the dense layer), "
                         f"got {value!r}")
    return float(value)


def check_memory(value: Any) -> str:
    """One of :data:`MEMORY_RULES`; the message says what each rule keeps."""
    if value not in MEMORY_RULES:  # check_choice's format, with what the rules mean
        raise ValueError(f"memory must be one of 'reset', 'accumulate' ('reset': the cache takes "
                         f"the full new input, as in the DeltaDEQ release; 'accumulate': only the "
                         f"entries that fired, as in the delta RNN); got {value!r}")
    return value


@dataclass(frozen=True)
class DeltaConfig:
    """How a delta layer runs its calls.

    Attributes:
        enabled: False makes the layer dense (calls are still recorded when ``track``).
        threshold: threshold on ``|a - a_prev|`` in eval mode; 0 gives the dense result.
        train_threshold: threshold in training mode; None means ``threshold``.
        memory: ``"reset"`` or ``"accumulate"`` (see :mod:`deqlite.delta`).
        sparse: gather the fired rows and columns and multiply only those (same result).
        track: record the MACs of every call.
        record_fired: also record the per-input-dimension fraction that fired.

    Example:
        >>> cfg = DeltaConfig(threshold=0.1)
        >>> cfg.train_threshold, cfg.for_training(False)
        (0.1, 0.1)
    """

    enabled: bool = True
    threshold: float = 0.0
    train_threshold: float | None = None
    memory: str = "reset"
    sparse: bool = False
    track: bool = True
    record_fired: bool = False

    def __post_init__(self) -> None:
        th = check_threshold("threshold", self.threshold)
        train = th if self.train_threshold is None else check_threshold(
            "train_threshold", self.train_threshold)
        object.__setattr__(self, "threshold", th)
        object.__setattr__(self, "train_threshold", train)
        check_memory(self.memory)
        for name in ("enabled", "sparse", "track", "record_fired"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    def for_training(self, training: bool) -> float:
        """The threshold a call uses: ``train_threshold`` in training mode, else ``threshold``."""
        return self.train_threshold if training else self.threshold  # type: ignore[return-value]

    def replace(self, **changes: Any) -> DeltaConfig:
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise TypeError(f"DeltaConfig has no field(s) {sorted(unknown)}; the fields are {FIELDS}")
        return replace(self, **changes)


FIELDS = tuple(f.name for f in fields(DeltaConfig))

# layer -> the config bound to it by the innermost enclosing delta_mode (empty outside).
# A context variable: each thread (and asyncio task) sees its own bindings.
_BOUND: ContextVar[Mapping[Any, DeltaConfig]] = ContextVar("deqlite_delta_bound",
                                                          default=MappingProxyType({}))


def active_configs() -> Mapping[Any, DeltaConfig]:
    """The configs bound by the enclosing :func:`~deqlite.delta.delta_mode` blocks, by layer."""
    return _BOUND.get()
