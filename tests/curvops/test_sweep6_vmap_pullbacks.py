"""Vectorised pullbacks are checked against a plain backward pass.

``ggn_diagonal`` takes its pullbacks :math:`J_n^\\top a_{nj}` through ``vmap``
(``torch.func`` per sample, ``is_grads_batched`` in chunks), and ``dense_ggn`` /
``dense_fisher`` took their Jacobians with ``jacrev`` (``vmap`` over a pullback).  In
torch 2.13 ``vmap`` of a pullback through ``torch.cdist`` is wrong: the diagonal of a
prototype (RBF) network was 25 % off and its dense GGN reference 100 % off, without an
error.  Now every batch's vectorised pullbacks must sum (with fixed distinct weights) to
one plain backward pass of the mixed cotangents within rounding, else the batch is
computed again without ``vmap``; the references build their Jacobians row by row.

The references here are independent: Jacobians with one ``torch.autograd.grad`` per
output entry through ``torch.func.functional_call``, output Hessians with
``torch.autograd.functional.hessian``, all in float64.  A function whose backward is
wrong only under ``vmap`` (and right otherwise) stands in for any wrong batching rule,
whatever PyTorch's version fixes.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvops import diagonal_approximation, ggn_diagonal
from curvops.testing import dense_fisher, dense_ggn

F64 = torch.float64


class _Prototypes(nn.Module):
    """Negative distances of tanh features to learnt prototypes (an RBF classifier)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l = nn.Linear(3, 4)
        self.p = nn.Parameter(torch.randn(3, 4, generator=g))
        with torch.no_grad():
            for w in self.l.parameters():
                w.copy_(torch.randn(w.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(torch.tanh(self.l(x)), self.p)


def _batched(t: torch.Tensor) -> bool:
    return bool(torch._C._functorch.is_batchedtensor(t))


class _WrongUnderVmap(torch.autograd.Function):
    """The identity, whose backward halves the cotangent only when it is vmapped: a
    wrong batching rule of a pullback (plain backward passes are right)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return 0.5 * g if _batched(g) else g


class _Mlp(nn.Module):
    """Linear-Tanh-Linear (3 -> 5 -> 3), optionally through :class:`_WrongUnderVmap`
    and a BatchNorm (training mode couples the samples: the chunked path)."""

    def __init__(self, wrong: bool, norm: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 3)
        self.norm = nn.BatchNorm1d(5) if norm else nn.Identity()
        self.wrong = wrong
        with torch.no_grad():
            for w in [*self.a.parameters(), *self.b.parameters()]:
                w.copy_(torch.randn(w.shape, generator=g) * 0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.a(x)))
        return self.b(_WrongUnderVmap.apply(h) if self.wrong else h)


def _reference_ggn(model: nn.Module, loss: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:math:`J^\\top \\nabla^2_f L J` with ``J`` row by row (plain backward passes)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_(True)
    split = dict(
        zip(names, (t.reshape(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes)))
    )
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # BatchNorm: not updated
    out = functional_call(model, {**split, **buffers}, (x,))
    rows = [torch.autograd.grad(o, theta, retain_graph=True)[0] for o in out.reshape(-1)]
    J = torch.stack(rows)
    o0 = out.detach()
    H = torch.autograd.functional.hessian(lambda o: loss(o.reshape(o0.shape), y), o0.reshape(-1))
    return J.T @ H @ J


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _data(n: int = 6, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(2), dtype=dtype)
    return x, torch.arange(n) % 3


def test_cdist_diagonal_is_exact() -> None:
    model, loss = _Prototypes().double(), nn.CrossEntropyLoss()
    x, y = _data()
    want = torch.diagonal(_reference_ggn(model, loss, x, y))
    assert _rel(ggn_diagonal(model, loss, (x, y)), want) <= 1e-12
    proxy = diagonal_approximation(model, loss, (x, y))
    assert _rel(torch.as_tensor(proxy @ torch.ones(proxy.shape[0], dtype=F64)), want) <= 1e-12


def test_cdist_dense_ggn_is_exact() -> None:
    model, loss = _Prototypes().double(), nn.CrossEntropyLoss()
    x, y = _data()
    assert _rel(dense_ggn(model, loss, (x, y)), _reference_ggn(model, loss, x, y)) <= 1e-12


def test_any_wrong_vmap_rule_is_caught_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The diagonal equals that of the same network without the wrong function."""
    x, y = _data()
    loss = nn.CrossEntropyLoss()
    model, clean = _Mlp(True).double(), _Mlp(False).double()
    want = torch.diagonal(_reference_ggn(clean, loss, x, y))
    with caplog.at_level(logging.WARNING, logger="curvops.diagonal"):
        got = ggn_diagonal(model, loss, (x, y), chunk_size=4)
    assert _rel(got, want) <= 1e-12
    assert "vectorised (vmap) pullbacks" in caplog.text
    assert _rel(ggn_diagonal(clean, loss, (x, y)), want) <= 1e-12


def test_wrong_batched_backward_is_caught_on_the_chunked_path(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BatchNorm in training mode couples the samples: the chunks of ``is_grads_batched``
    pullbacks.  A custom Function's backward is looped there, not batched, so a wrong
    batching rule is injected into ``is_grads_batched`` results themselves."""
    grad = torch.autograd.grad

    def wrong_when_batched(*args: Any, **kwargs: Any) -> Any:
        out = grad(*args, **kwargs)
        if not kwargs.get("is_grads_batched"):
            return out
        return tuple(torch.cat([0.5 * g[:1], g[1:]]) if g.ndim else g for g in out)

    x, y = _data(8)
    model, loss = _Mlp(False, norm=True).double(), nn.CrossEntropyLoss()
    want = torch.diagonal(_reference_ggn(model, loss, x, y))
    monkeypatch.setattr(torch.autograd, "grad", wrong_when_batched)
    with caplog.at_level(logging.WARNING, logger="curvops.diagonal"):
        got = ggn_diagonal(model, loss, (x, y), chunk_size=5)
    assert "vectorised (vmap) pullbacks" in caplog.text
    assert _rel(got, want) <= 1e-12


@pytest.mark.parametrize("method", ["mc", "empirical"])
def test_fisher_diagonals_with_a_wrong_vmap_rule(method: str) -> None:
    """The same check covers the sampled factors: equal to the clean network's."""
    x, y = _data()
    loss = nn.CrossEntropyLoss()
    got = ggn_diagonal(_Mlp(True).double(), loss, (x, y), method=method, seed=3)
    want = ggn_diagonal(_Mlp(False).double(), loss, (x, y), method=method, seed=3)
    assert _rel(got, want) <= 1e-12


def test_dense_references_use_no_vmap() -> None:
    x, y = _data()
    loss = nn.CrossEntropyLoss()
    model, clean = _Mlp(True).double(), _Mlp(False).double()
    assert _rel(dense_ggn(model, loss, (x, y)), _reference_ggn(clean, loss, x, y)) <= 1e-12
    for kind in ("mc", "empirical"):
        got = dense_fisher(model, loss, (x, y), kind=kind)
        assert _rel(got, dense_fisher(clean, loss, (x, y), kind=kind)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_right_vmap_rules_keep_the_fast_path(
    dtype: torch.dtype, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No false alarm: rounding stays far inside the bound, in float32 too."""
    import curvops.diagonal as diagonal

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the per-sample path was left")

    monkeypatch.setattr(diagonal, "_sum_squared_vjps", refuse)
    model = nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )
    model = model.to(dtype)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(4), dtype=dtype) * 3
    y = torch.arange(32) % 4
    with caplog.at_level(logging.WARNING, logger="curvops.diagonal"):
        d = ggn_diagonal(model, nn.CrossEntropyLoss(), (x, y))
    assert caplog.text == ""
    want = torch.diagonal(_reference_ggn(model.double(), nn.CrossEntropyLoss(), x.double(), y))
    assert _rel(d.double(), want) <= (1e-12 if dtype == F64 else 1e-4)


def test_chunked_path_checked_without_false_alarm(caplog: pytest.LogCaptureFixture) -> None:
    """BatchNorm in training mode, right rules: is_grads_batched kept, exact."""
    x, y = _data(8)
    model, loss = _Mlp(False, norm=True).double(), nn.CrossEntropyLoss()
    with caplog.at_level(logging.WARNING, logger="curvops.diagonal"):
        d = ggn_diagonal(model, loss, (x, y), chunk_size=5)
    assert caplog.text == ""
    assert _rel(d, torch.diagonal(_reference_ggn(model, loss, x, y))) <= 1e-12
