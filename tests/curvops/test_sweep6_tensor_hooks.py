"""Tensor hooks are not part of the curvature, like module backward hooks.

A hook that ``forward`` registers on an intermediate tensor (``h.register_hook(lambda
g: 0.5 * g)`` of a gradient-scaling layer) stayed active during products: the Hessian
was 46 % off the forward function's, a two-batch GGN declared symmetric and PSD was
non-symmetric by 23 %, and a recording hook saw the products' cotangents.  During
products such registrations now register nothing (a handle that removes nothing);
hooks registered beforehand on parameters never see products (products differentiate
their own copies).  Outside products every hook works as before.

References: dense float64 matrices of the hook-free function (a twin without the hook,
same weights) from ``torch.func.functional_call`` with
``torch.autograd.functional.hessian`` / ``jacobian``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvops import FisherOperator, GGNOperator, HessianOperator, ggn_diagonal

F64 = torch.float64


class _Net(nn.Module):
    """Linear-Tanh-Linear (3 -> 4 -> 3); ``forward`` registers ``hook`` on the hidden
    activations (None: no hook)."""

    def __init__(self, hook: Callable[[torch.Tensor], Any] | None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.hook = hook
        self.handles: list[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.hook is not None and h.requires_grad:
            self.handles.append(h.register_hook(self.hook))
        return self.b(h)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    return x, torch.tensor([0, 1, 2, 0, 1, 2])


def _flat(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x, _ = _data()

    def forward(t: torch.Tensor) -> torch.Tensor:
        parts = t.split([s.numel() for s in shapes])
        return functional_call(
            model, dict(zip(names, (p.reshape(s) for p, s in zip(parts, shapes)))), (x,)
        )

    return forward, theta


def _reference_hessian(model: nn.Module) -> torch.Tensor:
    forward, theta = _flat(model)
    _, y = _data()
    return torch.autograd.functional.hessian(lambda t: nn.CrossEntropyLoss()(forward(t), y), theta)


def _reference_ggn(model: nn.Module) -> torch.Tensor:
    forward, theta = _flat(model)
    _, y = _data()
    out = forward(theta).detach()
    J = torch.autograd.functional.jacobian(forward, theta).reshape(out.numel(), -1)
    H = torch.autograd.functional.hessian(
        lambda o: nn.CrossEntropyLoss()(o.reshape(out.shape), y), out.reshape(-1)
    )
    return J.T @ H @ J


def _twins(hook: Callable[[torch.Tensor], Any]) -> tuple[nn.Module, nn.Module]:
    """A network with ``hook`` and the hook-free function (same weights)."""
    return _Net(hook).double(), _Net(None).double()


def _dense(op: Any) -> torch.Tensor:
    return op.matmat(torch.eye(op.shape[0], dtype=F64))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _halve(g: torch.Tensor) -> torch.Tensor:
    return 0.5 * g


@pytest.mark.parametrize("cache", [True, False])
def test_hessian_is_the_forward_functions(cache: bool) -> None:
    model, clean = _twins(_halve)
    H = HessianOperator(model, nn.CrossEntropyLoss(), _data(), cache=cache)
    assert _rel(_dense(H), _reference_hessian(clean)) <= 1e-12


@pytest.mark.parametrize("options", [{"cache": True}, {"cache": False}, {"linearize": True}])
def test_two_batch_ggn_is_exact_and_symmetric(options: dict[str, Any]) -> None:
    model, clean = _twins(_halve)
    x, y = _data()
    G = GGNOperator(model, nn.CrossEntropyLoss(), [(x[:3], y[:3]), (x[3:], y[3:])], **options)
    M = _dense(G)
    assert G.symmetric and G.psd
    assert _rel(M, M.T) <= 1e-14
    assert _rel(M, _reference_ggn(clean)) <= 1e-12
    assert float(torch.linalg.eigvalsh(0.5 * (M + M.T))[0]) >= -1e-12 * float(M.norm())


@pytest.mark.parametrize("kind", ["mc", "empirical"])
def test_fisher_and_diagonal_equal_the_hook_free_ones(kind: str) -> None:
    model, clean = _twins(_halve)
    loss, data = nn.CrossEntropyLoss(), _data()
    got = _dense(FisherOperator(model, loss, data, kind=kind))
    assert _rel(got, _dense(FisherOperator(clean, loss, data, kind=kind))) <= 1e-14
    want = torch.diagonal(_reference_ggn(clean))
    assert _rel(ggn_diagonal(model, loss, data), want) <= 1e-12


def test_loss_gradient_is_the_forward_functions() -> None:
    model, clean = _twins(_halve)
    forward, theta = _flat(clean)
    _, y = _data()
    want = torch.autograd.functional.jacobian(lambda t: nn.CrossEntropyLoss()(forward(t), y), theta)
    got = HessianOperator(model, nn.CrossEntropyLoss(), _data()).loss_gradient()
    assert _rel(got, want) <= 1e-12


def test_recording_hooks_never_see_products_and_work_afterwards() -> None:
    seen: list[torch.Tensor] = []
    model = _Net(seen.append).double()
    data = _data()
    G = GGNOperator(model, nn.CrossEntropyLoss(), data)
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, cache=False)
    v = torch.ones(H.shape[0], dtype=F64)
    G @ v, H @ v, H @ v
    assert seen == []
    for handle in model.handles:  # the inert handles remove nothing, without an error
        handle.remove()
    model.handles.clear()
    x, y = data
    nn.CrossEntropyLoss()(model(x), y).backward()  # outside products: the hook runs
    assert len(seen) == 1 and len(model.handles) == 1


def test_parameter_hooks_registered_before_are_inert_in_products() -> None:
    model, clean = _twins(_halve)
    model.hook = None
    seen: list[torch.Tensor] = []

    def scale_and_record(g: torch.Tensor) -> torch.Tensor:
        seen.append(g)
        return 3.0 * g

    handles = [p.register_hook(scale_and_record) for p in model.parameters()]
    H = HessianOperator(model, nn.CrossEntropyLoss(), _data())
    assert _rel(_dense(H), _reference_hessian(clean)) <= 1e-12
    G = GGNOperator(model, nn.CrossEntropyLoss(), _data(), cache=False)
    assert _rel(_dense(G), _reference_ggn(clean)) <= 1e-12
    assert seen == []
    x, y = _data()
    nn.CrossEntropyLoss()(model(x), y).backward()  # the hooks are still there
    assert len(seen) == len(handles)
    for handle in handles:
        handle.remove()
