"""CurvatureTracker(blocks=...): labels that are empty or equal after ``str()`` are refused
naming ``blocks`` (the empty label replaced the whole-model measurement, and ``1`` with
``"1"`` kept one block of the two)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nets.tracker import CurvatureTracker


def net_and_data() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, dtype=torch.float64, generator=g)
    return net, (x, torch.randint(0, 3, (10,), generator=g))


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ({"": ["0.weight"], "w2": ["2.weight"]}, r"non-empty block names.*received ''"),
        ({1: ["0.weight"], "1": ["2.weight"]}, r"distinct after str\(\).*\[1, '1'\]"),
    ],
    ids=["empty", "collision"],
)
def test_empty_and_colliding_block_labels_are_refused(blocks, message):
    net, data = net_and_data()
    with pytest.raises(ValueError, match=rf"Argument 'blocks'.*{message}"):
        CurvatureTracker(net, nn.CrossEntropyLoss(), data, every=1, top_k=2, blocks=blocks)


def test_non_string_labels_that_stay_distinct_are_kept():
    net, data = net_and_data()
    loss = nn.CrossEntropyLoss()
    tracker = CurvatureTracker(
        net, loss, data, every=1, top_k=1, tol=1e-8, blocks={1: ["0.weight"], 2: ["2.weight"]}
    )
    row = tracker.step()
    assert sorted(row["blocks"]) == ["1", "2"]
    whole = CurvatureTracker(net, loss, data, every=1, top_k=1, tol=1e-8).step()
    assert row["top_eigenvalues"] == pytest.approx(whole["top_eigenvalues"], rel=1e-7)
