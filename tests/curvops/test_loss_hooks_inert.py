"""Tensor hooks that the loss registers are not part of the curvature.

A loss that puts a hook on the model outputs (``o.register_hook(lambda g: 0.5 * g)``:
gradient scaling, a gradient-reversal trick, a logging hook) changed the gradients
autograd computes inside products: the Hessian was 58 % off (Frobenius norm 0.51
against 1.21) and the GGN 75 % (the hook entered the output Hessian twice), silently.
Every loss evaluation of curvops now runs through
:func:`curvops.inert_hooks.evaluate_loss`, which registers nothing, as products do with
hooks registered in ``forward``.  Reference: the same quantity with the plain loss
(the same loss class without the hook), which the dense float64 tests check
elsewhere; the hooked loss must give bitwise the same numbers, with one batch and two.
(The MC Fisher accepts only the recognised loss classes themselves, not subclasses.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import curvops
from curvops.inert_hooks import evaluate_loss

F64 = torch.float64


class _HookedCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy whose forward registers ``hook`` on its input (the logits); ``None``:
    no hook (the reference: a subclass takes the same code paths as the hooked one)."""

    def __init__(self, hook: Callable[[torch.Tensor], Any] | None) -> None:
        super().__init__()
        self.hook = hook

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hook is not None and input.requires_grad:
            input.register_hook(self.hook)
        return super().forward(input, target)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 3, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g))
        for n in (4, 3)
    ]


def _dense(make: Callable[[nn.Module, Any, Any], Any], loss: Any, data: Any) -> torch.Tensor:
    op = make(_model(), loss, data)
    return torch.as_tensor(op @ torch.eye(op.shape[0], dtype=F64))


_KINDS: dict[str, Callable[[nn.Module, Any, Any], Any]] = {
    "hessian": curvops.HessianOperator,
    "ggn": curvops.GGNOperator,
    "fisher-empirical": lambda m, f, d: curvops.FisherOperator(m, f, d, kind="empirical"),
    "kfac-empirical": lambda m, f, d: curvops.KFACOperator(m, f, d, fisher="empirical"),
}


@pytest.mark.parametrize("kind", sorted(_KINDS))
@pytest.mark.parametrize("two_batches", [False, True])
def test_hook_registered_by_the_loss_changes_no_product(kind: str, two_batches: bool) -> None:
    data = _batches() if two_batches else _batches()[0]
    calls: list[int] = []

    def halve(g: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 0.5 * g

    plain = _dense(_KINDS[kind], _HookedCrossEntropy(None), data)
    hooked = _dense(_KINDS[kind], _HookedCrossEntropy(halve), data)
    assert float(plain.norm()) > 0
    assert torch.equal(hooked, plain)
    assert calls == []  # never called by a product


def test_hook_registered_by_the_loss_changes_no_diagonal_or_statistics() -> None:
    data = _batches()
    hooked = _HookedCrossEntropy(lambda g: 0.5 * g)
    plain = _HookedCrossEntropy(None)
    assert torch.equal(
        torch.as_tensor(curvops.ggn_diagonal(_model(), hooked, data)),
        torch.as_tensor(curvops.ggn_diagonal(_model(), plain, data)),
    )
    a = curvops.loss_stats(_model(), hooked, data, num_probes=2, seed=0)
    b = curvops.loss_stats(_model(), plain, data, num_probes=2, seed=0)
    for field in ("hess_mean_norm_sq", "hess_var", "grad_mean_norm_sq", "frobenius_norm_sq"):
        assert getattr(a, field) == getattr(b, field), field


def test_evaluate_loss_leaves_hooks_outside_products_alone() -> None:
    o = torch.ones(2, dtype=F64, requires_grad=True)

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out.register_hook(lambda g: 0.0 * g)
        return ((out - t) ** 2).sum()

    (inert,) = torch.autograd.grad(evaluate_loss(loss, o, torch.zeros(2, dtype=F64)), o)
    (active,) = torch.autograd.grad(loss(o, torch.zeros(2, dtype=F64)), o)
    assert inert.tolist() == [2.0, 2.0]
    assert active.tolist() == [0.0, 0.0]  # the hook works outside curvops
