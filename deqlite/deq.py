"""The DEQ layer: ``z* = f(z*, x)`` as an ``nn.Module``, with a forward solver and a
gradient strategy chosen independently."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .backward import (FAILURE_POLICIES, GradientStrategy, get_gradient,
                       report_failure)
from .regularize import weight_cache
from .solvers import Solver, SolverTrace, get_solver, solve
from ._checks import check_int, check_number

__all__ = ["DEQ", "DEQOutput", "State"]

# A state is one tensor (B, ...) or a tuple/list/dict of them (one batch size, one dtype).
State = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]


class DEQOutput(NamedTuple):
    """What :class:`DEQ` returns: the fixed point (with gradients attached), in the structure
    of the state, and the forward solver's trace."""

    z_star: State
    trace: SolverTrace


class _Packing:
    """Packs a multi-tensor state (tuple/list/dict of ``(B, ...)`` tensors) into one
    ``(B, n)`` tensor for the solvers, and back into views of it (so gradients flow)."""

    def __init__(self, z: State, what: str = "the state"):
        if isinstance(z, Tensor):
            raise TypeError("a single tensor needs no packing")
        if isinstance(z, Mapping):
            self.keys: Optional[List[Any]] = list(z)
            parts = [z[k] for k in self.keys]
        elif isinstance(z, (tuple, list)):
            self.keys, parts = None, list(z)
        else:
            raise TypeError(f"{what} must be a tensor or a tuple/list/dict of tensors, got {type(z).__name__}")
        if not parts or not all(isinstance(p, Tensor) for p in parts):
            raise TypeError(f"{what} must hold at least one tensor and only tensors, got "
                            f"{[type(p).__name__ for p in parts]}")
        B = parts[0].shape[0] if parts[0].dim() else None
        if B is None or any(p.dim() == 0 or p.shape[0] != B for p in parts):
            raise ValueError(f"every tensor of {what} must be batched with the same batch size "
                             f"(B, ...); got shapes {[tuple(p.shape) for p in parts]}")
        if len({p.dtype for p in parts}) > 1 or len({p.device for p in parts}) > 1:
            raise TypeError(f"every tensor of {what} must share one dtype and device (they are "
                            f"solved as one vector); got {[(str(p.dtype), str(p.device)) for p in parts]}")
        self.kind = type(z)
        self.B = B
        self.shapes = [tuple(p.shape[1:]) for p in parts]
        self.sizes = [int(math.prod(s)) for s in self.shapes]

    def _parts(self, z: State) -> List[Tensor]:
        if self.keys is not None:
            if not isinstance(z, Mapping) or list(z) != self.keys:
                raise ValueError(f"f must return a dict with the state's keys {self.keys}, got "
                                 f"{list(z) if isinstance(z, Mapping) else type(z).__name__}")
            return [z[k] for k in self.keys]
        if not isinstance(z, (tuple, list)) or len(z) != len(self.shapes):
            raise ValueError(f"f must return a {self.kind.__name__} of {len(self.shapes)} tensors like "
                             f"the state, got {type(z).__name__}")
        return list(z)

    def pack(self, z: State) -> Tensor:
        parts = self._parts(z)
        shapes = [tuple(p.shape[1:]) for p in parts]
        if shapes != self.shapes or any(p.shape[0] != self.B for p in parts):
            raise ValueError(f"f must return tensors of the state's shapes "
                             f"{[(self.B, *s) for s in self.shapes]}, got {[tuple(p.shape) for p in parts]}")
        return torch.cat([p.reshape(self.B, -1) for p in parts], 1)

    def unpack(self, flat: Tensor) -> State:
        pieces = [piece.reshape(flat.shape[0], *shape)
                  for piece, shape in zip(torch.split(flat, self.sizes, dim=1), self.shapes)]
        if self.keys is not None:
            return dict(zip(self.keys, pieces))
        return tuple(pieces) if self.kind is tuple else list(pieces)

    def same_as(self, other: "_Packing") -> bool:
        return (self.keys, self.shapes, self.B, self.kind) == (other.keys, other.shapes, other.B, other.kind)


