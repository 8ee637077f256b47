"""What a landscape point is evaluated on: one sequential pass over the split, and
BatchNorm statistics refreshed as exact pooled statistics of that pass.

* ``make_eval_loader`` handed back a user's shuffled DataLoader (or one with
  ``drop_last=True``) unchanged, so each landscape point saw another order or subset:
  one direction evaluated twice gave 1.136378 and 1.133055 against 1.136864 for the
  full split.  It now rebuilds one sequential pass (same batch size and collate_fn).
* ``_refresh_bn`` used torch's cumulative average (``momentum=None``): every batch
  weighted equally and the within-batch variances averaged, 3.5 % off the split's
  statistics with batches of 32 and 18 samples.  It now pools exact counts, means and
  squared deviations per module (Chan et al.), in train-mode forwards as ``update_bn``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from nets.workflow import build_loss_landscape
from nets.workflow._resolve import make_eval_loader
from nets.workflow.landscape import _refresh_bn


def _xy(n: int = 50, shape: tuple[int, ...] = (4,)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    x[32:] += 3.0  # the last (short) batch is shifted: its statistics differ
    return x, torch.randint(0, 3, (n,), generator=g)


def _collate(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batch)
    return torch.stack(xs), torch.stack(ys)


def test_make_eval_loader_rebuilds_a_shuffled_loader_as_one_sequential_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x, y = _xy()
    dataset = TensorDataset(x, y)
    shuffled = DataLoader(dataset, batch_size=16, shuffle=True, drop_last=True, collate_fn=_collate)
    with caplog.at_level(logging.INFO, logger="nets.workflow._resolve"):
        loader = make_eval_loader(shuffled, 256)
    assert "rebuilt as one sequential pass" in caplog.text
    assert loader is not shuffled and isinstance(loader.sampler, SequentialSampler)
    assert loader.batch_size == 16 and not loader.drop_last and loader.collate_fn is _collate
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    sequential = DataLoader(dataset, batch_size=16)
    assert make_eval_loader(sequential, 256) is sequential  # already one pass: kept
    items: Any = [(x[:8], y[:8]), (x[8:], y[8:])]  # a list of batches, no automatic batching
    unbatched: DataLoader[Any] = DataLoader(items, batch_size=None, shuffle=True)
    rebuilt = make_eval_loader(unbatched, 256)
    assert [len(b[1]) for b in rebuilt] == [8, 42]  # each item stays a batch, in order


def test_landscape_of_a_shuffled_loader_is_the_full_split() -> None:
    x, y = _xy()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    size = sum(p.numel() for p in model.parameters())
    v = torch.randn(size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v /= v.norm()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, drop_last=True)
    result = build_loss_landscape(
        loader, model=model, dist=1.0, n_points=3, directions=[v, v.clone()], device="cpu"
    )
    moved = copy.deepcopy(model)
    theta = nn.utils.parameters_to_vector(moved.parameters()) + v
    nn.utils.vector_to_parameters(theta, moved.parameters())
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(moved(x), y))
    assert result.train_loss[0, 2] == result.train_loss[1, 2]
    assert result.train_loss[0, 2] == pytest.approx(expected, rel=1e-13)


class _TwoBN(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> Linear -> BatchNorm1d -> Tanh -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.lin = nn.Linear(3 * 4 * 4, 5)
        self.bn2 = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 3)
        with torch.no_grad():
            self.bn1.weight.uniform_(0.5, 1.5)
            self.bn2.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv(x))).flatten(1)
        return self.out(torch.tanh(self.bn2(self.lin(h))))


def _batch_norm(h: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Train-mode BatchNorm of one batch by hand: the batch's mean and biased variance."""
    dims = [d for d in range(h.dim()) if d != 1]
    shape = [1, -1] + [1] * (h.dim() - 2)
    mean, var = h.mean(dim=dims), h.var(dim=dims, unbiased=False)
    normed = (h - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + bn.eps)
    return normed * bn.weight.reshape(shape) + bn.bias.reshape(shape)


def _exact_statistics(
    model: _TwoBN, x: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mean and unbiased variance of each BatchNorm's inputs over every sample (and
    position), each batch forwarded in train mode (normalised by its own statistics)."""
    inputs1, inputs2 = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            h1 = model.conv(x[start : start + batch_size])
            h2 = model.lin(torch.relu(_batch_norm(h1, model.bn1)).flatten(1))
            inputs1.append(h1)
            inputs2.append(h2)
    a, b = torch.cat(inputs1), torch.cat(inputs2)
    return [
        (a.mean(dim=(0, 2, 3)), a.var(dim=(0, 2, 3), unbiased=True)),
        (b.mean(dim=0), b.var(dim=0, unbiased=True)),
    ]


def test_refresh_bn_gives_the_exact_pooled_statistics() -> None:
    x, y = _xy(shape=(2, 4, 4))
    model = _TwoBN().double().eval()
    expected = _exact_statistics(model, x, 32)
    _refresh_bn(model, DataLoader(TensorDataset(x, y), batch_size=32))
    for bn, (mean, var) in zip((model.bn1, model.bn2), expected):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-13, atol=1e-13)
        assert bn.num_batches_tracked is not None and int(bn.num_batches_tracked) == 2
        assert not bn.training


def test_landscape_refresh_bn_matches_a_float64_recomputation() -> None:
    x, y = _xy(shape=(2, 4, 4))
    model = _TwoBN().double().eval()
    size = sum(p.numel() for p in model.parameters())
    v = torch.randn(size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    v /= v.norm()
    result = build_loss_landscape(
        TensorDataset(x, y), model=model, dist=0.5, n_points=3, directions=[v],
        refresh_bn=True, batch_size=32, device="cpu",
    )  # fmt: skip
    moved = copy.deepcopy(model)
    theta = nn.utils.parameters_to_vector(moved.parameters()) + 0.5 * v
    nn.utils.vector_to_parameters(theta, moved.parameters())
    with torch.no_grad():
        for bn, (mean, var) in zip((moved.bn1, moved.bn2), _exact_statistics(moved, x, 32)):
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        expected = float(nn.functional.cross_entropy(moved(x), y))
    assert result.train_loss[0, 2] == pytest.approx(expected, rel=1e-12)
    # the model's own statistics are back after the sweep (t = 0 is the checkpoint)
    with torch.no_grad():
        at_origin = float(nn.functional.cross_entropy(model(x), y))
    assert result.train_loss[0, 1] == pytest.approx(at_origin, rel=1e-13)
