"""K-FAC and E-KFAC of a language model's token-level loss: ``sequence_cross_entropy`` on
``[B, T, V]`` logits (classes last) has one loss term per token, like ``CrossEntropyLoss`` on
the same logits moved to ``[B, V, T]``; every Fisher type and weight-sharing approximation
gives the same matrix bitwise (it was refused for ``type2``/``mc`` and, for ``empirical``,
counted ``B`` terms against its ``B T`` normaliser)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops import EKFACOperator, KFACOperator
from curvops.losses import sequence_cross_entropy


class TokenNet(nn.Module):
    def __init__(self, class_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.class_first = class_first
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.l2(torch.tanh(self.l1(x)))
        return out.transpose(1, 2) if self.class_first else out


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("fisher", ["type2", "mc", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_sequence_cross_entropy_equals_class_first_cross_entropy(
    cls: type, fisher: str, approx: str
) -> None:
    last, first = TokenNet(False).double(), TokenNet(True).double()
    first.load_state_dict(last.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (3, 4), generator=g)
    eye = np.eye(sum(p.numel() for p in last.parameters()))
    ours = cls(last, sequence_cross_entropy(), (x, y), fisher=fisher, approx=approx) @ eye
    ref = cls(first, nn.CrossEntropyLoss(), (x, y), fisher=fisher, approx=approx) @ eye
    assert np.array_equal(ours, ref)
    assert np.abs(ours).max() > 0


def test_padded_tokens_are_refused_naming_the_loss() -> None:
    net = TokenNet(False).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    y = torch.tensor([[0, 1, 2, -100], [3, 4, 0, 1]])
    with pytest.raises(ValueError, match=r"'loss_fn'.*weights its 8 loss terms equally"):
        KFACOperator(net, sequence_cross_entropy(), (x, y), fisher="empirical") @ np.ones(41)
