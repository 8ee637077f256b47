"""A DataLoader with ``persistent_workers=True`` keeps the iterator of its first ``iter()``
and reuses it in every later one.  An operator's pass (or a tracker's reading of its
measurement set) left such an iterator behind, so the user's next epoch reused it instead
of drawing its base seed from the loader's generator: a different shuffle, a tracked run
no longer bit-identical to the untracked one.  Passes now use private iterators and shut
their workers down."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvops import GGNOperator, HessianOperator
from nets import CurvatureTracker


def _loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(16, 4, generator=g), torch.arange(16) % 3)
    return DataLoader(
        data,
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(5),
        num_workers=1,
        persistent_workers=True,
    )


def _epochs(loader: DataLoader[Any], between: Any = None, epochs: int = 2) -> list[list[int]]:
    """Targets of every batch of ``epochs`` epochs; ``between(loader)`` runs after the
    first batch of each epoch (mid-epoch, while the user's iterator is live)."""
    seen = []
    for _ in range(epochs):
        for i, (_, y) in enumerate(loader):
            seen.append(y.tolist())
            if i == 0 and between is not None:
                between()
    return seen


def test_operator_passes_leave_the_users_persistent_iterator_alone() -> None:
    reference = _epochs(_loader())
    loader = _loader()
    ops = [
        cls(nn.Linear(4, 3), nn.CrossEntropyLoss(), loader)
        for cls in (HessianOperator, GGNOperator)
    ]
    assert loader._iterator is None  # building read the loader without keeping an iterator

    def products() -> None:
        for op in ops:
            op.matvec(np.ones(op.shape[0], dtype=op.dtype))

    assert _epochs(loader, products) == reference
    # the operators' passes are the same fixed data every time
    v = np.ones(ops[0].shape[0], dtype=ops[0].dtype)
    np.testing.assert_array_equal(ops[0].matvec(v), ops[0].matvec(v))


def test_a_tracked_run_on_a_persistent_loader_is_bit_identical() -> None:
    def run(track: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = _loader()
        tracker = (
            CurvatureTracker(model, nn.CrossEntropyLoss(), loader, every=2, top_k=1)
            if track
            else None
        )
        for _ in range(2):
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                if tracker is not None:
                    tracker.step()
        assert tracker is None or len(tracker.rows) == 4
        assert loader.generator is not None
        return [p.detach().clone() for p in model.parameters()], loader.generator.get_state()

    (plain, plain_state), (tracked, tracked_state) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, tracked))
    assert torch.equal(plain_state, tracked_state)


@pytest.mark.parametrize("workers", [0, 1], ids=["in process", "persistent worker"])
def test_a_sharded_loader_of_whole_batches_leaves_the_users_epochs_alone(workers: int) -> None:
    # shard_batches(DataLoader(batch_size=None)) called iter() on the loader (its base
    # seed drawn from the generator) and read it outside the replayed streams
    from curvops.distributed import shard_batches

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g))] * 4
    batches = [(x + i, y) for i, (x, y) in enumerate(batches)]

    def loader() -> DataLoader[Any]:
        return DataLoader(
            batches, batch_size=None, shuffle=True, num_workers=workers,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(1),
        )  # fmt: skip

    def epochs(between: bool) -> list[list[float]]:
        data = loader()
        first = [float(x[0, 0]) for x, _ in data]
        if between:
            op = GGNOperator(nn.Linear(4, 3), nn.CrossEntropyLoss(), shard_batches(data, 0, 1))
            op.matvec(np.ones(op.shape[0], dtype=op.dtype))
        return [first, [float(x[0, 0]) for x, _ in data]]

    assert epochs(True) == epochs(False)
