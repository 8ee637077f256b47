"""Optimiser registry: torch's optimisers and ours by (case-insensitive) name.

:func:`get_optimizer` builds an optimiser for a model from a name and keyword
arguments, as in the paper's Table 4 (``optimizer='SGD'``,
``optimizer_kwargs={'lr': 0.01, 'momentum': 0.9}``).  Every
:class:`torch.optim.Optimizer` subclass in ``torch.optim`` is available under its
class name (``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ...);
other packages add theirs with :func:`register_optimizer`.

A factory has the signature ``factory(model: nn.Module, **kwargs) -> Optimizer``.
It receives the model (not its parameters) because curvature-based optimisers
(Lanczos-Newton, K-FAC) need it.  Such an optimiser may set the class or
instance attribute ``curvature_step = True``; :func:`nets.training.train_network`
then calls ``optimizer.step(closure=closure, curvature_batch=(x_c, y_c),
loss_fn=loss_fn)`` instead of the usual ``zero_grad``/``backward``/``step``.

>>> import torch
>>> model = torch.nn.Linear(3, 2)
>>> opt = get_optimizer("sgd", model, lr=0.1, momentum=0.9)
>>> type(opt).__name__, opt.defaults["lr"]
('SGD', 0.1)
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from spectral.errors import argument_error

__all__ = ["available_optimizers", "get_optimizer", "optimizer_options", "register_optimizer"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]

_LOCK = threading.Lock()
# lower-case key -> (display name, factory)
_REGISTRY: dict[str, tuple[str, OptimizerFactory]] = {}


def _torch_factory(cls: type[torch.optim.Optimizer]) -> OptimizerFactory:
    def factory(model: nn.Module | Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
        params = model.parameters() if isinstance(model, nn.Module) else model
        return cls(params, **kwargs)

    functools.update_wrapper(factory, cls, assigned=(), updated=())  # signature: the class's
    factory.__name__ = f"make_{cls.__name__}"
    factory.__doc__ = f"Build :class:`torch.optim.{cls.__name__}` for a model's parameters."
    return factory


def _register_torch_optimizers() -> None:
    for name, obj in vars(torch.optim).items():
        if (
            inspect.isclass(obj)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
            and not name.startswith("_")
        ):
            _REGISTRY[name.lower()] = (name, _torch_factory(obj))


_register_torch_optimizers()


def register_optimizer(name: str, factory: OptimizerFactory, *, overwrite: bool = False) -> None:
    """Make ``factory`` available as ``get_optimizer(name, ...)``.

    Parameters
    ----------
    name:
        The optimiser's name; lookup is case-insensitive, the spelling given
        here is the one listed by :func:`available_optimizers`.
    factory:
        ``factory(model: nn.Module, **kwargs) -> torch.optim.Optimizer``.  An
        optimiser class whose first argument is the model works as is.
    overwrite:
        Replace an existing registration of the same name (otherwise a
        different factory under an existing name raises ``ValueError``;
        registering the same factory again is a no-op).

    Examples
    --------
    A new optimiser is registered with a factory, e.g.
    ``register_optimizer("MySGD", lambda model, **kw: torch.optim.SGD(model.parameters(), **kw))``.
    The registry is global, so the doctest only re-registers an existing entry (a no-op)
    and shows the error for a clash:

    >>> from nets.optim import SWATS
    >>> register_optimizer("SWATS", SWATS)  # the same factory again: nothing changes
    >>> register_optimizer("swats", torch.optim.SGD)
    Traceback (most recent call last):
    ...
    ValueError: ...
    """
    if not isinstance(name, str) or not name:
        raise argument_error("name", "a non-empty string", name, kind=TypeError)
    if not callable(factory):
        raise argument_error(
            "factory", "a callable factory(model, **kwargs)", factory, kind=TypeError
        )
    key = name.lower()
    with _LOCK:
        existing = _REGISTRY.get(key)
        if existing is not None and existing[1] is not factory and not overwrite:
            raise argument_error(
                "name",
                "a name not yet registered (pass overwrite=True to replace it)",
                name,
            )
        _REGISTRY[key] = (name, factory)


def available_optimizers() -> list[str]:
    """Names accepted by :func:`get_optimizer`, sorted case-insensitively.

    Examples
    --------
    >>> {"SGD", "Adam"} <= set(available_optimizers())
    True

    Returns
    -------
    list of str
        The names.
    """
    return sorted((display for display, _ in _REGISTRY.values()), key=str.lower)


def optimizer_options(name: str) -> frozenset[str] | None:
    """The keyword options the optimiser registered as ``name`` accepts, from its signature.

    The factory's signature is read with :func:`inspect.signature` (which follows
    ``__wrapped__``, so a factory made with :func:`functools.update_wrapper` over
    the optimiser class reports the class's options); its first parameter (the model
    or the parameters) is left out.  ``None`` when the factory takes ``**kwargs``
    without saying where they go.

    >>> sorted(optimizer_options("Adam") & {"lr", "betas", "momentum"})
    ['betas', 'lr']
    """
    if not isinstance(name, str):
        raise argument_error("optimizer", "an optimiser name (str)", name, kind=TypeError)
    entry = _REGISTRY.get(name.lower())
    if entry is None:
        raise argument_error("optimizer", f"one of {available_optimizers()}", name)
    try:
        signature = inspect.signature(entry[1])
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None
    params = list(signature.parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in keyword)


def get_optimizer(name: str, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimiser registered as ``name`` (case-insensitive) for ``model``.

    Parameters
    ----------
    name:
        e.g. ``"SGD"``, ``"adam"``, ``"LancGN"`` (once registered).
    model:
        The network (torch optimisers also accept an iterable of parameters or
        parameter groups here).
    **kwargs:
        Passed to the optimiser, e.g. ``lr``, ``momentum``, ``weight_decay``.

    Returns
    -------
    torch.optim.Optimizer
        The optimiser over ``model``'s parameters.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the available names.
    TypeError
        If ``name`` is not a string.

    Examples
    --------
    >>> get_optimizer("NoSuchOpt", torch.nn.Linear(1, 1))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Argument 'optimizer': expected one of ...; received 'NoSuchOpt'.
    """
    if not isinstance(name, str):
        raise argument_error("optimizer", "an optimiser name (str)", name, kind=TypeError)
    entry = _REGISTRY.get(name.lower())
    if entry is None:
        raise argument_error("optimizer", f"one of {available_optimizers()}", name)
    return entry[1](model, **kwargs)
