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

The same holds for writes through a **detached alias**: ``h.data.clamp_()``,
``h.detach().mul_(s)`` or ``h.data[mask] = 0`` change ``h`` in place (the alias shares
its storage) while autograd records nothing, whether gradients are on or off, and
``h.data = t`` swaps its values outright.  :class:`DetachedAliases` remembers, for one
forward pass, the aliases ``.data`` and ``.detach()`` return of tensors that carry a
gradient history, and refuses an in-place write to any tensor sharing such an alias's
storage (a view of it included) while the source is alive.  A detached *copy*
(``h.detach().clone()``, ``h.detach() * 2``) is a new tensor and free to change.

>>> import torch
>>> h = torch.ones(2, requires_grad=True) * 2
>>> with torch.no_grad():
...     untracked_write(torch.Tensor.clamp_, (h,))
'Tensor.clamp_'
>>> untracked_write(torch.Tensor.clamp_, (h,)) is None  # gradients on: recorded
True
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch

from spectral.errors import argument_error

__all__ = ["DetachedAliases", "refuse_untracked_write", "untracked_write"]

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


# in-place by name, but they change no values
_NOT_WRITES = frozenset({"detach_", "requires_grad_", "share_memory_", "retain_grad_"})

#: the descriptor behind ``Tensor.data`` (its ``__get__``/``__set__`` reach
#: ``__torch_function__`` as fresh method wrappers bound to it)
_DATA_DESCRIPTOR = inspect.getattr_static(torch.Tensor, "data")

_DETACH = frozenset({torch.Tensor.detach, torch.detach})


def _in_place(name: str) -> bool:
    return (
        (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS
    ) and name not in _NOT_WRITES


def _data_access(func: Callable[..., Any]) -> str | None:
    """``"__get__"``/``"__set__"`` when ``func`` reads or assigns ``Tensor.data``."""
    if getattr(func, "__self__", None) is _DATA_DESCRIPTOR:
        return getattr(func, "__name__", None)
    return None


def _has_history(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.grad_fn is not None


def _storage_key(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (None for tensors without one, e.g. sparse)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


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


class DetachedAliases:
    """The detached aliases of tensors with a gradient history made in one forward pass.

    Used by :class:`curvops.determinism.DropoutOffMode` around every call:
    :meth:`note` remembers what ``Tensor.data`` and ``detach`` return for a tensor with
    a history (a ``grad_fn``; writes to parameters are refused by their own check),
    and :meth:`check` refuses (``ValueError`` naming ``model``) an in-place write to a
    tensor without history that shares such an alias's storage, and an assignment to
    the ``.data`` of a tensor with a history.  Sources are held
    weakly: once a source is freed its storage address may be reused, and the entry
    is dropped.

    >>> h = torch.ones(2, requires_grad=True) * 2
    >>> aliases = DetachedAliases()
    >>> alias = aliases.note(torch.Tensor.detach, (h,), h.detach())
    >>> aliases.check(torch.Tensor.mul_, (alias.clone(), 3))  # a copy: free
    >>> aliases.check(torch.Tensor.mul_, (alias, 3))
    Traceback (most recent call last):
    ...
    ValueError: Argument 'model': expected a forward pass whose writes autograd records...
    """

    def __init__(self) -> None:
        self._sources: dict[int, weakref.ref[torch.Tensor]] = {}

    def check(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Refuse ``func(*args)`` if it writes through a noted alias or assigns ``.data``."""
        if not args:
            return
        if _data_access(func) == "__set__" and _has_history(args[0]):
            _refuse(
                f"an assignment to .data of a tensor with a gradient history ({_shape(args[0])})"
            )
        if self._sources:
            self._check_write(func, args[0])

    def note(self, func: Callable[..., Any], args: tuple[Any, ...], result: Any) -> Any:
        """Remember ``result`` if it is a detached alias of ``args[0]``; return it."""
        if (
            args
            and (func in _DETACH or _data_access(func) == "__get__")
            and _has_history(args[0])
            and isinstance(result, torch.Tensor)
        ):
            key = _storage_key(result)
            if key is not None:
                self._sources[key] = weakref.ref(args[0])
        return result

    def _check_write(self, func: Callable[..., Any], target: Any) -> None:
        if not isinstance(target, torch.Tensor) or _has_history(target) or target.requires_grad:
            return  # a write to a tensor with a history is recorded (or refused above)
        name = getattr(func, "__name__", "")
        if not _in_place(name):
            return
        key = _storage_key(target)
        ref = None if key is None else self._sources.get(key)
        if key is None or ref is None:
            return
        source = ref()
        if source is None or _storage_key(source) != key:
            del self._sources[key]  # freed: the address may now hold something else
            return
        owner = "Tensor." if getattr(torch.Tensor, name, None) is func else "torch."
        _refuse(
            f"a forward pass that calls {owner}{name} on a detached alias (.data or "
            f".detach()) of a tensor with a gradient history ({_shape(source)})"
        )


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def _refuse(received: str) -> None:
    raise argument_error(
        "model",
        "a forward pass whose writes autograd records: writing through .data or "
        ".detach() changes a tensor computed from the parameters without autograd "
        "recording it (PyTorch's backward pass differentiates the function without the "
        "write), so curvature products would be silently wrong. Write to the tensor "
        "itself with gradients on (h = h.clamp(min=...)), or to a copy "
        "(h.detach().clone()) if no gradient should flow through it",
        received,
    )
