"""In-place writes with gradients off to tensors that carry a gradient history.

A ``forward`` that does

.. code-block:: python

    h = self.linear(x)
    with torch.no_grad():
        h.clamp_(min=-0.2)          # or h[mask] = 0, h.mul_(s), ...

changes the values of ``h`` without autograd recording it: PyTorch's backward pass
then passes the gradient through as if the write had not happened (the derivative of
another function), while forward mode does record it.  The Hessian silently
differentiated the unclamped network, and the forward-mode GGN paths disagreed with
the cached one (by 37 % on the model of ``tests/curvops/test_untracked_writes.py``).

During products such a write is refused (``ValueError`` naming ``model``): an
in-place operation (a method ending in ``_``, ``x[...] = value``, augmented
assignment) run with gradients off on a tensor that has a gradient history (a
``grad_fn``).  Writes to buffers and parameters are not concerned (buffers carry no
history; writes to parameters are refused by their own check), nor are writes in
the gradient-free passes products run on detached copies.

>>> import torch
>>> h = torch.ones(2, requires_grad=True) * 2
>>> with torch.no_grad():
...     untracked_write(torch.Tensor.clamp_, (h,))
'Tensor.clamp_'
>>> untracked_write(torch.Tensor.clamp_, (h,)) is None  # gradients on: recorded
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spectral.errors import argument_error

__all__ = ["refuse_untracked_write", "untracked_write"]

_IN_PLACE_DUNDERS = frozenset(
    {
        "__setitem__",
        "__iadd__",
        "__isub__",
        "__imul__",
        "__itruediv__",
        "__ifloordiv__",
        "__imod__",
        "__ipow__",
        "__iand__",
        "__ior__",
        "__ixor__",
        "__ilshift__",
        "__irshift__",
        "__imatmul__",
    }
)


def _in_place(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS


def untracked_write(func: Callable[..., Any], args: tuple[Any, ...]) -> str | None:
    """The name of ``func`` if calling it on ``args`` now is an untracked write (else None).

    >>> untracked_write(torch.tanh, (torch.ones(1),)) is None
    True
    """
    if torch.is_grad_enabled() or not args:
        return None
    target = args[0]
    if not isinstance(target, torch.Tensor) or target.grad_fn is None:
        return None
    name = getattr(func, "__name__", "")
    if not _in_place(name):
        return None
    owner = "Tensor." if getattr(torch.Tensor, name, None) is func else "torch."
    return owner + name


def refuse_untracked_write(func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` naming ``model`` for a call :func:`untracked_write` flags.

    >>> h = torch.ones(2, requires_grad=True) * 2
    >>> with torch.no_grad():
    ...     refuse_untracked_write(torch.Tensor.mul_, (h, 3))
    Traceback (most recent call last):
    ...
    ValueError: Argument 'model': expected a forward pass whose writes autograd records...
    """
    what = untracked_write(func, args)
    if what is None:
        return
    raise argument_error(
        "model",
        "a forward pass whose writes autograd records: an in-place write with gradients "
        "off to a tensor computed from the parameters changes its values but not its "
        "gradient (PyTorch's backward pass differentiates the function without the "
        "write), so curvature products would be silently wrong. Do the write with "
        "gradients on (e.g. h = h.clamp(min=...) outside torch.no_grad()), or on a "
        "detached copy if no gradient should flow through it",
        f"a forward pass that calls {what} inside torch.no_grad() on a tensor with a "
        "gradient history",
    )
