"""Samples per batch when the first input tensor is not batch-major (``as_data(batch_size=)``).

A list of batches is the curvature of the mean loss over all samples, each batch
weighted by its sample count; with a dict whose first entry is a ``(T,)`` position
vector, the count must come from the batch-major entry.  Compared with the dense
float64 reference of the concatenated batch (tolerance 1e-10: two float64
evaluations of the same sums, ``C * eps * cond`` for these tiny problems).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import GGNOperator, HessianOperator
from curvops.data import as_data, batch_size_of
from curvops.testing import dense_ggn, dense_hessian

DT = torch.float64


class _PositionNet(nn.Module):
    """``tanh(x W + p(positions)) v`` summed over positions: inputs as keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(4, 3)
        self.proj = nn.Linear(1, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x.unsqueeze(-1)) + self.pos(positions))  # (B, T, 3)
        out: torch.Tensor = self.head(h).sum(1)
        return out


def _batch(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {"positions": torch.arange(4), "x": torch.randn(n, 4, generator=g, dtype=DT)}
    return inputs, torch.randn(n, 2, generator=g, dtype=DT)


def _concatenated(batches: list[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    x = torch.cat([b[0]["x"] for b in batches])
    return {"positions": torch.arange(4), "x": x}, torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("batch_size", ["x", 1, lambda inputs: inputs["x"].shape[0]])
@pytest.mark.parametrize(
    ("cls", "dense"), [(HessianOperator, dense_hessian), (GGNOperator, dense_ggn)]
)
def test_batches_are_weighted_by_the_samples_told(batch_size: Any, cls: type, dense: Any) -> None:
    torch.manual_seed(0)
    model = _PositionNet().double()
    batches = [_batch(3, 1), _batch(1, 2)]  # unequal sizes: a per-batch mean would be wrong
    if batch_size == 1:  # a position: the inputs as a tuple (positions, x)
        batches = [((b[0]["positions"], b[0]["x"]), b[1]) for b in batches]
    loss = nn.MSELoss()
    op = cls(model, loss, as_data(batches, batch_size=batch_size))
    whole = _concatenated(
        [({"positions": b[0][0], "x": b[0][1]}, b[1]) if batch_size == 1 else b for b in batches]
    )
    ref = dense(model, loss, as_data(whole, batch_size="x")).numpy()
    got = op @ np.eye(op.shape[0])
    assert np.linalg.norm(got - ref) <= 1e-10 * np.linalg.norm(ref)
    # the unweighted mean of the two batch curvatures is a different matrix
    per_batch = [dense(model, loss, as_data(b, batch_size=batch_size)).numpy() for b in batches]
    assert np.linalg.norm((per_batch[0] + per_batch[1]) / 2 - ref) > 1e-3 * np.linalg.norm(ref)


def test_without_being_told_the_first_tensor_counts() -> None:
    with pytest.raises(ValueError, match="targets with 4 rows"):
        as_data([_batch(3, 1)])
    assert as_data([_batch(3, 1)], batch_size="x").num_samples == 3


def test_bad_batch_size_arguments_name_the_argument() -> None:
    batch = _batch(3, 1)
    with pytest.raises(TypeError, match="'batch_size'"):
        as_data(batch, batch_size=2.5)
    with pytest.raises(ValueError, match=r"'batch_size \(batch 0\)'.*key"):
        as_data(batch, batch_size="input_ids")
    with pytest.raises(ValueError, match=r"'batch_size \(batch 1\)'.*positive int"):
        as_data([batch, _batch(2, 2)], batch_size=lambda inputs: 3 if len(inputs["x"]) == 3 else 0)
    with pytest.raises(TypeError, match=r"'batch_size'.*Data stream"):
        as_data(as_data(batch, batch_size="x"), batch_size="x")
    with pytest.raises(ValueError, match="'batch_size"):
        batch_size_of({"positions": torch.arange(4)}, 3)


def test_loss_stats_keep_batches_whose_samples_are_told() -> None:
    # Before: minibatches() sliced every input tensor to the batch's size, so the (T,)
    # position vector of a one-sample batch became (1,) and broadcast silently.
    from curvops.stats import loss_stats

    torch.manual_seed(0)
    model = _PositionNet().double()
    batches = [_batch(1, 1), _batch(1, 2), _batch(1, 3)]  # old code: silently wrong here
    whole = _concatenated(batches)
    got = loss_stats(model, nn.MSELoss(), as_data(batches, batch_size="x"), num_probes=2)
    want = loss_stats(model, nn.MSELoss(), as_data(whole, batch_size="x"), num_probes=2)
    assert got.loss_mean == pytest.approx(want.loss_mean, rel=1e-12)
    with torch.no_grad():
        full = float(nn.MSELoss()(model(**whole[0]), whole[1]))
    assert got.loss_mean == pytest.approx(full, rel=1e-12)
    # cutting follows the declared batch-major input; the (T,) positions stay whole
    # (tests/curvops/test_stats_cutting.py); a function of the inputs cannot be followed
    cut = loss_stats(model, nn.MSELoss(), as_data(whole, batch_size="x"), batch_size=1)
    assert cut.loss_mean == pytest.approx(got.loss_mean, rel=1e-12)
    assert cut.grad_var == pytest.approx(got.grad_var, rel=1e-12)
    counted = as_data(batches, batch_size=lambda inputs: int(inputs["x"].shape[0]))
    with pytest.raises(ValueError, match=r"Argument 'batch_size'.*counted by a function"):
        loss_stats(model, nn.MSELoss(), counted, batch_size=2)
