"""Contract 1 ("one fixed matrix"): every pass over a DataLoader sees the same batches;
loaders that shuffle, drop samples, augment at random or use workers are replayed
without touching the user's random streams, and one that cannot be replayed is
refused at the first differing pass."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from curvops import FisherOperator, GGNOperator, HessianOperator

N = 13


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Samples with noise from the global torch, numpy and Python streams."""

    def __init__(self, noise: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 3, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 2, (N,), generator=g)
        self.noise = noise

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.noise:
            x = x + 0.1 * torch.randn(3, dtype=torch.float64)
            x = x + 0.1 * np.random.rand() + 0.1 * random.random()  # noqa: NPY002
        return x, self.y[i]


class Drifting(Augmented):
    """A dataset that changes with every access (cannot be replayed)."""

    def __init__(self) -> None:
        super().__init__(noise=False)
        self.calls = 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.x[i] + self.calls // N, self.y[i]


LOADERS: dict[str, dict[str, Any]] = {
    "shuffle": {"shuffle": True},
    "shuffle-generator": {"shuffle": True, "generator": "own"},
    "drop_last": {"shuffle": True, "drop_last": True},
    "augmentation": {"noise": True},
    "workers": {"shuffle": True, "noise": True, "num_workers": 2, "drop_last": True},
}


def _loader(kind: str) -> DataLoader[Any]:
    options = dict(LOADERS[kind])
    dataset = Augmented(options.pop("noise", False))
    if options.get("generator") == "own":
        options["generator"] = torch.Generator().manual_seed(123)
    return DataLoader(dataset, batch_size=5, **options)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def _streams(loader: DataLoader[Any]) -> tuple[Any, ...]:
    g = loader.generator
    return (
        torch.get_rng_state(),
        np.random.get_state()[1].copy(),  # noqa: NPY002
        random.getstate(),
        None if g is None else g.get_state(),
    )


def _assert_same_streams(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert torch.equal(a[0], b[0])
    assert np.array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert (a[3] is None and b[3] is None) or torch.equal(a[3], b[3])


OPERATORS = {
    "hessian": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d, bn_mode="train"),
    "ggn": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, bn_mode="train"),
    "fisher": lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d, bn_mode="train"),
}


# Python >= 3.12 warns when worker processes are forked from a process with threads.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("op_name", sorted(OPERATORS))
@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_loader_replayed_bitwise(kind: str, op_name: str) -> None:
    if kind == "workers" and op_name != "hessian":
        pytest.skip("worker processes: one operator kind is enough (the data path is shared)")
    loader = _loader(kind)
    model = _model()
    make = OPERATORS[op_name]
    op = make(model, loader)
    random.seed(7)
    streams = _streams(loader)
    v = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first = op @ v
    second = op @ v
    _assert_same_streams(_streams(loader), streams)
    assert torch.equal(first, second)
    # the same samples as a fixed list of batches
    fixed = [(b.inputs, b.targets) for b in op.data]
    assert torch.equal(make(model, fixed) @ v, first)
    # another operator on the same loader: the same matrix
    assert torch.equal(make(model, loader) @ v, first)
    _assert_same_streams(_streams(loader), streams)


def test_drop_last_sample_count_and_repr() -> None:
    op = HessianOperator(_model(), nn.CrossEntropyLoss(), _loader("drop_last"))
    assert op.num_samples == 10
    assert "on 10 of 13 samples" in repr(op)
    listed = HessianOperator(
        _model(), nn.CrossEntropyLoss(), [(b.inputs, b.targets) for b in op.data]
    )
    assert "on 10 samples in 2 batches" in repr(listed)


def test_unreplayable_loader_refused_at_first_differing_pass() -> None:
    loader = DataLoader(Drifting(), batch_size=5)
    op = HessianOperator(_model(), nn.CrossEntropyLoss(), loader)
    v = torch.ones(op.shape[0], dtype=torch.float64)
    op @ v  # first pass: recorded
    streams = _streams(loader)
    with pytest.raises(ValueError, match=r"Argument 'data'.*batch 0 of pass 2 differs") as info:
        op @ v
    assert "pass the batches as a list" in str(info.value)
    _assert_same_streams(_streams(loader), streams)


class Passes:
    """A re-iterable that yields ``counts[k]`` batches on pass ``k``."""

    def __init__(self, counts: list[int]) -> None:
        ds = Augmented(noise=False)
        self.batches = [(ds.x[i : i + 3], ds.y[i : i + 3]) for i in range(0, 12, 3)]
        self.counts = counts
        self.passes = 0

    def __iter__(self) -> Any:
        self.passes += 1
        return iter(self.batches[: self.counts[self.passes - 1]])


@pytest.mark.parametrize(
    ("counts", "message"),
    # the first entry: the construction-time check reads the first batch of a pass
    [([2, 2, 3], "pass 2 yields more than the 2 batches"), ([3, 3, 2], "pass 2 yields 2 batches")],
)
def test_loader_with_another_batch_count_refused(counts: list[int], message: str) -> None:
    op = HessianOperator(_model(), nn.CrossEntropyLoss(), Passes(counts))
    v = torch.ones(op.shape[0], dtype=torch.float64)
    op @ v
    with pytest.raises(ValueError, match=f"Argument 'data'.*{message}"):
        op @ v


def test_user_streams_untouched_after_error_mid_pass() -> None:
    loader = _loader("augmentation")
    calls = {"n": 0}

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    op = HessianOperator(_model(), loss, loader)
    calls["n"] = 1  # the construction's calls of the loss (its checks) count as one
    streams = _streams(loader)
    with pytest.raises(RuntimeError, match="boom"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    _assert_same_streams(_streams(loader), streams)
