"""Writes to one position from several sources, which no derivative describes.

``x[idx] = src``, ``index_put``, ``index_copy``, ``scatter`` (without a reduction),
``put`` (without ``accumulate``) and ``F.max_unpool1d/2d/3d`` write each source
element to the position its index names.  Where an index repeats, one of the
writes wins (which one, PyTorch leaves unspecified) and the result depends on that
source element alone; but PyTorch's backward pass hands the position's gradient to
*every* source element written there, and its forward mode to the winner only.  So
the gradient is not the derivative of the function (a loser, on which the loss does
not depend, gets a gradient: 0.68 against a finite difference of 0 in a four-element
example), nor is any curvature built on it, and the GGN of the forward-mode paths
differs from the cached one.

During products such a write is refused when the written values carry derivatives
(they depend on the selected parameters) and an index repeats: ``ValueError``
naming ``model``, the function, and the remedies (unique indices; ``accumulate=True``
or ``index_add``/``scatter_add`` when the writes are meant to add up).  Writes of
constants, boolean masks and unique indices go through unchanged; the check costs
one pass over the index per such call.

>>> import torch
>>> v = torch.ones(3, requires_grad=True)
>>> duplicate_write(torch.Tensor.index_put_, (torch.zeros(4), (torch.tensor([0, 2, 0]),), v), {})
'index_put_ with a repeated index'
>>> duplicate_write(torch.Tensor.index_put_, (torch.zeros(4), (torch.tensor([0, 2, 1]),), v), {})
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from spectral.errors import argument_error

__all__ = ["WRITES", "duplicate_write", "refuse_duplicate_write"]


def _carries_derivatives(value: Any) -> bool:
    """Whether ``value`` is a tensor with a gradient history or a forward-mode tangent."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    return value.requires_grad or fwAD.unpack_dual(value).tangent is not None


def _repeats(positions: torch.Tensor) -> bool:
    flat = positions.reshape(-1)
    return flat.numel() > 1 and int(torch.unique(flat).numel()) < flat.numel()


def _advanced(key: Any) -> bool:
    """Whether an indexing key holds an integer index array (not only slices, ints,
    ``None``, ``...`` and boolean masks, which cannot repeat a position)."""
    parts = key if isinstance(key, tuple) else (key,)
    for part in parts:
        if isinstance(part, torch.Tensor) and part.dtype != torch.bool and part.ndim > 0:
            return True
        if isinstance(part, (list, range)) and len(part) > 1:
            return True
    return False


def _positions(shape: torch.Size, key: Any, device: torch.device) -> torch.Tensor:
    """The flat positions that ``tensor[key]`` selects (repeated where the key repeats)."""
    return torch.arange(shape.numel(), device=device).reshape(shape)[key]


def _setitem(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    target, key, value = args[:3]
    if not (_carries_derivatives(value) and _advanced(key)):
        return False
    return _repeats(_positions(target.shape, key, target.device))


def _index_put(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    target, indices, values = args[:3]
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    if accumulate or not _carries_derivatives(values):
        return False
    key = tuple(slice(None) if i is None else i for i in indices)
    return _advanced(key) and _repeats(_positions(target.shape, key, target.device))


def _index_copy(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    source = args[3] if len(args) > 3 else kwargs.get("source")
    index = args[2] if len(args) > 2 else kwargs.get("index")
    return _carries_derivatives(source) and isinstance(index, torch.Tensor) and _repeats(index)


def _scatter(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    target = args[0]
    dim: int = args[1] if len(args) > 1 else kwargs["dim"]
    index = args[2] if len(args) > 2 else kwargs.get("index")
    src = args[3] if len(args) > 3 else kwargs.get("src", kwargs.get("value"))
    if kwargs.get("reduce") is not None or len(args) > 4 or not _carries_derivatives(src):
        return False
    if not isinstance(index, torch.Tensor) or index.numel() < 2:
        return False
    counts = torch.zeros(target.shape, dtype=torch.int32, device=target.device)
    counts.scatter_add_(dim, index, torch.ones_like(index, dtype=torch.int32))
    return int(counts.max()) > 1


def _put(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    target = args[0]
    index = args[1] if len(args) > 1 else kwargs.get("index")
    source = args[2] if len(args) > 2 else kwargs.get("source")
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    if accumulate or not _carries_derivatives(source) or not isinstance(index, torch.Tensor):
        return False
    return _repeats(torch.remainder(index, max(target.numel(), 1)))


def _max_unpool(spatial: int) -> Callable[[tuple[Any, ...], dict[str, Any]], bool]:
    """The check of ``F.max_unpool{spatial}d``: indices repeat within one output plane."""

    def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        source = args[0]
        indices = args[1] if len(args) > 1 else kwargs.get("indices")
        if not _carries_derivatives(source) or not isinstance(indices, torch.Tensor):
            return False
        planes = indices.reshape(-1, indices.shape[-spatial:].numel())
        if planes.shape[-1] < 2:
            return False
        ordered = planes.sort(dim=-1).values
        return bool((ordered[:, 1:] == ordered[:, :-1]).any())

    return check


#: function -> ``check(args, kwargs)``: True where the call writes a position twice.
WRITES: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], bool]] = {
    torch.Tensor.__setitem__: _setitem,
    torch.index_put: _index_put,
    torch.index_put_: _index_put,
    torch.Tensor.index_put: _index_put,
    torch.Tensor.index_put_: _index_put,
    torch.index_copy: _index_copy,
    torch.Tensor.index_copy: _index_copy,
    torch.Tensor.index_copy_: _index_copy,
    torch.scatter: _scatter,
    torch.Tensor.scatter: _scatter,
    torch.Tensor.scatter_: _scatter,
    torch.put: _put,
    torch.Tensor.put: _put,
    torch.Tensor.put_: _put,
    F.max_unpool1d: _max_unpool(1),
    F.max_unpool2d: _max_unpool(2),
    F.max_unpool3d: _max_unpool(3),
}


def duplicate_write(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    """What a call writes twice to one position from values with derivatives (None: fine).

    >>> duplicate_write(torch.tanh, (torch.zeros(2),), {}) is None
    True
    """
    check = WRITES.get(func)
    if check is None or not check(args, kwargs):
        return None
    name = "x[index] = value" if func is torch.Tensor.__setitem__ else func.__name__
    return f"{name} with a repeated index"


def refuse_duplicate_write(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Raise ``ValueError`` naming ``model`` for a call :func:`duplicate_write` flags.

    >>> refuse_duplicate_write(torch.Tensor.index_copy_, (torch.zeros(3), 0,
    ...     torch.tensor([1, 1]), torch.ones(2, requires_grad=True)), {})
    Traceback (most recent call last):
    ...
    ValueError: Argument 'model': expected a forward pass that writes each position once...
    """
    what = duplicate_write(func, args, kwargs)
    if what is None:
        return
    raise argument_error(
        "model",
        "a forward pass that writes each position once (or adds the writes up): where an "
        "index repeats, one write wins, but PyTorch's backward pass gives the position's "
        "gradient to every value written there, so gradients and curvature would not be "
        "derivatives of the function, silently. Make the "
        "indices unique, or add the writes up (accumulate=True, index_add, scatter_add) "
        "if that is what the model means",
        f"a forward pass that calls {what} on values that depend on the parameters",
    )
