"""Select the parameters a curvature matrix acts on, and map vectors to them.

The curvature matrix of a model with parameter tensors :math:`w_1, \\dots, w_p` acts
on the flat vector :math:`w = (\\mathrm{vec}\\,w_1, \\dots, \\mathrm{vec}\\,w_p)` in the
model's ``named_parameters()`` order.  A parameter shared by several modules (a
tied embedding and output layer) is one tensor and is counted once, under its
first name; its other names select it too (by name, by pattern and by predicate).

``params`` may be

* ``None``: every parameter with ``requires_grad=True``;
* a sequence mixing parameter names (``str``), name patterns (``str`` with ``*``,
  ``?`` or ``[...]``, matched with :func:`fnmatch.fnmatchcase` against every name,
  e.g. ``"transformer.h.*.attn.*"``; ``*`` also matches dots), sub-modules (all
  their parameters) and ``Parameter`` objects of the model;
* a predicate ``f(name, parameter) -> bool``, called once for every name of every
  parameter (``named_parameters(remove_duplicate=False)``, so a tied parameter is
  offered under each of its names); a parameter is selected when the predicate is
  true for any of its names.

Explicit selections may include frozen parameters (``requires_grad=False``): the
products never use or change the flag.  Anything not in the model is refused.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
>>> [n for n, _ in select_params(net, [net[2]])]
['2.weight', '2.bias']
>>> [n for n, _ in select_params(net, "*.bias")]
['0.bias', '2.bias']
>>> [[n for n, _ in g] for g in group_by_layer(select_params(net))]
[['0.weight', '0.bias'], ['2.weight', '2.bias']]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from spectral.errors import argument_error

__all__ = [
    "ParamSpec",
    "flatten_columns",
    "group_by_layer",
    "select_params",
    "unflatten_columns",
]

ParamSpec = None | Callable[[str, nn.Parameter], bool] | Sequence[str | nn.Module | nn.Parameter]


def select_params(model: nn.Module, params: Any = None) -> list[tuple[str, nn.Parameter]]:
    """Return the selected ``(name, parameter)`` pairs in the model's order.

    Raises
    ------
    TypeError
        ``params`` of an unsupported kind.
    ValueError
        Unknown names, modules or parameters that are not part of ``model``, an
        empty selection, or uninitialised parameters of lazy modules.
    """
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", model, kind=TypeError)
    named = list(model.named_parameters())
    lazy = [n for n, p in named if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise argument_error(
            "model",
            "initialised parameters (lazy modules get their shapes from a first forward "
            f"pass: run the model on a batch before building an operator; uninitialised: "
            f"{lazy})",
            model,
        )
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(params) and not isinstance(params, nn.Module):
        hits = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if params(n, p)}
        chosen = [(n, p) for n, p in named if id(p) in hits]
    elif isinstance(params, (str, nn.Module, nn.Parameter)):
        return select_params(model, [params])
    elif isinstance(params, Sequence) or isinstance(params, (set, frozenset)):
        ids: set[int] = set()
        by_name = dict(model.named_parameters(remove_duplicate=False))  # aliases too
        module_ids = {id(m) for m in model.modules()}
        param_ids = {id(p) for _, p in named}
        for item in params:
            if isinstance(item, str) and item not in by_name and _is_pattern(item):
                matches = [id(p) for n, p in by_name.items() if fnmatch.fnmatchcase(n, item)]
                if not matches:
                    raise argument_error(
                        "params",
                        f"a pattern matching parameter names of the model (e.g. "
                        f"{list(by_name)[:4]})",
                        item,
                    )
                ids.update(matches)
            elif isinstance(item, str):
                if item not in by_name:
                    raise argument_error(
                        "params",
                        f"names of parameters of the model (e.g. {list(by_name)[:4]})",
                        item,
                    )
                ids.add(id(by_name[item]))
            elif isinstance(item, nn.Parameter):
                if id(item) not in param_ids:
                    raise argument_error("params", "parameters of the model", item)
                ids.add(id(item))
            elif isinstance(item, nn.Module):
                if id(item) not in module_ids:
                    raise argument_error("params", "sub-modules of the model", item)
                ids.update(id(p) for p in item.parameters())
            else:
                raise argument_error(
                    "params", "names, sub-modules or parameters of the model", item, kind=TypeError
                )
        chosen = [(n, p) for n, p in named if id(p) in ids]
    else:
        raise argument_error(
            "params",
            "None, a predicate (name, param) -> bool, or a sequence of names/modules/parameters",
            params,
            kind=TypeError,
        )
    if not chosen:
        raise argument_error("params", "a selection of at least one parameter", params)
    dtypes = {p.dtype for _, p in chosen}
    devices = {p.device for _, p in chosen}
    if len(dtypes) > 1 or len(devices) > 1:
        raise argument_error(
            "params",
            "parameters sharing one floating dtype and device (select a subset with params=...)",
            f"dtypes {sorted(map(str, dtypes))} on devices {sorted(map(str, devices))}",
        )
    if not chosen[0][1].dtype.is_floating_point:
        raise argument_error("params", "floating-point parameters", chosen[0][1].dtype)
    return chosen


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def group_by_layer(
    named_params: Sequence[tuple[str, nn.Parameter]],
) -> list[list[tuple[str, nn.Parameter]]]:
    """Group parameters by the module that owns them (name without its last part)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in named_params:
        groups.setdefault(name.rpartition(".")[0], []).append((name, p))
    return list(groups.values())


def unflatten_columns(X: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Split the rows of ``X`` (``n x k``) into tensors of shape ``(k, *shape)``.

    >>> shapes = [torch.Size([2, 2]), torch.Size([1])]
    >>> [t.shape for t in unflatten_columns(torch.zeros(5, 2), shapes)]
    [torch.Size([2, 2, 2]), torch.Size([2, 1])]
    """
    k = X.shape[1]
    out = []
    start = 0
    for shape in shapes:
        size = shape.numel()
        out.append(X[start : start + size].T.reshape(k, *shape))
        start += size
    return out


def flatten_columns(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`unflatten_columns`: ``(k, *shape)`` tensors to ``n x k``.

    >>> flatten_columns([torch.ones(2, 3), torch.zeros(2, 1)]).shape
    torch.Size([4, 2])
    """
    k = parts[0].shape[0]
    return torch.cat([p.reshape(k, -1) for p in parts], dim=1).T.contiguous()
