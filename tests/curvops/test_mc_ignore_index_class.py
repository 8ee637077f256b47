"""Monte-Carlo Fisher with an ``ignore_index`` that is a real class (sweep 3, finding 2).

The counted positions come from the *true* targets; a sampled label equal to
``ignore_index`` (pad id 0 that is also a token, ``CrossEntropyLoss(ignore_index=2)``
on data without class-2 targets) is a label like any other.  Before, such draws were
dropped and the MC Fisher was 21-42 % off the GGN.

Checks, exact up to rounding:

* in expectation: :math:`\\sum_c p_c\\, s(c) s(c)^\\top` over every label :math:`c`
  (the ignore class included) is the softmax output Hessian
  :math:`\\mathrm{diag}(p) - pp^\\top` at counted positions and 0 at ignored ones;
* with the same seed the draws are the same, so the MC Fisher (and the MC GGN
  diagonal, and the dense reference) of a loss whose ignore class is a real class
  equals that of the same loss with the ignored positions marked ``-100`` instead
  (identical losses, counted tokens and draws): tolerance ``1e-13`` relative, a few
  float64 roundings of the same sums.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops import FisherOperator, ggn_diagonal
from curvops.losses import per_sample_nll_grads, sequence_cross_entropy
from curvops.testing import dense_fisher

DT = torch.float64
TOL = 1e-13


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()


@pytest.mark.parametrize(
    ("loss", "shape"),
    [(sequence_cross_entropy(ignore_index=0), (3, 5)), (nn.CrossEntropyLoss(ignore_index=2), (6,))],
    ids=["seq-ce-pad-0", "ce-ignore-2"],
)
def test_nll_gradients_of_every_label_average_to_the_output_hessian(
    loss: nn.Module, shape: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*shape, 4, generator=g, dtype=DT)
    ignore = loss.ignore_index
    targets = torch.randint(0, 4, shape, generator=g)
    if len(shape) == 2:  # the last token of every sequence is padding
        targets = torch.where(targets == ignore, 1, targets)
        targets[:, -1] = ignore
    else:  # no true target is the ignore class
        targets = torch.where(targets == ignore, 1, targets)
    p = torch.softmax(logits, -1).reshape(-1, 4)
    expected = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    expected = expected * (targets != ignore).reshape(-1, 1, 1)
    got = torch.zeros_like(expected)
    for c in range(4):  # every label, the ignore class included, weighted by p_c
        drawn = torch.full_like(targets, c)
        s = per_sample_nll_grads(loss, logits, drawn, true_targets=targets).reshape(-1, 4)
        got += p[:, c, None, None] * s.unsqueeze(-1) * s.unsqueeze(-2)
    torch.testing.assert_close(got, expected, rtol=0.0, atol=TOL)


def _sequence_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, 3, generator=g, dtype=DT)
    y = torch.randint(1, 4, (6, 5), generator=g)
    y[:, -2:] = 0  # padding with id 0, also a vocabulary entry
    return x, y, torch.where(y == 0, -100, y)


def test_mc_fisher_and_diagonal_with_pad_id_0_equal_those_with_minus_100() -> None:
    net = _net()
    x, y, y_marked = _sequence_case()
    pad0, plain = sequence_cross_entropy(ignore_index=0), sequence_cross_entropy()
    eye = torch.eye(sum(p.numel() for p in net.parameters()), dtype=DT)
    kw = {"kind": "mc", "mc_samples": 20, "seed": 3}
    F0 = FisherOperator(net, pad0, (x, y), **kw).matmat(eye)
    F1 = FisherOperator(net, plain, (x, y_marked), **kw).matmat(eye)
    assert _rel(F0, F1) <= TOL  # before: 0.26 apart
    d0 = ggn_diagonal(net, pad0, (x, y), method="mc", mc_samples=20, seed=3)
    d1 = ggn_diagonal(net, plain, (x, y_marked), method="mc", mc_samples=20, seed=3)
    assert _rel(d0, d1) <= TOL
    torch.testing.assert_close(d0, torch.diagonal(F0), rtol=1e-12, atol=0.0)
    ref = dense_fisher(net, pad0, (x, y), kind="mc", mc_samples=20, seed=3)
    assert _rel(F0, ref) <= 1e-12


def test_mc_fisher_of_cross_entropy_whose_ignore_class_is_never_a_target() -> None:
    net = _net()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 3, generator=g, dtype=DT)
    y = torch.randint(0, 4, (30,), generator=g)
    y = torch.where(y == 2, 1, y)  # the two losses are the same function of the outputs
    eye = torch.eye(sum(p.numel() for p in net.parameters()), dtype=DT)
    kw = {"kind": "mc", "mc_samples": 20, "seed": 5}
    F0 = FisherOperator(net, nn.CrossEntropyLoss(ignore_index=2), (x, y), **kw).matmat(eye)
    F1 = FisherOperator(net, nn.CrossEntropyLoss(), (x, y), **kw).matmat(eye)
    assert _rel(F0, F1) <= TOL  # before: 0.42 apart


def test_mc_fisher_of_per_position_cross_entropy_with_pad_id_0() -> None:
    # CrossEntropyLoss on [N, C, T] outputs ("ce_tokens"), ignore_index=0 a real class
    net = _net()
    x, y, y_marked = _sequence_case()

    class Channels(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.inner(t).transpose(1, 2)  # [N, C, T]

    model = Channels(net)
    eye = torch.eye(sum(p.numel() for p in net.parameters()), dtype=DT)
    kw = {"kind": "mc", "mc_samples": 30, "seed": 6}
    F0 = FisherOperator(model, nn.CrossEntropyLoss(ignore_index=0), (x, y), **kw).matmat(eye)
    F1 = FisherOperator(model, nn.CrossEntropyLoss(), (x, y_marked), **kw).matmat(eye)
    assert _rel(F0, F1) <= TOL
