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
  tangent (the GGN through it came out zero on the forward-mode paths, silently);
* operators registered with ``torch.library`` (``custom_op`` with
  ``register_autograd``, other libraries' kernels): a backward only, and a **zero**
  tangent in forward mode, without an error;
* ``torch.cholesky_inverse``: a wrong tangent at ordinary inputs (``[[1, 0], [0.5, 1]]``
  gives ``[[1.25, -1.19], [-1.19, -0.25]]`` against the exact ``[[1, -1], [-1, 0]]``);
* ``torch.logcumsumexp``: a tangent off by about ``1e-6`` in float64 (the gradient is
  exact).

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


def _always(what: str) -> Callable[[tuple[Any, ...], dict[str, Any]], str]:
    return lambda args, kwargs: what


_CHOLESKY_INVERSE = _always("torch.cholesky_inverse, whose forward-mode tangent is wrong")
_LOGCUMSUMEXP = _always("torch.logcumsumexp, whose forward-mode tangent is inexact")

#: function -> ``reason(args, kwargs)``: why this call's tangent is unusable (None: fine).
UNSUITABLE: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], str | None]] = {
    torch.scatter_reduce: _scatter_reduce_prod,
    torch.Tensor.scatter_reduce: _scatter_reduce_prod,
    torch.Tensor.scatter_reduce_: _scatter_reduce_prod,
    torch.cholesky_inverse: _CHOLESKY_INVERSE,
    torch.Tensor.cholesky_inverse: _CHOLESKY_INVERSE,
    torch.logcumsumexp: _LOGCUMSUMEXP,
    torch.Tensor.logcumsumexp: _LOGCUMSUMEXP,
}

#: Operator namespaces of PyTorch itself (their forward-mode formulas are in derivatives.yaml).
_TORCH_NAMESPACES = frozenset({"aten", "prims"})


def unsuitable_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    """Why a call of ``func`` cannot give forward-mode tangents (None where it can).

    >>> unsuitable_call(torch.tanh, (None,), {}) is None
    True
    """
    reason = UNSUITABLE.get(func)
    if reason is not None:
        return reason(args, kwargs)
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        namespace = getattr(func, "namespace", None)
        if namespace not in _TORCH_NAMESPACES:
            return f"the operator {func} from torch.library, which has no forward-mode derivative"
    return None


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
