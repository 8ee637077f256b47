"""``curvops.snapshot``: every kind of change is seen, nothing else is."""

from __future__ import annotations

import math

import torch
from torch import nn

from curvops.snapshot import TensorSnapshot, tensors_in


def _params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    return [net.weight, net.bias]


def test_unchanged_tensors_keep_the_generation() -> None:
    ts = _params()
    snap = TensorSnapshot()
    assert snap.generation == 0 and not snap.matches(ts)
    assert snap.update(ts) and snap.generation == 1
    for _ in range(3):
        assert not snap.update(ts)
    assert snap.generation == 1


def test_every_route_of_change_is_seen() -> None:
    ts = _params()
    snap = TensorSnapshot()
    snap.update(ts)
    version = ts[0]._version
    ts[0].data[0, 0] += 1.0  # no version bump
    assert ts[0]._version == version
    assert snap.update(ts)
    with torch.no_grad():
        ts[1].mul_(-1.0)
    assert snap.update(ts)
    replaced = [ts[0], nn.Parameter(ts[1].detach().clone())]  # same values, new object
    assert snap.update(replaced)
    assert snap.update([ts[0], ts[1]])  # back to the old object
    reshaped = [ts[0].view(-1), ts[1]]
    assert snap.update(reshaped)
    assert snap.generation == 6


def test_the_copy_is_independent_of_later_writes() -> None:
    t = torch.zeros(4)
    snap = TensorSnapshot()
    snap.update([t])
    t.data.fill_(1.0)
    t.data.fill_(0.0)  # written and restored: the same bits again
    assert not snap.update([t])


def test_aliases_are_compared_once_and_by_position() -> None:
    w = torch.ones(2)
    snap = TensorSnapshot()
    snap.update([w, w])
    assert not snap.update([w, w])
    assert snap.update([w, w.clone()])  # no longer the same object in position 1


def test_nan_counts_as_a_change_every_time() -> None:
    t = torch.tensor([1.0, math.nan])
    snap = TensorSnapshot()
    assert snap.update([t]) and snap.update([t])


def test_integer_and_bool_tensors() -> None:
    y = torch.tensor([0, 2, 1])
    mask = torch.tensor([True, False])
    snap = TensorSnapshot()
    snap.update([y, mask])
    y.data[1] = 1
    assert snap.update([y, mask])
    mask.data[1] = True
    assert snap.update([y, mask])


def test_tensors_in_nested_structures() -> None:
    a, b, c = torch.zeros(1), torch.ones(2), torch.zeros(3)
    found = tensors_in({"ids": (a, [b]), "mask": c, "n": 3, "name": "x"})
    assert [id(t) for t in found] == [id(a), id(b), id(c)]
    assert tensors_in(7) == [] and tensors_in(None) == []
