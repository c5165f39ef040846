"""From an explicit deep network to a weight-tied, input-injected one (chapter 1).

- :class:`ExplicitMLP`: ``z[i+1] = act_i(W[i] z[i] + b[i])``, ``z[0] = x``, ``L`` layers, each
  with its own weights;
- :class:`WeightTiedNet`: ``z_{k+1} = act(W_z z_k + W_x x + b)``, the *same* layer repeated,
  with the input injected at every step; run for ``depth`` steps or solved for its fixed point;
- :func:`universal_weight_tied`: the construction from the universality theorem of the DEQ
  paper (Bai, Kolter & Koltun 2019, the slides' block matrices): any ``L``-layer MLP is an
  ``L``-step weight-tied network whose width is the sum of the MLP's layer widths;
- :func:`stacked_deq_layer`: two DEQs in sequence are one DEQ (the slides' "a single DEQ
  layer is enough"): the joint layer whose fixed point holds both fixed points.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._checks import check_int, is_int

__all__ = ["ExplicitMLP", "BlockActivation", "WeightTiedNet", "universal_weight_tied", "last_block", "stacked_deq_layer"]

Activation = Callable[[Tensor], Tensor]


def _check_dims(dims: Sequence[int]) -> List[int]:
    dims = list(dims)
    if len(dims) < 2 or not all(is_int(d) and d >= 1 for d in dims):
        raise ValueError(f"dims must list at least two integers >= 1 (input, ..., output), got {dims!r}")
    return dims


class ExplicitMLP(nn.Module):
    """An explicit ``L``-layer network ``z[i+1] = act_i(W[i] z[i] + b[i])``, ``z[0] = x``.

    Args:
        dims: ``[d_0, d_1, ..., d_L]``; layer ``i`` maps ``d_i`` to ``d_{i+1}`` entries.
        activations: one callable per layer, or one for all (default ``torch.tanh``);
            use ``nn.Identity()`` for a linear last layer.

    Example:
        >>> mlp = ExplicitMLP([3, 5, 2])
        >>> mlp(torch.randn(4, 3)).shape
        torch.Size([4, 2])
    """

    def __init__(self, dims: Sequence[int], activations: Union[Activation, Sequence[Activation], None] = None):
        super().__init__()
        dims = _check_dims(dims)
        self.dims = dims
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        if activations is None:
            activations = torch.tanh
        if callable(activations) and not isinstance(activations, (list, tuple)):
            activations = [activations] * len(self.layers)
        if len(activations) != len(self.layers):
            raise ValueError(f"got {len(activations)} activations for {len(self.layers)} layers; "
                             f"give one per layer or a single one for all")
        self.activations = list(activations)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def forward(self, x: Tensor) -> Tensor:
        z = x  # (B, d_0)
        for layer, act in zip(self.layers, self.activations):
            z = act(layer(z))  # (B, d_{i+1})
        return z


class BlockActivation(nn.Module):
    """Apply ``acts[i]`` to the ``i``-th block of ``sizes[i]`` entries of the last dimension:
    the stacked activation ``[act_0; act_1; ...]`` of the universality construction."""

    def __init__(self, sizes: Sequence[int], acts: Sequence[Activation]):
        super().__init__()
        if len(sizes) != len(acts):
            raise ValueError(f"{len(sizes)} block sizes but {len(acts)} activations")
        self.sizes = list(sizes)
        self.acts = list(acts)

    def forward(self, h: Tensor) -> Tensor:
        return torch.cat([act(part) for act, part in zip(self.acts, h.split(self.sizes, dim=-1))], dim=-1)


class WeightTiedNet(nn.Module):
    """A weight-tied, input-injected layer ``f(z, x) = act(W_z z + W_x x + b)``.

    ``forward(x, depth)`` applies it ``depth`` times from ``z_0 = 0`` (a weight-tied network of
    that depth); ``layer(z, x)`` is one application (the map a DEQ solves for). Shapes:
    ``x`` is ``(B, d_in)``, ``z`` is ``(B, width)``.

    Example:
        >>> net = WeightTiedNet(torch.zeros(4, 4), torch.ones(4, 2), torch.zeros(4))
        >>> net(torch.ones(1, 2), depth=3).shape
        torch.Size([1, 4])
    """

    def __init__(self, W_z: Tensor, W_x: Tensor, b: Tensor, activation: Optional[Activation] = None):
        super().__init__()
        if W_z.dim() != 2 or W_z.shape[0] != W_z.shape[1]:
            raise ValueError(f"W_z must be square (width, width), got {tuple(W_z.shape)}")
        if W_x.dim() != 2 or W_x.shape[0] != W_z.shape[0]:
            raise ValueError(f"W_x must be (width, d_in) with width {W_z.shape[0]}, got {tuple(W_x.shape)}")
        if b.shape != (W_z.shape[0],):
            raise ValueError(f"b must have shape ({W_z.shape[0]},), got {tuple(b.shape)}")
        self.W_z = nn.Parameter(W_z.clone())
        self.W_x = nn.Parameter(W_x.clone())
        self.b = nn.Parameter(b.clone())
        self.activation = torch.tanh if activation is None else activation

    @property
    def width(self) -> int:
        return int(self.W_z.shape[0])

    def layer(self, z: Tensor, x: Tensor) -> Tensor:
        """One step ``act(W_z z + W_x x + b)``, ``(B, width)``."""
        return self.activation(z @ self.W_z.T + x @ self.W_x.T + self.b)

    def forward(self, x: Tensor, depth: int) -> Tensor:
        check_int("depth", depth, lo=0)
        z = x.new_zeros(x.shape[0], self.width)  # z_0 = 0, (B, width)
        for _ in range(depth):
            z = self.layer(z, x)
        return z


def universal_weight_tied(mlp: ExplicitMLP) -> WeightTiedNet:
    """The weight-tied network that reproduces ``mlp`` (the universality construction).

    With layer weights ``W[i]`` (``d_{i+1} x d_i``) and biases ``b[i]``, the state stacks one
    block per layer, ``width = d_1 + ... + d_L``, and

    - ``W_z`` has ``W[i]`` in block row ``i``, block column ``i - 1`` (zero elsewhere),
    - ``W_x`` has ``W[0]`` in block row 0 (zero elsewhere),
    - ``b = [b[0]; ...; b[L-1]]`` and the activation acts blockwise, ``[act_0; ...; act_{L-1}]``.

    After ``k`` steps from ``z = 0`` the first ``k`` blocks hold the MLP's first ``k`` layer
    outputs, so after ``L`` steps the last block is ``mlp(x)``. ``W_z`` is strictly block
    lower triangular (nilpotent), so that state is also the layer's exact fixed point.
    Use :func:`last_block` to read the output.

    Example:
        >>> mlp = ExplicitMLP([3, 4, 4, 2]).double()
        >>> tied = universal_weight_tied(mlp)
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> bool(torch.allclose(tied(x, depth=3)[:, -2:], mlp(x)))
        True
    """
    if not isinstance(mlp, ExplicitMLP):
        raise TypeError(f"expected an ExplicitMLP, got {type(mlp).__name__}")
    dims = mlp.dims
    sizes = dims[1:]  # one block per layer output
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    width = offsets[-1]
    ref = mlp.layers[0].weight
    W_z = ref.new_zeros(width, width)
    W_x = ref.new_zeros(width, dims[0])
    with torch.no_grad():
        W_x[: sizes[0]] = mlp.layers[0].weight
        for i in range(1, len(sizes)):
            rows = slice(offsets[i], offsets[i + 1])
            cols = slice(offsets[i - 1], offsets[i])
            W_z[rows, cols] = mlp.layers[i].weight
        b = torch.cat([layer.bias.detach() for layer in mlp.layers])
    return WeightTiedNet(W_z.detach(), W_x.detach(), b, BlockActivation(sizes, mlp.activations))


def last_block(z: Tensor, mlp: ExplicitMLP) -> Tensor:
    """The block of a :func:`universal_weight_tied` state that holds the MLP's output."""
    return z[..., -mlp.dims[-1]:]


