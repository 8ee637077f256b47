"""Functions whose forward-mode tangents are not the transpose of their gradients.

The GGN and Fisher of lists of batches, DataLoaders and ``cache=False``
(:func:`curvops.products.jacobian_sandwich_matmat`) take :math:`Jv` in forward mode
and :math:`J^\\top u` in reverse mode.  The product :math:`J^\\top Q J v` is the
symmetric matrix the operators declare only if the two derivatives of every
function in the forward pass are transposes of each other.  For most of PyTorch they
are, also at ties and kinks (``max``, ``relu``, ``sort``, pooling, ``maximum``; a
sweep over PyTorch's operator database in float64 at tie-heavy inputs), and the
exceptions with an exact rewrite are rewritten in every product
(:data:`curvops.derivative_repairs.REPLACEMENTS`: ``torch.fmax`` at ties, ``clamp``
with a one-sided tensor bound).  The rest are listed in :data:`UNSUITABLE`:

* ``scatter_reduce(..., reduce="prod")``: PyTorch's forward mode returns a **zero**
  tangent (the GGN through it came out zero on the forward-mode paths, silently).

A forward-mode pass (:func:`forward_mode_pass`) that calls one of them raises
:class:`ForwardModeUnsuitable` from :class:`curvops.determinism.DropoutOffMode`, and
the product takes :math:`Jv` by differentiating the recorded :math:`J^\\top u` instead
(reverse over reverse, :func:`curvops.products.jacobian_graph`), as the cached
single-batch path always does; the same happens where PyTorch has no forward-mode
derivative at all (:func:`lacks_forward_derivative`: ``index_reduce``, a custom
``autograd.Function`` without ``jvp``).

>>> import torch
>>> with forward_mode_pass():
...     in_forward_mode_pass()
True
>>> reason = unsuitable_call(torch.scatter_reduce, (None, 0, None, None, "prod"), {})
>>> reason.startswith("scatter_reduce")
True
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "UNSUITABLE",
    "ForwardModeUnsuitable",
    "forward_mode_pass",
    "in_forward_mode_pass",
    "lacks_forward_derivative",
    "unsuitable_call",
]


class ForwardModeUnsuitable(RuntimeError):
    """A forward-mode pass called a function whose tangent is not the transpose of
    its gradient (:data:`UNSUITABLE`); products catch it and use reverse mode."""


_IN_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "curvops_forward_mode_pass", default=False
)


@contextmanager
def forward_mode_pass() -> Iterator[None]:
    """Mark the forward passes inside the block as carrying forward-mode tangents.

    >>> in_forward_mode_pass()
    False
    """
    token = _IN_PASS.set(True)
    try:
        yield
    finally:
        _IN_PASS.reset(token)


def in_forward_mode_pass() -> bool:
    """Whether the caller runs inside :func:`forward_mode_pass`."""
    return _IN_PASS.get()


def _scatter_reduce_prod(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    reduce = args[4] if len(args) > 4 else kwargs.get("reduce")
    if reduce == "prod":
        return "scatter_reduce(reduce='prod'), whose forward-mode tangent PyTorch returns as zero"
    return None


#: function -> ``reason(args, kwargs)``: why this call's tangent is unusable (None: fine).
UNSUITABLE: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], str | None]] = {
    torch.scatter_reduce: _scatter_reduce_prod,
    torch.Tensor.scatter_reduce: _scatter_reduce_prod,
    torch.Tensor.scatter_reduce_: _scatter_reduce_prod,
}


def unsuitable_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    """Why a call of ``func`` cannot give forward-mode tangents (None where it can).

    >>> unsuitable_call(torch.tanh, (None,), {}) is None
    True
    """
    reason = UNSUITABLE.get(func)
    return None if reason is None else reason(args, kwargs)


def lacks_forward_derivative(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch's error for a function without a forward-mode
    derivative (an operation such as ``index_reduce``, or a custom
    ``autograd.Function`` without ``jvp``), or :class:`ForwardModeUnsuitable`.

    >>> lacks_forward_derivative(NotImplementedError(
    ...     "Trying to use forward AD with index_reduce that does not support it"))
    True
    >>> lacks_forward_derivative(RuntimeError("shape mismatch"))
    False
    """
    if isinstance(exc, ForwardModeUnsuitable):
        return True
    if not isinstance(exc, (NotImplementedError, RuntimeError)):
        return False
    text = str(exc)
    return "forward AD" in text or "forward mode AD" in text
