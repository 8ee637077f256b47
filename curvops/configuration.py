r"""Has a model's or a loss's configuration changed since the operator last looked?

An operator is the curvature of its model and loss as they are now (contract 2).
Besides parameters and buffers, a product depends on their *configuration*:
``model.temperature = 2.0``,
``layer_norm.eps = 1e-3``, a forward hook registered after construction, a mask kept
as a plain tensor attribute and edited in place, ``loss.label_smoothing = 0.1``,
``loss.ignore_index = pad``, ``loss.reduction = "sum"``, an in-place edit of the
class weights (``loss.weight.mul_(w)``, also through ``.data``).  The operators cache
what they derive from these (recorded gradient graphs, the output Hessian prepared
with a graph, K-FAC factors), so they compare the model and the loss with a
:class:`ConfigurationState` in every product and drop their caches when either
changed; a changed loss also passes the construction checks again (a NaN or negative
class weight written after construction is refused like one given at construction).

What :func:`configuration_of` records:

* for every module of an ``nn.Module`` (submodules included): its type and its public
  attributes, numbers, strings, booleans and ``None`` by value, tensors bitwise,
  anything else (a function, a config object) by identity; the handles of its forward,
  backward and pre-hooks; and the global module hooks;
* for a :func:`functools.partial`: the function, the positional and keyword arguments;
* for another object with attributes (:class:`curvops.losses.DeclaredLoss`): its public
  attributes;
* the parameters and buffers of a module (a loss's ``weight``/``pos_weight``), bitwise
  (:class:`curvops.snapshot.TensorSnapshot`: an optimiser step, a ``.data`` edit,
  ``load_state_dict``, a reassigned ``Parameter``).

Not visible: a plain function's closure or globals, attributes of an object held by
identity (``model.config.x = ...`` of a config object) and private (``_``) attributes.
A tensor attribute that carries an autograd graph (an activation a ``forward`` keeps,
``self.last_attention = weights``) is recorded as such, not by value: it changes at
every forward pass and is not configuration.

>>> import torch
>>> loss = torch.nn.CrossEntropyLoss(weight=torch.ones(3))
>>> state = ConfigurationState(loss)
>>> state.update(), state.update()
(True, False)
>>> loss.label_smoothing = 0.1
>>> state.update()
True
>>> _ = loss.weight.data.mul_(2.0)  # no version bump, still seen
>>> state.update(), state.generation
(True, 3)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from curvops.snapshot import TensorSnapshot

__all__ = ["ConfigurationState", "configuration_of"]

_BY_VALUE = (bool, int, float, complex, str, bytes, type(None))
_SCALARS = frozenset(_BY_VALUE)

#: per-module hook registries whose handles are recorded
_MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
#: the global registries of ``torch.nn.modules.module``
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _by_value(value: Any) -> bool:
    if type(value) in _SCALARS or isinstance(value, _BY_VALUE):
        return True
    return isinstance(value, tuple) and all(_by_value(v) for v in value)


def _record(
    name: Any,
    value: Any,
    settings: list[tuple[Any, ...]],
    tensors: list[torch.Tensor],
    held: list[Any],
) -> None:
    """Append ``(name, kind, value)``: by value, by identity (``id``, the object kept
    alive in ``held`` so that its id cannot be reused) or a tensor (compared bitwise)."""
    kind = type(value)
    if kind in _SCALARS:  # the common case first
        settings.append((name, kind, value))
    elif isinstance(value, torch.Tensor):
        if value.grad_fn is not None:  # an activation kept by forward, not a setting
            settings.append((name, "activation", None))
        else:
            settings.append((name, "tensor", None))
            tensors.append(value)
    elif _by_value(value):
        settings.append((name, kind, value))
    else:
        settings.append((name, "id", id(value)))
        held.append(value)


def _hook_handles(registries: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    """``(count, newest handle id)`` of each registry: handle ids only grow, so any
    registration changes the newest id and any removal alone the count."""
    out = []
    for name in names:
        hooks = registries.get(name)
        out.append((len(hooks), next(reversed(hooks))) if hooks else (0, None))
    return tuple(out)


def configuration_of(
    obj: Any,
) -> tuple[tuple[tuple[Any, ...], ...], list[torch.Tensor], list[Any]]:
    """The settings and the tensors of ``obj`` that :class:`ConfigurationState` compares.

    Parameters
    ----------
    obj : Any
        A model, a loss (module, partial, object with attributes) or a plain function.

    Returns
    -------
    (tuple of (name, kind, value), list of torch.Tensor, list)
        The settings, comparable with ``==`` (objects compared by identity appear as
        their ``id``), the tensors to compare bitwise, and the objects whose ids the
        settings hold (keep them alive while the settings are kept).

    Examples
    --------
    >>> loss = torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(2))
    >>> settings, tensors, _ = configuration_of(loss)
    >>> [s[0][1] for s in settings if s[1] != "<hooks>"], [tuple(t.shape) for t in tensors]
    (['training', 'reduction'], [(2,)])
    """
    settings: list[tuple[Any, ...]] = []
    tensors: list[torch.Tensor] = []
    held: list[Any] = []
    if isinstance(obj, functools.partial):
        _record("func", obj.func, settings, tensors, held)
        for i, arg in enumerate(obj.args):
            _record(i, arg, settings, tensors, held)
        for key in sorted(obj.keywords):
            _record(key, obj.keywords[key], settings, tensors, held)
        return tuple(settings), tensors, held
    if isinstance(obj, nn.Module):
        tensors += [t for _, t in obj.named_parameters(remove_duplicate=False)]
        tensors += [t for _, t in obj.named_buffers(remove_duplicate=False)]
        settings.append(("", "<hooks>", _hook_handles(vars(_module), _GLOBAL_HOOKS)))
        # modules by identity (a replaced module is a new object), in registration order
        objects: list[tuple[Any, Any]] = [(id(m), m) for m in obj.modules()]
        held += [m for _, m in objects]
        for key, module in objects:
            held.append(type(module))
            registries = vars(module)
            hooks = (
                _hook_handles(registries, _MODULE_HOOKS)
                if any(registries.get(name) for name in _MODULE_HOOKS)
                else None  # the common case: no hooks
            )
            settings.append((key, "<hooks>", id(type(module)), hooks))
    elif hasattr(obj, "__dict__") and not callable(getattr(obj, "__code__", None)):
        objects = [("", obj)]  # an object with settings (a plain function has none)
    else:
        return tuple(settings), tensors, held
    scalars = _SCALARS
    for owner_key, owner in objects:
        for key, value in vars(owner).items():
            if key[0] == "_":
                continue
            kind = type(value)
            if kind in scalars or (  # the common cases, inline
                kind is tuple and all(type(v) in scalars for v in value)
            ):
                settings.append(((owner_key, key), kind, value))
            else:
                _record((owner_key, key), value, settings, tensors, held)
    return tuple(settings), tensors, held


class ConfigurationState:
    """The last seen configuration of a model or loss, and a generation counting changes.

    :meth:`update` compares the object with the record and renews it; ``generation``
    grows by one with every change (the first update counts as one).  Cost per update:
    a walk over the modules' attributes and one bitwise comparison pass over the
    recorded tensors (:math:`O(P)` for a model, whose copy is held).

    Parameters
    ----------
    obj : Any
        The model or the loss.
    """

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self._settings: tuple[tuple[Any, ...], ...] | None = None
        self._held: list[Any] = []  # the objects whose ids the settings hold
        self._tensors = TensorSnapshot()
        self.generation = 0

    def update(self, check: Callable[[], Any] | None = None) -> bool:
        """True (and ``generation`` incremented) when the object changed since the last call.

        ``check`` runs when it changed, before the new state is recorded: if it raises,
        the record stays as it was, so the next update sees the change again (a refused
        setting is refused in every product, never taken as the new normal).
        """
        settings, tensors, held = configuration_of(self._obj)
        if settings == self._settings and self._tensors.matches(tensors):
            return False
        if check is not None:
            check()
        self._settings, self._held = settings, held
        self._tensors.update(tensors)
        self.generation += 1
        return True
