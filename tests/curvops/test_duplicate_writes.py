"""Writes of parameter-dependent values to a repeated index are refused in products.

Before: ``x[idx] = v`` with a repeated index (and ``index_put``, ``index_copy``,
``scatter``, ``put``, ``max_unpool`` after overlapping pooling windows) gave
gradients, Hessians and GGNs that were not derivatives of the function (PyTorch's
backward pass credits every duplicate write, its forward mode only the winner),
without an error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import GGNOperator, HessianOperator
from curvops.determinism import DropoutOffMode
from curvops.duplicate_writes import duplicate_write
from curvops.testing import dense_hessian

EPS = float(torch.finfo(torch.float64).eps)

Write = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _setitem(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(h.shape[0], 3, dtype=h.dtype)
    out[:, idx] = h
    return out


def _setitem_list(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(h.shape[0], 3, dtype=h.dtype)
    out[:, idx.tolist()] = h
    return out


def _index_put(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(3, h.shape[0], dtype=h.dtype)
    return out.index_put((idx,), h.T).T


def _index_put_(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(3, h.shape[0], dtype=h.dtype)
    return torch.index_put_(out, (idx,), h.T).T


def _index_copy(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros(h.shape[0], 3, dtype=h.dtype).index_copy(1, idx, h)


def _index_copy_(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros(h.shape[0], 3, dtype=h.dtype).index_copy_(1, idx, h)


def _scatter(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros(h.shape[0], 3, dtype=h.dtype).scatter(1, idx.expand(h.shape[0], 4), h)


def _scatter_(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros(h.shape[0], 3, dtype=h.dtype).scatter_(1, idx.expand(h.shape[0], 4), h)


def _put(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    n = h.shape[0]
    flat = (torch.arange(n).unsqueeze(1) * 3 + idx).reshape(-1)
    return torch.zeros(n, 3, dtype=h.dtype).put(flat, h.reshape(-1)).reshape(n, 3)


def _put_(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    n = h.shape[0]
    flat = (torch.arange(n).unsqueeze(1) * 3 - 3 * n + idx).reshape(-1)  # negative indices
    return torch.zeros(n, 3, dtype=h.dtype).put_(flat, h.reshape(-1)).reshape(n, 3)


def _max_unpool(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # pooling windows that overlap (stride 1 < kernel 2) share their maximum 3: the
    # indices are [1, 1, 3, 4] (``idx`` is not used)
    x = torch.tensor([[[1.0, 3.0, 0.0, 2.0, 5.0]]])
    _, where = F.max_pool1d(x, 2, 1, return_indices=True)
    out = F.max_unpool1d(h.unsqueeze(1), where.expand(h.shape[0], 1, 4), 2, 1, output_size=[5])
    return out.squeeze(1)[:, :3]


WRITES: list[tuple[str, Write]] = [
    ("x[idx] = v", _setitem),
    ("x[list] = v", _setitem_list),
    ("index_put", _index_put),
    ("torch.index_put_", _index_put_),
    ("index_copy", _index_copy),
    ("index_copy_", _index_copy_),
    ("scatter", _scatter),
    ("scatter_", _scatter_),
    ("put", _put),
    ("put_", _put_),
    ("max_unpool1d", _max_unpool),
]
REPEATED = torch.tensor([0, 2, 0, 1])
UNIQUE = torch.tensor([0, 2, 1, 3])  # four writes into three columns: see the model


class WriteModel(nn.Module):
    def __init__(self, write: Write, idx: torch.Tensor) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.write, self.idx = write, idx
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(3, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        if self.idx.max() > 2:  # unique indices: four distinct columns of a wider target
            wide = torch.zeros(h.shape[0], 4, dtype=h.dtype)
            wide[:, self.idx] = h
            return self.l2(wide[:, :3] + wide[:, 3:])
        return self.l2(torch.tanh(self.write(h, self.idx)))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(8)
    return torch.randn(6, 3, dtype=torch.float64, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])


def _gradient_error(model: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """PyTorch's directional derivative against central differences of the loss
    (outside the products' mode), relative."""
    named = dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, p in named.items():
            params[name] = w[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return loss(torch.func.functional_call(model, params, (x,)), y)

    v = torch.randn(flat.shape, dtype=flat.dtype, generator=torch.Generator().manual_seed(9))
    w = flat.clone().requires_grad_()
    slope = float(torch.autograd.grad(loss_of(w), w)[0] @ v)
    h = 1e-5
    with torch.no_grad():
        differences = float((loss_of(flat + h * v) - loss_of(flat - h * v)) / (2 * h))
    return abs(slope - differences) / abs(differences)


@pytest.mark.parametrize(("name", "write"), WRITES, ids=[n for n, _ in WRITES])
def test_repeated_index_with_parameter_values_is_refused(name: str, write: Write) -> None:
    model, loss = WriteModel(write, REPEATED), nn.CrossEntropyLoss()
    x, y = _data()
    # the premise: PyTorch's gradient credits both writes, so it is not the derivative
    assert _gradient_error(model, loss, x, y) > 1e-2
    for build in (
        lambda: HessianOperator(model, loss, (x, y)),
        lambda: GGNOperator(model, loss, (x, y)),
        lambda: GGNOperator(model, loss, [(x[:3], y[:3]), (x[3:], y[3:])]),
    ):
        with pytest.raises(ValueError, match=r"Argument 'model'.*repeated index") as info:
            op = build()
            op @ np.ones(op.shape[0])
        assert "accumulate=True" in str(info.value)


@pytest.mark.parametrize(("name", "write"), WRITES, ids=[n for n, _ in WRITES])
def test_repeated_writes_of_constants_go_through(name: str, write: Write) -> None:
    h = torch.randn(2, 4, dtype=torch.float64)
    with DropoutOffMode():
        got = write(h, REPEATED)  # no derivatives: a repeat changes no derivative
    assert torch.equal(got, write(h, REPEATED))


def test_masks_slices_and_added_writes_go_through() -> None:
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with DropoutOffMode():
        out = torch.zeros(4, dtype=torch.float64)
        out[torch.tensor([True, False, True, True])] = h[0, :3]  # a mask cannot repeat
        out[1:3] = h[1, :2]
        out[torch.tensor([3, 0])] = h[1, 2:]
        out.index_put_((REPEATED,), h[0], accumulate=True)
        out = out.scatter_add(0, REPEATED, h[1])
        out.put_(REPEATED, h[0], accumulate=True)
        out = out.index_add(0, REPEATED, h[1])
    assert out.requires_grad


def test_unique_indices_give_the_exact_hessian() -> None:
    model, loss = WriteModel(_setitem, UNIQUE), nn.CrossEntropyLoss()
    x, y = _data()
    H = HessianOperator(model, loss, (x, y))
    got = H @ np.eye(H.shape[0])
    want = dense_hessian(model, loss, (x, y)).numpy()
    assert np.abs(got - want).max() <= 100 * H.shape[0] * EPS * np.abs(want).max()


def test_duplicate_write_names_the_call() -> None:
    v = torch.ones(2, requires_grad=True)
    target = torch.zeros(3)
    assert duplicate_write(torch.Tensor.__setitem__, (target, torch.tensor([1, 1]), v), {}) == (
        "x[index] = value with a repeated index"
    )
    assert duplicate_write(torch.Tensor.__setitem__, (target, torch.tensor([0, 1]), v), {}) is None
    constant = (target, torch.tensor([1, 1]), 2.0)
    assert duplicate_write(torch.Tensor.__setitem__, constant, {}) is None
    assert duplicate_write(torch.Tensor.scatter_, (target, 0, torch.tensor([1, 1]), v), {}) == (
        "scatter_ with a repeated index"
    )
    ints = torch.zeros(3, dtype=torch.long)
    integer = (ints, 0, torch.tensor([1, 1]), ints[:2])
    assert duplicate_write(torch.Tensor.scatter_, integer, {}) is None
