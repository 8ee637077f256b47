"""Tensor hooks that curvature products do not register.

A hook put on an intermediate tensor by ``forward`` or by the loss
(``h.register_hook(lambda g: 0.5 * g)``: gradient scaling or reversal, a Grad-CAM
recorder, a logging hook) changes the gradients autograd computes, not the function:
a curvature is a property of the forward function and the loss, so during products
such registrations return a handle that removes nothing and register nothing
(:data:`INERT_HOOKS`, used by :class:`curvops.determinism.DropoutOffMode` in forward
passes and by :func:`evaluate_loss` for every loss evaluation of curvops).  Module
backward hooks are switched off by :func:`curvops._model_state.curvature_mode` for
the same reason.  Hooks on autograd nodes (``h.grad_fn.register_hook``) do not pass
through ``__torch_function__`` and cannot be held back this way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

__all__ = ["INERT_HOOKS", "evaluate_loss"]

#: The registry of the handles :data:`INERT_HOOKS` returns (always empty).
_NO_HOOKS: OrderedDict[int, Any] = OrderedDict()


def _inert_hook(*args: Any, **kwargs: Any) -> RemovableHandle:
    """A handle that removes nothing, for a tensor hook registered during a product's
    forward pass (and not registered: see :data:`INERT_HOOKS`)."""
    return RemovableHandle(_NO_HOOKS)


#: Tensor-hook registrations answered by :func:`_inert_hook` during products' forward
#: passes: the curvature is that of the forward function, as with module backward hooks.
INERT_HOOKS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.Tensor.register_hook: _inert_hook,
    torch.Tensor.register_post_accumulate_grad_hook: _inert_hook,
}


class _InertHooksMode(TorchFunctionMode):
    """Register no tensor hooks (:data:`INERT_HOOKS`); run everything else unchanged."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        replacement = INERT_HOOKS.get(func)
        if replacement is not None:
            return replacement(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def evaluate_loss(loss_fn: Callable[..., Any], outputs: Any, targets: Any) -> Any:
    """``loss_fn(outputs, targets)`` with the tensor hooks it registers inert.

    A loss that puts a hook on the model outputs (``o.register_hook(lambda g: 0.5 * g)``,
    a gradient-reversal or logging hook) changes the gradients autograd computes, not
    the loss: the curvature is that of the loss as a function, so the hook is neither
    registered nor called (see :data:`INERT_HOOKS` and the module docstring).

    >>> import torch
    >>> def loss(o, t):
    ...     o.register_hook(lambda g: 0.0 * g)
    ...     return ((o - t) ** 2).sum()
    >>> o = torch.ones(2, requires_grad=True)
    >>> torch.autograd.grad(evaluate_loss(loss, o, torch.zeros(2)), o)[0]
    tensor([2., 2.])
    """
    with _InertHooksMode():
        return loss_fn(outputs, targets)
