"""Which tensor of a model's output the curvature is taken of.

Curvature operators need one output tensor :math:`f(x; w)` per batch, the argument
of the loss :math:`L(f, y)`.  Models return more than that: Hugging Face models a
``ModelOutput`` (an ordered dict with ``logits``, ``past_key_values``,
``hidden_states`` ...), others a tuple ``(logits, aux)`` or a dict.  By default

* a tensor is used as it is;
* a mapping (``dict``, ``ModelOutput``) gives its ``"logits"`` entry, or, without
  one, its first tensor value;
* a tuple or list gives its first element;

and an ``output_fn`` (``output -> tensor``, e.g. ``lambda out: out.start_logits`` or
``operator.itemgetter(1)``) chooses anything else.  The selection is applied inside
every product, so the curvature is that of :math:`L(\\text{output\\_fn}(\\text{model}(x)), y)`.

>>> import torch
>>> select_output({"loss": torch.zeros(()), "logits": torch.ones(1, 2)})
tensor([[1., 1.]])
>>> select_output((torch.ones(2), torch.zeros(3))).shape
torch.Size([2])
>>> select_output({"a": 1}, lambda out: torch.tensor([out["a"]]))
tensor([1])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from spectral.errors import argument_error

__all__ = ["OutputFn", "check_output_fn", "select_output"]

OutputFn = Callable[[Any], torch.Tensor]


def check_output_fn(output_fn: Any) -> OutputFn | None:
    """Validate ``output_fn``: ``None`` or a callable ``output -> tensor``.

    Raises
    ------
    TypeError
        If ``output_fn`` is neither ``None`` nor callable.

    >>> check_output_fn(None) is None
    True
    """
    if output_fn is not None and not callable(output_fn):
        raise argument_error(
            "output_fn", "None or a callable (model output) -> tensor", output_fn, kind=TypeError
        )
    return output_fn


def _default(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        return next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
    if isinstance(output, (tuple, list)) and len(output) > 0:
        return output[0]
    return None


def select_output(output: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The tensor of ``output`` the loss is applied to (see the module docstring).

    Parameters
    ----------
    output:
        What the model's ``forward`` returned.
    output_fn:
        ``None`` for the default selection, or a callable ``output -> tensor``.

    Raises
    ------
    TypeError
        If the selection is not a tensor (the message names the output's type and,
        for a mapping, its keys).
    """
    chosen = _default(output) if output_fn is None else output_fn(output)
    if not isinstance(chosen, torch.Tensor):
        got = type(output).__name__
        if isinstance(output, Mapping):
            got += f" with keys {list(output)}"
        how = (
            "the tensor that output_fn returns"
            if output_fn is not None
            else (
                "a tensor, a mapping with a 'logits' tensor, or a tuple whose first item is a "
                "tensor (pass output_fn= to choose another part of the output)"
            )
        )
        raise argument_error("model output", how, got, kind=TypeError)
    return chosen
