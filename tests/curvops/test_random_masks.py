"""Random masks drawn by hand (issue 15, item 2): inside products a Bernoulli draw is
its mean, so hand-written dropout and stochastic depth (timm's ``drop_path`` function,
torchvision's ``stochastic_depth``) give the curvature of the model without them,
wherever they are called from; any other draw from torch's generators is reported when
the operator is built.

Before, such masks were drawn from the products' fixed private stream: the products
were repeatable but those of one random subnetwork (a Hessian 50 % off the model
without stochastic depth, without an error).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator
from curvops.determinism import DropoutOffMode, product_context


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """timm's ``drop_path`` function: whole samples of a residual branch dropped."""
    if not training or p == 0:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """torchvision's ``stochastic_depth`` (mode ``"row"``)."""
    if not training or p == 0:
        return x
    survival = 1 - p
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype).bernoulli_(survival)
    return x * noise.div_(survival)


def bernoulli_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout written with ``torch.bernoulli`` of a probability tensor."""
    if not training or p == 0:
        return x
    return x * torch.bernoulli(torch.full_like(x.detach(), 1 - p)) / (1 - p)


def method_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout written with ``Tensor.bernoulli(p)``, with a generator of its own."""
    if not training or p == 0:
        return x
    g = torch.Generator().manual_seed(123)
    return x * x.detach().bernoulli(1 - p, generator=g) / (1 - p)


def rand_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout written with ``torch.rand``: not a Bernoulli call, so it is drawn."""
    if not training or p == 0:
        return x
    return x * (torch.rand_like(x) >= p).to(x.dtype) / (1 - p)


MASKS = {
    "drop_path": drop_path,
    "stochastic_depth": stochastic_depth,
    "bernoulli": bernoulli_dropout,
    "method": method_dropout,
}


class Block(nn.Module):
    """A residual block calling the random layer as a function (no module to recognise)."""

    def __init__(self, mask: str, p: float) -> None:
        super().__init__()
        self.fc, self.mask, self.p = nn.Linear(3, 3), mask, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = torch.tanh(self.fc(x))
        return x + {**MASKS, "rand": rand_dropout}[self.mask](branch, self.p, self.training)


def network(mask: str, p: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), Block(mask, p), Block(mask, p), nn.Linear(3, 3)).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 2, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0, 2])


OPERATORS = {
    "hessian": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d),
    "hessian-uncached": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d, cache=False),
    "ggn": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d),
    "ggn-uncached": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, cache=False),
    "ggn-linearized": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, linearize=True),
    "fisher-mc": lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d, kind="mc", seed=2),
}


@pytest.mark.parametrize("op_name", sorted(OPERATORS))
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_bernoulli_masks_are_off_inside_products(mask: str, op_name: str) -> None:
    noisy, clean = network(mask, 0.5).train(), network(mask, 0.0).train()
    data = batch()
    n = sum(p.numel() for p in noisy.parameters())
    v = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    make = OPERATORS[op_name]
    rng = torch.get_rng_state()
    got = make(noisy, data) @ v
    assert torch.equal(got, make(clean, data) @ v)
    assert torch.equal(rng, torch.get_rng_state())
    # the user's own forward passes draw their masks again
    x = torch.ones(1000, 1, dtype=torch.float64)
    assert bool((MASKS[mask](x, 0.5, True) == 0).any())


def test_bernoulli_calls_evaluate_to_their_means() -> None:
    p = torch.tensor([[0.2, 0.7], [1.0, 0.0]], dtype=torch.float64)
    out = torch.empty_like(p)
    x = torch.zeros(2, 2)
    with product_context(), DropoutOffMode():
        plain = torch.bernoulli(p)
        scalar = torch.bernoulli(p, 0.3)
        method = p.bernoulli()
        method_scalar = p.bernoulli(0.25)
        written = torch.bernoulli(p, out=out)
        in_place = x.bernoulli_(0.6)
        in_place_tensor = torch.zeros(2, 2, dtype=torch.float64).bernoulli_(p)
    assert torch.equal(plain, p) and plain is not p
    assert torch.equal(scalar, torch.full_like(p, 0.3))
    assert torch.equal(method, p) and torch.equal(method_scalar, torch.full_like(p, 0.25))
    assert written is out and torch.equal(out, p)
    assert in_place is x and torch.equal(x, torch.full((2, 2), 0.6))
    assert torch.equal(in_place_tensor, p)


def test_other_draws_are_deterministic_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    """A mask drawn with ``torch.rand`` stays a draw (from the private stream: the
    products repeat), and the operator says so when it is built."""
    noisy = network("rand", 0.5).train()
    data = batch()
    with caplog.at_level(logging.WARNING, logger="curvops.determinism"):
        H = HessianOperator(noisy, nn.CrossEntropyLoss(), data)
    assert "Sequential" in caplog.text and "one fixed draw" in caplog.text
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.equal(H @ v, H @ v)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="curvops.determinism"):
        HessianOperator(network("rand", 0.5).eval(), nn.CrossEntropyLoss(), data)
        HessianOperator(network("drop_path", 0.5).train(), nn.CrossEntropyLoss(), data)
    assert caplog.text == ""


class RandomScale(nn.Module):
    """A random per-sample rescaling in training mode (drawn with ``uniform_``)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return h
        return h * torch.empty(h.shape[0], 1, dtype=h.dtype).uniform_(0.5, 2.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), [d]),
        lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, cache=False),
        lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), [d, d], kind="empirical"),
        lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), [d, d]),
    ],
    ids=["ggn-list", "ggn-uncached", "fisher-list", "hessian-list"],
)
def test_every_forward_pass_sees_the_same_draws(make: Any) -> None:
    """The forward-mode GGN and Fisher run the model once per column: with one private
    stream per product, the columns of one ``matmat`` were taken at different draws
    (column 0 of a 2-column ``matmat`` 19 % off ``matvec``, ``X^T G X`` non-symmetric
    by 11 %).  The stream restarts at every forward pass: one fixed matrix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), RandomScale(), nn.Linear(4, 3)).double()
    data = batch()
    op = make(model.train(), data)
    X = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    M = op @ X
    for j in range(3):
        torch.testing.assert_close(op @ X[:, j], M[:, j], rtol=1e-13, atol=1e-15)
    block = X.T @ M
    torch.testing.assert_close(block, block.T, rtol=1e-12, atol=1e-14)
    cached = GGNOperator(model, nn.CrossEntropyLoss(), data)  # recorded graphs, one draw
    if isinstance(op, GGNOperator):
        torch.testing.assert_close(M, cached @ X, rtol=1e-12, atol=1e-14)