def stacked_deq_layer(f1: Callable[[Tensor, Tensor], Tensor], f2: Callable[[Tensor, Tensor], Tensor],
                      d1: int) -> Callable[[Tensor, Tensor], Tensor]:
    """One layer equivalent to two stacked DEQs.

    The stack solves ``z1 = f1(z1, x)`` and then ``z2 = f2(z2, z1)``; the returned layer
    ``F([z1, z2], x) = [f1(z1, x), f2(z2, z1)]`` acts on the concatenated state (``d1``
    entries of ``z1`` first), and its fixed points are exactly the pairs ``(z1*, z2*)``.
    Its Jacobian is block lower triangular, so its eigenvalues are those of the two layers:
    one DEQ, no slower to solve than the slower of the two.

    Shapes: ``z`` is ``(B, d1 + d2)``, ``x`` whatever ``f1`` takes.
    """
    if not (callable(f1) and callable(f2)):
        raise TypeError(f"f1 and f2 must be callables f(z, x), got {type(f1).__name__} and {type(f2).__name__}")
    check_int("d1", d1, hint="the width of the first DEQ's state")

    def layer(z: Tensor, x: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] <= d1:
            raise ValueError(f"z must be (B, d1 + d2) with d1 = {d1} and d2 >= 1, got shape {tuple(z.shape)}")
        z1, z2 = z[:, :d1], z[:, d1:]
        return torch.cat([f1(z1, x), f2(z2, z1)], dim=1)

    return layer
