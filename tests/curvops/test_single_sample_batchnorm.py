"""A batch of one sample under train-mode BatchNorm: PyTorch's bare "Expected more than 1
value per channel when training" now carries a note naming the batch and the ways out
(the workflows' last batch of 33 samples in batches of 16 hit it with no hint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops import GGNOperator, HessianOperator
from nets.batchnorm_statistics import refresh_batchnorm


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(33, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (33,), generator=g)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 33, 16)]


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_operators_name_the_one_sample_batch(cls: type) -> None:
    op = cls(_model(), nn.CrossEntropyLoss(), _batches(), bn_mode="train")
    with pytest.raises(ValueError, match="more than 1 value per channel") as info:
        op.matvec(np.ones(op.shape[0]))
    notes = getattr(info.value, "__notes__", [])
    assert any("data (batch 2), a batch of 1 sample" in n and "bn_mode='eval'" in n for n in notes)
    # the named way out works
    eval_mode = cls(_model(), nn.CrossEntropyLoss(), _batches(), bn_mode="eval")
    assert np.isfinite(eval_mode.matvec(np.ones(eval_mode.shape[0]))).all()


def test_the_batchnorm_refresh_names_the_one_sample_batch() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel") as info:
        refresh_batchnorm(_model(), (x for x, _ in _batches()))
    notes = getattr(info.value, "__notes__", [])
    assert any("BatchNorm statistics' batch 2, a batch of 1 sample" in n for n in notes)
