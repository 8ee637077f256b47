"""Refuse second derivatives that PyTorch would silently drop.

Curvature products differentiate a *backward* graph: the Hessian differentiates the
gradient :math:`\\nabla_w L` again, and the GGN and Fisher get :math:`Jv` by
differentiating :math:`g(u) = J^\\top u` with respect to :math:`u`.  A custom
:class:`torch.autograd.Function` whose ``backward`` is decorated with
:func:`torch.autograd.function.once_differentiable` returns outputs that are
*detached* from its inputs: PyTorch marks them with a ``DelayedError`` node (class
``Error``) whose
inputs are fresh leaves, so a later ``torch.autograd.grad(..., allow_unused=True)``
never reaches that node and returns zeros instead of raising.  For a model

.. code-block:: python

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

every Hessian, GGN and Fisher product would be the zero vector.  Such a function in
the forward graph always loses a part of the second derivative (the outputs of its
backward are cut from the incoming gradient, on which they depend), and when the
incoming gradient is a constant (a loss linear in the function's output) PyTorch
does not even mark the cut.  So :func:`check_twice_differentiable` walks the forward
graph once per linearisation (a fraction of a millisecond for a 300-node transformer
graph, against 100 ms for its gradient) and raises, naming every custom function
whose ``backward`` is once-differentiable; it also raises on a ``DelayedError`` node
in the gradient graph, the mark PyTorch leaves for other once-differentiable
backwards (compiled modules, higher-order operators), which it cannot name.

>>> import torch
>>> w = torch.ones(2, requires_grad=True)
>>> (g,) = torch.autograd.grad((w**3).sum(), w, create_graph=True)
>>> check_twice_differentiable([g], forward_roots=[w], what="the Hessian")  # fine
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.autograd.function import BackwardCFunction, once_differentiable

__all__ = ["OnceDifferentiableError", "check_twice_differentiable", "once_differentiable_functions"]

#: The node class of ``torch._C._functions.DelayedError`` (named ``Error``).
_ERROR_NODE: type = torch._C._functions.Error  # type: ignore[attr-defined]
_ONCE_WRAPPER_CODE = once_differentiable(lambda ctx, *grads: grads).__code__


class OnceDifferentiableError(RuntimeError):
    """A product needs the derivative of a backward that PyTorch can only run once."""


def _graph_nodes(roots: Iterable[torch.Tensor]) -> Iterable[Any]:
    """Every autograd node reachable from the ``grad_fn`` of ``roots`` (each once)."""
    stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen = {id(node) for node in stack}
    while stack:
        node = stack.pop()
        yield node
        for child, _ in node.next_functions:
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)


def once_differentiable_functions(roots: Iterable[torch.Tensor]) -> list[str]:
    """Names of the custom ``autograd.Function`` classes with a once-differentiable backward.

    Walks the graph of ``roots`` (typically the forward outputs or the loss) and
    returns the qualified class names, in the order first met, without repeats.
    """
    names: list[str] = []
    for node in _graph_nodes(roots):
        if not isinstance(node, BackwardCFunction):
            continue
        cls = getattr(node, "_forward_cls", None)
        backward = getattr(cls, "backward", None)
        if cls is not None and getattr(backward, "__code__", None) is _ONCE_WRAPPER_CODE:
            name = f"{cls.__module__}.{cls.__qualname__}"
            if name not in names:
                names.append(name)
    return names


def check_twice_differentiable(
    gradient_roots: Sequence[torch.Tensor],
    *,
    forward_roots: Sequence[torch.Tensor],
    what: str,
) -> None:
    """Raise if the gradient graph passed through a once-differentiable backward.

    Parameters
    ----------
    gradient_roots
        The first-order results recorded with ``create_graph=True`` that a product
        differentiates again (the gradient for the Hessian, :math:`J^\\top u` for the
        GGN and Fisher).
    forward_roots
        The forward outputs (or the loss), searched for the offending functions to
        name them in the message.
    what
        The quantity being computed, for the message (e.g. ``"the Hessian"``).

    Raises
    ------
    OnceDifferentiableError
        If the graph of ``forward_roots`` holds a custom function with a
        ``@once_differentiable`` backward, or the graph of ``gradient_roots`` a
        ``DelayedError`` node: the products would be silently wrong (zero) there.
    """
    names = once_differentiable_functions(forward_roots)
    if names:
        culprit = (
            "the custom autograd.Function " + ", ".join(repr(n) for n in names) + " has a "
            "backward marked @once_differentiable"
        )
    elif any(isinstance(node, _ERROR_NODE) for node in _graph_nodes(gradient_roots)):
        culprit = (
            "an operation of the model has a backward PyTorch can run only once (a custom "
            "autograd.Function marked @once_differentiable, a torch.compile'd module, ...)"
        )
    else:
        return
    raise OnceDifferentiableError(
        f"Cannot compute products with {what}: {culprit}, so PyTorch cannot differentiate "
        "through it and would silently give zero for its part of every product. Write its "
        "backward with differentiable torch operations (and remove @once_differentiable), "
        "or run the model uncompiled / with that function replaced by torch operations."
    )
