"""GGN diagonal: exact vs the dense GGN; Monte-Carlo vs the MC Fisher and in expectation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops.diagonal import ggn_diagonal
from curvops.testing import dense_fisher, dense_ggn

from .conftest import CASES, Case, make_inputs, make_mlp, make_targets, relative_error


@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: c.id)
def test_exact_diagonal_matches_dense(case: Case) -> None:
    model, loss, data = case.build()
    d = ggn_diagonal(model, loss, data, bn_mode=case.bn_mode, chunk_size=5)
    D = dense_ggn(model, loss, data, bn_mode=case.bn_mode)
    assert relative_error(d, torch.diagonal(D)) <= 1e-10


@pytest.mark.parametrize("case", CASES[1::3], ids=lambda c: c.id)
def test_mc_diagonal_is_diagonal_of_mc_fisher(case: Case) -> None:
    model, loss, data = case.build()
    d = ggn_diagonal(model, loss, data, method="mc", mc_samples=2, seed=7, bn_mode=case.bn_mode)
    F = dense_fisher(model, loss, data, kind="mc", mc_samples=2, seed=7, bn_mode=case.bn_mode)
    assert relative_error(d, torch.diagonal(F)) <= 1e-10


def test_mc_diagonal_converges_to_exact() -> None:
    model = make_mlp()
    data = (make_inputs("mlp", 5), make_targets("ce", 5))
    exact = ggn_diagonal(model, nn.CrossEntropyLoss(), data)
    mc = ggn_diagonal(model, nn.CrossEntropyLoss(), data, method="mc", mc_samples=2000, seed=0)
    assert relative_error(mc, exact) <= 0.1


def test_autograd_fallback_and_errors() -> None:
    model = make_mlp()
    data = (make_inputs("mlp", 4), make_targets("mse", 4))
    loss = nn.SmoothL1Loss(beta=3.0)
    d = ggn_diagonal(model, loss, data)
    assert relative_error(d, torch.diagonal(dense_ggn(model, loss, data))) <= 1e-10
    with pytest.raises(ValueError, match="method"):
        ggn_diagonal(model, loss, data, method="hutchinson")
    with pytest.raises(ValueError, match="loss_fn"):
        ggn_diagonal(model, loss, data, method="mc")


class _BatchCentred(nn.Module):
    """Subtracts the batch mean: samples interact, unknown to any module-type check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)


@pytest.mark.parametrize("case", CASES[1::2], ids=lambda c: c.id)
def test_per_sample_jacobians_are_used_where_samples_do_not_interact(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    import curvops.diagonal as diagonal

    model, loss, data = case.build()
    D = dense_ggn(model, loss, data, bn_mode=case.bn_mode)
    coupled = case.bn_mode == "train" and any(
        isinstance(m, nn.BatchNorm2d) for m in model.modules()
    )

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("batched products used")

    if not coupled:
        monkeypatch.setattr(diagonal, "_sum_squared_vjps", refuse)
    monkeypatch.setattr(diagonal, "_PER_SAMPLE_BUDGET", 1)  # one sample per chunk
    d = ggn_diagonal(model, loss, data, bn_mode=case.bn_mode, chunk_size=7)
    assert relative_error(d, torch.diagonal(D)) <= 1e-10


def test_samples_that_interact_fall_back_to_batched_products() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _BatchCentred(), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = nn.CrossEntropyLoss()
    d = ggn_diagonal(model, loss, (x, y))
    assert relative_error(d, torch.diagonal(dense_ggn(model, loss, (x, y)))) <= 1e-10
