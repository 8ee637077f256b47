"""Which module of a model runs an operation: names the culprit of a missing derivative.

When PyTorch has no second or forward-mode derivative for an operation, its error
names only the ATen operation (``derivative for aten::_cdist_backward is not
implemented``, ``Trying to use forward AD with _cdist_forward ...``), raised deep in a
backward pass where no module is on the stack.  :func:`operation_name` reads the
operation out of such a message; :func:`locate_operation` re-runs one forward pass
with a forward pre-hook / hook pair on every module (a stack of qualified names from
``model.named_modules()``) and a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
that notes the innermost module running the first matching ATen call.  A backward
operation ``X_backward`` is matched by the forward call it differentiates (``X`` or
``X_forward``).  Nothing is paid unless an error occurred: the products record only
a reference to their last forward call (:func:`curvops._model_state.curvature_mode`).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
>>> x = torch.randn(3, 2)
>>> locate_operation(net, "tanh", lambda: net(x))
'1'
>>> operation_name("derivative for aten::_cdist_backward is not implemented")
'_cdist_backward'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch._ops import HigherOrderOperator
from torch.utils._python_dispatch import TorchDispatchMode

from spectral.errors import argument_error

__all__ = [
    "describe_module",
    "first_matching_call",
    "locate_operation",
    "module_stack",
    "operation_name",
    "unsupported_higher_order",
]

_PATTERNS = (
    re.compile(r"derivative for (?:aten::)?'?([\w.]+?)'? is not implemented"),
    re.compile(r"forward AD with (?:aten::)?([\w.]+) that does not support it"),
)


def operation_name(message: str) -> str | None:
    """The ATen operation named by a missing-derivative error message (None: no such name).

    >>> operation_name("Trying to use forward AD with _cdist_forward that does not support it")
    '_cdist_forward'
    """
    for pattern in _PATTERNS:
        found = pattern.search(message)
        if found:
            return found.group(1).split(".")[0]
    return None


def _matches(op: str) -> Callable[[str], bool]:
    base = op.removesuffix("_backward")
    exact = {op, base, base + "_forward"}
    return lambda name: name in exact


class _FirstCall(TorchDispatchMode):
    """Notes the innermost module (``stack[-1]``) and the operation of the first ATen call
    for which ``match(func, args, kwargs, out)`` holds.

    Higher-order operators (``flex_attention``, ``torch.cond``, ...), which a dispatch
    mode must handle itself, are noted in ``higher_order`` as ``(module, operator name)``
    (in order, each once) and passed to ``on_higher_order(module, name)``, which may
    raise; then they run as without the mode (their inner ATen calls unseen).
    """

    supports_higher_order_operators = True

    def __init__(
        self,
        match: Callable[..., bool],
        stack: list[str],
        on_higher_order: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__()
        self.match, self.stack = match, stack
        self.on_higher_order = on_higher_order
        self.found: str | None = None
        self.op: str | None = None
        self.higher_order: list[tuple[str, str]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if isinstance(func, HigherOrderOperator):  # called with this mode popped
            seen = (self.stack[-1] if self.stack else "", str(func.name()))
            if seen not in self.higher_order:
                self.higher_order.append(seen)
            if self.on_higher_order is not None:
                self.on_higher_order(*seen)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.found is None and self.match(func, args, kwargs, out):
            self.found = self.stack[-1] if self.stack else ""
            self.op = getattr(func, "_opname", str(func))
        return out


@contextmanager
def module_stack(model: nn.Module) -> Iterator[list[str]]:
    """A list holding the qualified names of the modules of ``model`` whose forward is
    running, innermost last, while the context is open (hooks removed on exit).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> seen = []
    >>> with module_stack(net) as stack:
    ...     _ = net[0].register_forward_pre_hook(lambda *_: seen.append(list(stack)))
    ...     _ = net(torch.ones(1, 2))
    >>> seen
    [['', '0']]
    """
    stack: list[str] = []
    handles = []

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            stack.append(name)

        return hook

    def leave(*_: Any) -> None:
        if stack:
            stack.pop()

    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def first_matching_call(
    model: nn.Module,
    match: Callable[..., bool],
    *,
    on_higher_order: Callable[[str, str], None] | None = None,
) -> Iterator[_FirstCall]:
    """While open, notes the first ATen call inside ``model``'s modules for which
    ``match(func, args, kwargs, out)`` holds: the context's value has ``found`` (the
    module's qualified name, ``""`` for the model's own forward) and ``op`` (the ATen
    operation), both None while no call matched.  Higher-order operators are noted in
    its ``higher_order`` (``(module, name)`` pairs) and passed to
    ``on_higher_order(module, name)`` (which may raise, e.g.
    :func:`unsupported_higher_order`) before they run.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
    >>> with first_matching_call(net, lambda f, *_: "tanh" in str(f)) as call:
    ...     _ = net(torch.ones(1, 2))
    >>> call.found, call.op
    ('1', 'tanh')
    """
    with module_stack(model) as stack:
        mode = _FirstCall(match, stack, on_higher_order)
        with mode:
            yield mode


def locate_operation(model: nn.Module, op: str, run: Callable[[], Any]) -> str | None:
    """Qualified name of the innermost module whose forward runs ``op`` first in ``run()``.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose modules are watched.
    op : str
        An ATen operation name (``"_cdist_backward"`` matches ``_cdist_forward``).
    run : callable
        One forward pass of ``model``; whatever it raises is ignored.

    Returns
    -------
    str or None
        The name in ``model.named_modules()`` (``""`` for the model itself), or None
        when no module ran the operation (e.g. it runs in the loss).

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> locate_operation(net, "addmm", lambda: net(torch.ones(1, 2)))
    '0'
    """
    named = _matches(op)
    with first_matching_call(model, lambda func, *_: named(getattr(func, "_opname", ""))) as call:
        try:
            run()
        except Exception:  # the diagnostic pass may fail like the product did
            pass
    return call.found


def describe_module(model: nn.Module, name: str) -> str:
    """``"module 'blocks.0.attn' (Attention)"``, or ``"the model's own forward (Net)"``.

    >>> import torch
    >>> describe_module(torch.nn.Sequential(torch.nn.Tanh()), "0")
    "module '0' (Tanh)"
    """
    if not name:
        return f"the model's own forward ({type(model).__name__})"
    return f"module '{name}' ({type(model.get_submodule(name)).__name__})"


def unsupported_higher_order(model: nn.Module, module: str, name: str) -> ValueError:
    """The error for a model whose ``module`` calls the higher-order operator ``name``.

    A higher-order operator (``flex_attention``, ``torch.cond``, ``while_loop``, ...)
    runs a subgraph as one operation with derivative rules of its own, and curvature
    products, which differentiate twice or push tangents forward through every
    operation, are not supported through them (``flex_attention`` has no backward at all
    on the CPU; the products through ``torch.cond`` stop with "This higher order
    operator doesn't work unless it is captured completely with torch.compile").  The
    construction's forward pass refuses them (:func:`curvops.precision.precision_loss_noted`)
    rather than leave the products to fail on a dispatch-mode error.

    >>> import torch
    >>> str(unsupported_higher_order(torch.nn.Linear(1, 1), "", "cond"))[:40]
    "Argument 'model': expected a model whose"
    """
    hint = (
        " (use attn_implementation='sdpa' or 'eager': "
        "from_pretrained(..., attn_implementation='sdpa') or "
        "model.set_attn_implementation('sdpa'); both give exact products)"
        if "flex_attention" in name
        else " (compute that part with ordinary torch operations)"
    )
    error = argument_error(
        "model",
        "a model whose forward pass uses no higher-order operator (curvature products "
        "differentiate every operation twice or push tangents forward through it, which "
        "higher-order operators such as flex_attention and torch.cond do not support)" + hint,
        f"a forward pass in which {describe_module(model, module)} calls {name}, a "
        "higher-order operator not supported for curvature products",
    )
    assert isinstance(error, ValueError)
    return error
