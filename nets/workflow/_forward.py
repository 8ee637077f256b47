"""The model on a batch, in the input and output forms the curvature operators accept.

The workflows evaluate the model (losses, accuracies, BatchNorm statistics) on the same
batches the :mod:`curvops` operators take their curvature on, so they accept the same
forms (:mod:`curvops.data`, :mod:`curvops.model_io`):

* a batch is ``(inputs, targets)`` (further items are ignored);
* ``inputs`` is a tensor (``model(x)``), a tuple/list of positional inputs
  (``model(*x)``) or a mapping of keyword inputs (``model(**x)``, e.g. a Hugging Face
  model's ``{"input_ids", "attention_mask"}``), moved to the model's device with
  floating tensors cast to its dtype (:func:`curvops.data.move_to`);
* the loss takes the tensor :func:`curvops.model_io.select_output` chooses: the output
  itself, the ``logits`` of a dict or ``ModelOutput``, the first item of a tuple, or
  what ``output_fn`` returns.

>>> import torch
>>> class Net(torch.nn.Module):
...     def forward(self, a, b):
...         return {"logits": a + b, "aux": a}
>>> inputs, targets = batch_pair(({"a": torch.ones(2), "b": torch.ones(2)}, torch.zeros(2)), 0)
>>> model_output(Net(), inputs)
tensor([2., 2.])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from curvops.data import dict_batch_error
from curvops.model_io import OutputFn, select_output
from spectral.errors import argument_error

__all__ = ["batch_pair", "call_model", "model_output"]


def batch_pair(batch: Any, index: int, argument: str = "dataset") -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of one batch of a loader (items past the second ignored).

    Raises
    ------
    ValueError
        Naming ``argument (batch index)``: a dict batch (with the supported forms, as the
        operators say) or anything else that is not a sequence ``(inputs, targets, ...)``
        with a tensor of targets.

    >>> batch_pair([torch.zeros(2, 1), torch.ones(2)], 0)[1]
    tensor([1., 1.])
    """
    where = f"{argument} (batch {index})"
    if isinstance(batch, Mapping):
        raise dict_batch_error(where, batch)
    if (
        not isinstance(batch, (tuple, list))
        or len(batch) < 2
        or not isinstance(batch[1], torch.Tensor)
    ):
        raise argument_error(where, "a pair (inputs, targets) with a tensor of targets", batch)
    return batch[0], batch[1]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, ``model(*inputs)`` for a tuple/list or ``model(**inputs)`` for a
    mapping (the raw output).

    >>> call_model(torch.nn.Identity(), {"input": torch.ones(1)})
    tensor([1.])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def model_output(model: nn.Module, inputs: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The output tensor the loss takes: :func:`curvops.model_io.select_output` of
    :func:`call_model` (``TypeError`` naming the model output when it is not a tensor).

    >>> model_output(torch.nn.Identity(), (torch.ones(1),), lambda out: 2 * out)
    tensor([2.])
    """
    return select_output(call_model(model, inputs), output_fn)
