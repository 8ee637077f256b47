"""curvops.laplace gives laplace-torch the curvature of the *summed* loss, however many terms.

laplace's backends return the curvature of ``CrossEntropyLoss(reduction="sum")`` over
the batch (its ``CurvlinopsGGN``).  That sum has as many terms as the mean-reduced loss
divides by (:func:`curvops.losses.batch_weight`): not the batch size when targets are
``ignore_index`` (fewer) or the outputs are ``(N, C, T)`` sequences (``N T``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("laplace")
pytest.importorskip("curvlinops")

from laplace.curvature import CurvlinopsGGN

from curvops import laplace as backends
from curvops.testing import dense_ggn

DT = torch.float64
EPS = float(torch.finfo(DT).eps)
EPS32 = float(torch.finfo(torch.float32).eps)


def _ignored_targets() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.arange(10) % 3
    y[[1, 4, 7]] = -100  # laplace's CrossEntropyLoss ignore_index: 7 counted terms
    return net, x, y


def _sequences() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Tanh(), nn.Conv1d(3, 3, 1)).to(DT)
    x = torch.randn(4, 2, 5, generator=g, dtype=DT)  # outputs (4, 3, 5): 20 terms
    y = torch.randint(0, 3, (4, 5), generator=g)
    return net, x, y


def _check(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Any = None) -> None:
    ours = backends.GGN(net, "classification")
    if loss is not None:
        ours.lossfunc = loss
    summed = ours.lossfunc
    ref = dense_ggn(net, summed, (x, y))  # float64 GGN of the summed loss
    terms = int(y.numel())  # every loss term's (C x C) output Hessian enters the sum
    # a float64 sum over the terms of J^T H J: C * terms * eps * max|entry| rounding
    atol = 10 * 3 * terms * EPS * float(ref.abs().max())
    _, H = ours.full(x, y)
    torch.testing.assert_close(H, ref, rtol=0.0, atol=atol)
    _, d = ours.diag(x, y)
    torch.testing.assert_close(d, torch.diagonal(ref), rtol=0.0, atol=atol)
    if loss is None:
        # laplace's own backend: its dense product runs through a float32 identity
        # (rounding 1e-7 relative, see test_laplace_backend), its diag is not used here
        _, theirs = CurvlinopsGGN(net, "classification").full(x, y)
        scale = float(theirs.abs().max())
        torch.testing.assert_close(H, theirs.to(DT), rtol=0.0, atol=8 * EPS32 * scale)


def test_ignored_targets_are_not_counted() -> None:
    _check(*_ignored_targets())


def test_sequence_outputs_count_every_position() -> None:
    _check(*_sequences())


def test_class_weights_of_the_summed_loss_are_kept() -> None:
    net, x, y = _ignored_targets()
    weight = torch.tensor([0.5, 2.0, 1.5], dtype=DT)
    _check(net, x, y, nn.CrossEntropyLoss(reduction="sum", weight=weight))
