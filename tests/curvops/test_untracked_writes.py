"""In-place writes with gradients off to tensors with a gradient history are refused.

Before: ``with torch.no_grad(): h.clamp_(min=-0.2)`` inside ``forward`` changed the
values without autograd recording it, so the Hessian differentiated the network without
the clamp and the list GGN (forward mode, which records it) was 37 % off the cached
one, without an error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator
from curvops.testing import dense_hessian

EPS = float(torch.finfo(torch.float64).eps)


def _clamp(h: torch.Tensor) -> None:
    h.clamp_(min=-0.2)


def _mask(h: torch.Tensor) -> None:
    h[h < -0.2] = -0.2


def _scale(h: torch.Tensor) -> None:
    h.mul_(0.5)


def _augmented(h: torch.Tensor) -> None:
    h += 1.0


def _function(h: torch.Tensor) -> None:
    torch.clamp_(h, min=-0.2)


WRITES: list[tuple[str, Callable[[torch.Tensor], None], str]] = [
    ("clamp_", _clamp, "Tensor.clamp_"),
    ("setitem", _mask, "Tensor.__setitem__"),
    ("mul_", _scale, "Tensor.mul_"),
    ("+=", _augmented, "Tensor.__iadd__|Tensor.add_"),
    ("torch.clamp_", _function, "torch.clamp_"),
]


class Model(nn.Module):
    def __init__(self, write: Callable[[torch.Tensor], None] | None, tracked: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.write, self.tracked = write, tracked
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen)
        self.register_buffer("calls", torch.zeros(()))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        with torch.no_grad():
            self.calls.add_(0.0)  # a buffer: no gradient history, not concerned
            (h.detach() * 2).clamp_(min=0.0)  # a copy: no gradient history either
        if self.write is not None:
            if self.tracked:
                self.write(h)
            else:
                with torch.no_grad():
                    self.write(h)
        return self.l2(torch.tanh(h))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return torch.randn(8, 3, dtype=torch.float64, generator=gen), torch.tensor([0, 1, 2, 0] * 2)


@pytest.mark.parametrize(("name", "write", "shown"), WRITES, ids=[w[0] for w in WRITES])
def test_untracked_write_is_refused_by_every_operator(
    name: str, write: Callable[[torch.Tensor], None], shown: str
) -> None:
    _assert_refused_by_every_operator(Model(write), rf"({shown}) inside torch.no_grad")


def _assert_refused_by_every_operator(model: nn.Module, shown: str) -> None:
    """The Hessian, the cached and the list GGN and the empirical Fisher all refuse."""
    loss = nn.CrossEntropyLoss()
    x, y = _data()
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    for build in (
        lambda: HessianOperator(model, loss, (x, y)),
        lambda: GGNOperator(model, loss, (x, y)),
        lambda: GGNOperator(model, loss, batches),
        lambda: FisherOperator(model, loss, batches, kind="empirical"),
    ):
        with pytest.raises(ValueError, match=rf"Argument 'model'.*{shown}"):
            op = build()
            op @ np.ones(op.shape[0])


@pytest.mark.parametrize(("name", "write", "shown"), WRITES, ids=[w[0] for w in WRITES])
def test_the_same_write_recorded_gives_the_exact_hessian(
    name: str, write: Callable[[torch.Tensor], None], shown: str
) -> None:
    model, loss = Model(write, tracked=True), nn.CrossEntropyLoss()
    x, y = _data()
    H = HessianOperator(model, loss, (x, y))
    got = H @ np.eye(H.shape[0])
    want = dense_hessian(model, loss, (x, y)).numpy()
    assert np.abs(got - want).max() <= 100 * H.shape[0] * EPS * np.abs(want).max()


def test_premise_the_untracked_write_changes_values_but_not_the_gradient() -> None:
    x, _ = _data()
    untracked, recorded = Model(_clamp), Model(_clamp, tracked=True)
    out_u, out_r = untracked(x), recorded(x)
    assert torch.equal(out_u, out_r)
    g_u = torch.autograd.grad(out_u.sum(), untracked.l1.weight)[0]
    g_r = torch.autograd.grad(out_r.sum(), recorded.l1.weight)[0]
    assert (g_u - g_r).abs().max() > 0.1


# Writes through a detached alias (``.data``, ``.detach()``) change ``h`` with gradients on
# too; before, they went through, and products differentiated the network without them.


def _data_clamp(h: torch.Tensor) -> None:
    h.data.clamp_(min=-0.2)


def _detach_scale(h: torch.Tensor) -> None:
    h.detach().mul_(0.5)


def _data_mask(h: torch.Tensor) -> None:
    h.data[h.data < -0.2] = -0.2


def _view_of_alias(h: torch.Tensor) -> None:
    h.detach()[:, 0].zero_()


def _torch_detach(h: torch.Tensor) -> None:
    torch.clamp_(torch.detach(h), max=0.3)


def _data_assignment(h: torch.Tensor) -> None:
    h.data = h.data.clamp(min=-0.2)


ALIAS_WRITES: list[tuple[str, Callable[[torch.Tensor], None], str]] = [
    ("data.clamp_", _data_clamp, "Tensor.clamp_ on a detached alias"),
    ("detach().mul_", _detach_scale, "Tensor.mul_ on a detached alias"),
    ("data[mask] =", _data_mask, "Tensor.__setitem__ on a detached alias"),
    ("view of alias", _view_of_alias, "Tensor.zero_ on a detached alias"),
    ("torch.detach", _torch_detach, "torch.clamp_ on a detached alias"),
    ("data =", _data_assignment, "an assignment to .data of a tensor with a gradient"),
]


class AliasModel(Model):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        (h.detach() * 2).clamp_(min=0.0)  # a copy: free to change
        h.detach().clone().mul_(3.0)
        if self.write is not None:
            self.write(h)
        return self.l2(torch.tanh(h))


@pytest.mark.parametrize(("name", "write", "shown"), ALIAS_WRITES, ids=[w[0] for w in ALIAS_WRITES])
def test_write_through_a_detached_alias_is_refused_by_every_operator(
    name: str, write: Callable[[torch.Tensor], None], shown: str
) -> None:
    _assert_refused_by_every_operator(AliasModel(write), shown)


def test_copies_of_detached_tensors_and_the_unwritten_model_are_exact() -> None:
    model, loss = AliasModel(None), nn.CrossEntropyLoss()
    x, y = _data()
    H = HessianOperator(model, loss, (x, y))
    got = H @ np.eye(H.shape[0])
    want = dense_hessian(model, loss, (x, y)).numpy()
    assert np.abs(got - want).max() <= 100 * H.shape[0] * EPS * np.abs(want).max()


@pytest.mark.parametrize("write", [_data_clamp, _detach_scale])
def test_premise_an_alias_write_changes_values_but_not_the_gradient(
    write: Callable[[torch.Tensor], None],
) -> None:
    x, _ = _data()
    through_alias, recorded = (
        AliasModel(write),
        AliasModel(_clamp if write is _data_clamp else _scale),
    )
    out_a, out_r = through_alias(x), recorded(x)
    assert torch.equal(out_a, out_r)
    g_a = torch.autograd.grad(out_a.sum(), through_alias.l1.weight)[0]
    g_r = torch.autograd.grad(out_r.sum(), recorded.l1.weight)[0]
    assert (g_a - g_r).abs().max() > 0.1
