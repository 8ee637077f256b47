"""``loss_stats(batch_size=k)`` cuts only batch-major inputs (sweep 3, findings 3 and 8).

An input is batch-major when its leading dimension is the batch's sample count (counted
as the operators count it: the first tensor, or ``as_data(..., batch_size=key)``).
Before, every tensor was cut along dimension 0, so a shared ``[T, T]`` causal mask
became one of its rows and broadcast silently.  The statistics of the cut minibatches
must equal those of the same minibatches cut by hand (exactly: the same float64
computations on the same tensors).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops import loss_stats
from curvops.data import as_data
from curvops.stats import minibatches

T, D = 4, 3
FIELDS = ("loss_mean", "loss_var", "grad_mean_norm_sq", "grad_var", "hess_mu", "num_samples")


class _Attn(nn.Module):
    """Causal attention pooled to 2 classes: ``forward(x [B, T, D], mask [T, T])``."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D, D)
        self.o = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = (x @ self.q(x).transpose(1, 2)).masked_fill(mask == 0, -1e9)
        out: torch.Tensor = self.o((torch.softmax(a, -1) @ x).mean(1))
        return out


def _setup(n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, T, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    return _Attn().double(), x, y, torch.tril(torch.ones(T, T))


def test_a_shared_causal_mask_is_passed_whole_to_every_minibatch() -> None:
    model, x, y, causal = _setup(3)
    loss = nn.CrossEntropyLoss()
    got = loss_stats(model, loss, ((x, causal), y), batch_size=1, num_probes=2, seed=0)
    by_hand = [((x[k : k + 1], causal), y[k : k + 1]) for k in range(3)]
    want = loss_stats(model, loss, by_hand, num_probes=2, seed=0)
    for name in (*FIELDS, "frobenius_norm_sq"):
        assert getattr(got, name) == getattr(want, name), name
    with torch.no_grad():  # before: 0.7432 instead of the full-batch loss 0.7285
        assert got.loss_mean == pytest.approx(float(loss(model(x, causal), y)), rel=1e-14)


def test_an_input_batch_major_in_one_batch_only_is_refused() -> None:
    # batch 0 has T = 4 samples, so its [T, T] mask looks batch-major there and not in
    # batch 1: the coincidence is detected and named
    model, x, y, causal = _setup(7)
    data = [((x[:4], causal), y[:4]), ((x[4:], causal), y[4:])]
    with pytest.raises(ValueError, match=r"'data \(batch 1\)'.*inputs\[1\].*by coincidence"):
        loss_stats(model, nn.CrossEntropyLoss(), data, batch_size=2, num_probes=0)


class _PositionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(T, 3)
        self.proj = nn.Linear(1, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, position_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x.unsqueeze(-1)) + self.pos(position_ids))  # (B, T, 3)
        out: torch.Tensor = self.head(h).sum(1)
        return out


def _positions_batch(n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    inputs = {"position_ids": torch.arange(T)[None], "x": torch.randn(n, T, generator=g)}
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}, torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )


def test_data_with_a_declared_batch_key_is_cut_along_it() -> None:
    torch.manual_seed(0)
    model = _PositionNet().double()
    inputs, y = _positions_batch(3)
    data = as_data((inputs, y), batch_size="x")
    pieces = list(minibatches(data, 2))
    assert [p.size for p in pieces] == [2, 1]
    assert all(p.inputs["position_ids"].shape == (1, T) for p in pieces)  # whole
    got = loss_stats(model, nn.MSELoss(), data, batch_size=1, num_probes=2)
    by_hand = [
        ({"position_ids": inputs["position_ids"], "x": inputs["x"][k : k + 1]}, y[k : k + 1])
        for k in range(3)
    ]
    want = loss_stats(model, nn.MSELoss(), as_data(by_hand, batch_size="x"), num_probes=2)
    for name in (*FIELDS, "frobenius_norm_sq"):
        assert getattr(got, name) == getattr(want, name), name
    counted = as_data((inputs, y), batch_size=lambda inp: int(inp["x"].shape[0]))
    with pytest.raises(ValueError, match=r"'batch_size'.*counted by a function"):
        loss_stats(model, nn.MSELoss(), counted, batch_size=1, num_probes=0)


def test_the_sample_count_error_names_the_counted_input_and_the_remedy() -> None:
    inputs, y = _positions_batch(3)
    with pytest.raises(ValueError) as info:
        as_data((inputs, y))
    said = str(info.value)
    assert "targets with 1 rows" in said
    assert "counted from inputs['position_ids'] of shape (1, 4)" in said
    assert "as_data(data, batch_size='x')" in said