def _leaves(x: Any) -> List[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _leaves(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _leaves(v)]
    return []


# keyword shortcuts for a named strategy's options -> the option they set
_SHORTCUTS = {"backward_solver": "solver", "backward_tol": "tol", "backward_max_iter": "max_iter",
              "backward_solver_options": "solver_options", "phantom_k": "k", "phantom_tau": "tau"}
# keywords of earlier versions -> what to write instead
_MOVED = {
    "solver_options": "pass a solver object with its options, e.g. solver=deqlite.solvers.Anderson(m=3) "
                      "or solver=deqlite.get_solver('anderson', m=3)",
    "init": "the start is init_state=lambda x: z0 (the same name as the optional f.init_state(x))",
    "eval_solver": "use eval_solve=dict(solver=...)",
    "eval_tol": "use eval_solve=dict(tol=...)",
    "eval_max_iter": "use eval_solve=dict(max_iter=...)",
    "eval_solver_options": "use eval_solve=dict(solver=<a solver object with its options>)",
}


class DEQ(nn.Module):
    """A deep equilibrium layer: returns ``z*`` with ``z* = f(z*, x)``.

    Args:
        f: an ``nn.Module`` (or callable) ``f(z, x) -> z``. The input (injection) ``x`` is
            anything ``f`` takes: a tensor, or a tuple/dict of tensors. The state ``z`` is a
            tensor ``(B, ...)``, or a tuple/list/dict of tensors with one batch size and
            dtype (solved as one vector; ``f`` returns the same structure).
        solver, tol, max_iter, stop: the forward solve in training mode (see
            :func:`deqlite.solve`). ``solver`` is a name or a solver object with its options,
            e.g. ``deqlite.solvers.Anderson(m=3)`` (or ``deqlite.get_solver("anderson", m=3)``).
        eval_solve: the forward solve in eval mode, a dict with any of ``solver``, ``tol``,
            ``max_iter``, ``stop`` (default: the training values), e.g.
            ``eval_solve=dict(max_iter=60)``. Eval mode changes *only* this: if the input or a
            parameter requires grad and grad mode is on, gradients still flow.
        backward: the gradient strategy: an object (:class:`deqlite.Implicit`,
            :class:`deqlite.JacobianFree`, :class:`deqlite.Phantom`, :class:`deqlite.Unrolled`
            or any registered one, with its options) or its name (``"implicit"`` ...).
        **shortcuts: with a strategy *name* only, its options as keywords (the chapters use
            them): ``backward_solver``, ``backward_tol``, ``backward_max_iter``,
            ``backward_solver_options`` (for ``"implicit"``), ``phantom_k``, ``phantom_tau``
            (for ``"phantom"``); shortcuts of another strategy are ignored, so switching the
            name keeps the rest.
        init_state: ``x -> z0`` for the default start; otherwise ``f.init_state(x)`` if ``f``
            has it, else ``zeros_like(x)`` (a tensor ``x`` only).
        warm_start: reuse the previous call's fixed point as the start when its shape
            matches (fixed-point reuse across training steps or a sequence of inputs).
        on_failure: what happens when the forward solve, or the adjoint solve of the
            implicit backward pass, stops without meeting its tolerance (status
            ``"max_iter"`` or ``"diverged"``): ``"warn"`` (default) issues a
            :class:`deqlite.backward.DEQConvergenceWarning` naming the solve and its
            residual, ``"raise"`` raises :class:`deqlite.ConvergenceError` (which carries
            the trace), ``"ignore"`` only records it in the trace (use it where a capped
            solve is intended, e.g. a fixed small ``max_iter`` during training).
        backward_callback: called with the adjoint solve's :class:`SolverTrace`.

    After a call, ``last_solve`` holds the forward solve's fixed point, detached (the
    returned ``z_star`` may instead be a gradient strategy's output, e.g. ``f(z*)`` for
    :class:`deqlite.JacobianFree`); after a backward pass, ``last_backward_trace`` holds the
    adjoint solve's trace.

    Example:
        >>> lin = nn.Linear(4, 4); f = lambda z, x: torch.tanh(0.5 * lin(z) + x)
        >>> deq = DEQ(f, tol=1e-6, backward=deqlite.Implicit(tol=1e-8))
        >>> z, trace = deq(torch.randn(2, 4))
        >>> trace.status
        'converged'
    """

    def __init__(
        self,
        f: Callable[[Any, Any], Any],
        *,
        solver: Union[str, Solver] = "anderson",
        tol: float = 1e-4,
        max_iter: int = 30,
        stop: str = "rel",
        eval_solve: Optional[Mapping[str, Any]] = None,
        backward: Union[str, GradientStrategy] = "implicit",
        init_state: Optional[Callable[[Any], State]] = None,
        warm_start: bool = False,
        on_failure: str = "warn",
        backward_callback: Optional[Callable[[SolverTrace], None]] = None,
        **shortcuts: Any,
    ):
        super().__init__()
        if not callable(f):
            raise TypeError(f"f must be an nn.Module or callable f(z, x), got {type(f).__name__}")
        self.f = f
        self.train_solve = self._solve_config(solver, tol, max_iter, stop)
        self.eval_solve = self._solve_config(**self._eval_settings(eval_solve, self.train_solve))
        self.gradient = self._gradient(backward, self._shortcuts(shortcuts))
        if self.gradient.through_solver and get_solver(solver).name == "newton":
            raise ValueError("backward='unrolled' cannot run through newton (its steps detach); "
                             "use another forward solver or backward='implicit'")
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure must be one of {', '.join(map(repr, FAILURE_POLICIES))}, "
                             f"got {on_failure!r}")
        self.init_state = init_state
        self.warm_start = warm_start
        self.on_failure = on_failure
        self.backward_callback = backward_callback
        self.last_backward_trace: Optional[SolverTrace] = None
        self.last_solve: Optional[State] = None
        self._last_z: Optional[Tensor] = None
        self._last_packing: Optional[_Packing] = None

    @staticmethod
    def _solve_config(solver: Any, tol: Any, max_iter: Any, stop: Any) -> Dict[str, Any]:
        """Validate one forward-solve setting now, not at the first call."""
        get_solver(solver)
        check_number("tol", tol, lo=0.0, low_open=True)
        check_int("max_iter", max_iter)
        if stop not in ("abs", "rel"):
            raise ValueError(f"stop must be 'abs' or 'rel', got {stop!r}")
        return dict(solver=solver, tol=tol, max_iter=max_iter, stop=stop)

    @staticmethod
    def _eval_settings(eval_solve: Any, train: Dict[str, Any]) -> Dict[str, Any]:
        settings = {k: train[k] for k in ("solver", "tol", "max_iter", "stop")}
        if eval_solve is None:
            return settings
        if not isinstance(eval_solve, Mapping):
            raise TypeError(f"eval_solve must be a dict with any of solver, tol, max_iter, stop, "
                            f"e.g. eval_solve=dict(max_iter=60); got {type(eval_solve).__name__}")
        unknown = sorted(set(eval_solve) - set(settings))
        if unknown:
            raise TypeError(f"eval_solve got unknown keys {unknown}; valid: solver, tol, max_iter, stop")
        return {**settings, **eval_solve}

    @staticmethod
    def _shortcuts(given: Dict[str, Any]) -> Dict[str, Any]:
        """Map the keyword shortcuts onto the strategy options; name the fix for anything else."""
        out = {}
        for key, value in given.items():
            if key in _SHORTCUTS:
                if value is not None:
                    out[_SHORTCUTS[key]] = value
            elif key in _MOVED:
                raise TypeError(f"DEQ no longer takes {key}=: {_MOVED[key]}")
            else:
                raise TypeError(f"DEQ got an unexpected keyword argument {key!r}; the gradient "
                                f"strategy's options are set on it (e.g. backward=deqlite.Implicit(tol=1e-8)) "
                                f"or through the shortcuts {', '.join(_SHORTCUTS)}")
        return out

    @staticmethod
    def _gradient(backward: Any, shortcuts: Dict[str, Any]) -> GradientStrategy:
        if isinstance(backward, GradientStrategy):
            if shortcuts:
                raise TypeError(
                    f"backward={type(backward).__name__}(...) is an object: set its options on it "
                    f"(e.g. deqlite.Implicit(tol=...)), not through the backward_*/phantom_* "
                    f"arguments {sorted(shortcuts)}")
            return backward
        strategy = get_gradient(backward)  # validates the name
        # the shortcuts of the named strategy; others are ignored (a name switch keeps the rest)
        wanted = {k: v for k, v in shortcuts.items() if k in type(strategy).options()}
        return get_gradient(backward, **wanted) if wanted else strategy

    @property
    def backward(self) -> str:  # type: ignore[override]
        """The gradient strategy's name (the object is ``self.gradient``)."""
        return self.gradient.name

    def extra_repr(self) -> str:
        t, e = self.train_solve, self.eval_solve
        return (f"solver={t['solver']!r}, tol={t['tol']}, max_iter={t['max_iter']}, "
                f"eval_max_iter={e['max_iter']}, backward={self.backward!r}")

    def initial_state(self, x: Any) -> State:
        if self.init_state is not None:
            return self.init_state(x)
        if hasattr(self.f, "init_state"):
            return self.f.init_state(x)  # type: ignore[union-attr]
        if isinstance(x, Tensor):
            return torch.zeros_like(x)
        raise TypeError(f"the input x is a {type(x).__name__}, so the state's shape cannot be "
                        f"guessed: pass DEQ(f, init_state=lambda x: ...) or give f an init_state(x) method "
                        f"(or pass z0 to the call)")

    def _record_backward(self, trace: SolverTrace) -> None:
        self.last_backward_trace = trace
        if self.backward_callback is not None:
            self.backward_callback(trace)

    def forward(self, x: Any, z0: Optional[State] = None,
                callback: Optional[Callable[..., Any]] = None) -> DEQOutput:
        """Solve for ``z*`` given the input ``x``; ``z0`` overrides the start (warm start).

        A multi-tensor state is solved as one vector: ``callback`` then sees the packed
        ``(B, n)`` iterate.
        """
        cfg = self.train_solve if self.training else self.eval_solve
        start = self.initial_state(x) if z0 is None else z0
        packing = None if isinstance(start, Tensor) else _Packing(start, "the starting state")
        flat0 = start if packing is None else packing.pack(start)
        if (z0 is None and self.warm_start and self._last_z is not None
                and self._last_z.shape == flat0.shape
                and (packing is None) == (self._last_packing is None)
                and (packing is None or packing.same_as(self._last_packing))):
            flat0 = self._last_z
        flat0 = flat0.detach()

        if packing is None:
            def fx(z: Tensor) -> Tensor:
                return self.f(z, x)
        else:
            def fx(z: Tensor) -> Tensor:  # (B, n) -> (B, n) through the user's structure
                return packing.pack(self.f(packing.unpack(z), x))

        with weight_cache():  # contractive weights: one SVD per grad mode, not one per step
            needs_grad = self._needs_grad(fx, flat0, x)
            unrolled = needs_grad and self.gradient.through_solver
            # a user's enclosing torch `parametrize.cached()` block would keep the weight the
            # no-grad solve computed and hand it to the gradient step: drop what the solve added
            torch_cache = dict(parametrize._cache) if parametrize._cache_enabled else None
            z_star, trace = solve(fx, flat0, solver=cfg["solver"], tol=cfg["tol"], max_iter=cfg["max_iter"],
                                  stop=cfg["stop"], callback=callback, on_failure="ignore",
                                  grad=unrolled)
            if torch_cache is not None and not unrolled:
                parametrize._cache.clear()
                parametrize._cache.update(torch_cache)
            report_failure(trace, self.on_failure, "forward", stacklevel=5)  # -> the caller of deq(x)
            if self.warm_start:
                self._last_z, self._last_packing = z_star.detach(), packing
            solved = z_star.detach()
            self.last_solve = solved if packing is None else packing.unpack(solved)
            if needs_grad and not unrolled:
                z_star = self.gradient.attach(fx, z_star, self.on_failure, self._record_backward)
        return DEQOutput(z_star if packing is None else packing.unpack(z_star), trace)

    def _needs_grad(self, fx: Callable[[Tensor], Tensor], z0: Tensor, x: Any) -> bool:
        """Whether the output must carry a gradient: grad mode is on and ``f`` depends on
        something that requires grad (``x``, this module's parameters, or tensors that a
        plain function captured in a closure, found by one probing evaluation of ``f``)."""
        if not torch.is_grad_enabled():
            return False
        if any(t.requires_grad for t in _leaves(x)) or any(p.requires_grad for p in self.parameters()):
            return True
        with torch.enable_grad():
            probe = fx(z0)
        return isinstance(probe, Tensor) and probe.requires_grad
