r"""Bitwise records of tensors: has anything changed, however it was changed?

Caches of curvature operators (recorded gradient graphs, K-FAC factors) must be
dropped whenever the model or the data they were computed from changes.  Version
counters do not see every change: an edit through ``.data`` (``w.data.mul_(2)``,
``x.data.copy_(next_batch)``) writes the same storage without bumping the tensor's
version.  A :class:`TensorSnapshot` keeps a copy of the tensors' values and their
identities and compares both, bitwise, on every :meth:`~TensorSnapshot.update`:

* identity: the Python object, dtype, device, storage address and shape of every
  tensor in order (so a reassigned ``Parameter``, ``load_state_dict(assign=True)``,
  a moved or reshaped tensor count as changes);
* values: ``torch.equal`` against the copy (so in-place writes of any kind count).

A tensor with a NaN never equals its copy, so it counts as changed every time
(caches are rebuilt; the operators refuse NaN anyway).  Cost: one copy of the
tensors held, one comparison pass per update.

>>> import torch
>>> w = torch.ones(3)
>>> snap = TensorSnapshot()
>>> snap.update([w]), snap.update([w])
(True, False)
>>> _ = w.data.mul_(2.0)  # no version bump, still seen
>>> w._version, snap.update([w])
(0, True)
>>> snap.generation
2
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["TensorSnapshot", "tensors_in"]


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (a tensor, or nested tuples/lists/mappings), in order.

    >>> [t.shape for t in tensors_in({"ids": (torch.zeros(2, 3),), "mask": torch.ones(2)})]
    [torch.Size([2, 3]), torch.Size([2])]
    """
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        values: Iterable[Any] = value.values()
    elif isinstance(value, (tuple, list)):
        values = value
    else:
        return []
    return [t for v in values for t in tensors_in(v)]


class TensorSnapshot:
    """A bitwise copy of a list of tensors and their identities (see the module).

    Attributes
    ----------
    generation:
        How many times a change was seen (0 before the first :meth:`update`).
    """

    def __init__(self) -> None:
        self.generation = 0
        self._ids: tuple[Any, ...] | None = None
        self._values: list[torch.Tensor] = []

    @staticmethod
    def _identity(tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        return tuple((id(t), t.dtype, t.device, t.data_ptr(), tuple(t.shape)) for t in tensors)

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` are the recorded ones with the recorded values, bitwise."""
        if self._ids is None or self._identity(tensors) != self._ids:
            return False
        unique = list({id(t): t for t in tensors}.values())  # aliases compared once
        return all(torch.equal(t, saved) for t, saved in zip(unique, self._values, strict=True))

    def update(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Record ``tensors`` if they changed; return whether they did (a new generation)."""
        if self.matches(tensors):
            return False
        unique = list({id(t): t for t in tensors}.values())
        with torch.no_grad():
            self._values = [t.detach().clone() for t in unique]
        self._ids = self._identity(tensors)
        self.generation += 1
        return True
