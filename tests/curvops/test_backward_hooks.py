"""Module backward hooks are not part of the curvature: a hook that rescales gradients
made every product wrong (Hessian 2.6x, GGN 4.9x off on a 3-layer MLP) and one that
records gradients recorded the products' cotangents.  During products they are off;
afterwards they are registered, called and removable as before, also after an error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from curvops import (
    EKFACOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
    ggn_diagonal,
)
from curvops.stats import loss_stats
from spectral.errors import NumericalError

from .conftest import small_batch, small_classifier

F64 = torch.float64


_model, _batch = small_classifier, small_batch


def _user_backward(model: nn.Module, data: Any) -> None:
    """An ordinary backward pass (inputs requiring grad: every hook has a grad_input)."""
    x, y = data
    nn.CrossEntropyLoss()(model(x.clone().requires_grad_(True)), y).backward()


class Calls:
    """Hooks that rescale gradients by 3 and count their calls."""

    def __init__(self) -> None:
        self.n = 0

    def full(self, module: nn.Module, grad_in: Any, grad_out: Any) -> Any:
        if not isinstance(module, nn.Linear):  # the global hook sees the loss module too
            return None
        self.n += 1
        return tuple(None if g is None else g * 3.0 for g in grad_in)

    def pre(self, module: nn.Module, grad_out: Any) -> Any:
        self.n += 1
        return tuple(g * 3.0 for g in grad_out)


def _full(m: nn.Sequential, calls: Calls) -> list[Any]:
    return [m[2].register_full_backward_hook(calls.full)]


def _pre(m: nn.Sequential, calls: Calls) -> list[Any]:
    return [m[2].register_full_backward_pre_hook(calls.pre)]


def _old_style(m: nn.Sequential, calls: Calls) -> list[Any]:
    return [m[2].register_backward_hook(calls.full)]


def _global(m: nn.Sequential, calls: Calls) -> list[Any]:
    return [nn.modules.module.register_module_full_backward_hook(calls.full)]


HOOKS: dict[str, Callable[[nn.Sequential, Calls], list[Any]]] = {
    "full": _full,
    "pre": _pre,
    "old-style": _old_style,
    "global": _global,
}


def _stats(model: nn.Module, data: Any) -> torch.Tensor:
    """The gradient and curvature moments of :func:`curvops.stats.loss_stats`."""
    x, y = data
    s = loss_stats(model, nn.CrossEntropyLoss(), (x, y), batch_size=4, seed=0, num_probes=2)
    keys = ("grad_mean_norm_sq", "grad_var", "hess_mean_norm_sq", "hess_mu", "frobenius_norm_sq")
    return torch.tensor([getattr(s, key) for key in keys], dtype=F64)


PRODUCTS: dict[str, Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]] = {
    "hessian": lambda m, d, v: HessianOperator(m, nn.CrossEntropyLoss(), d) @ v,
    "ggn": lambda m, d, v: GGNOperator(m, nn.CrossEntropyLoss(), d) @ v,
    "fisher-mc": lambda m, d, v: FisherOperator(m, nn.CrossEntropyLoss(), d, seed=0) @ v,
    "fisher-empirical": lambda m, d, v: (
        FisherOperator(m, nn.CrossEntropyLoss(), d, kind="empirical") @ v
    ),
    "kfac": lambda m, d, v: KFACOperator(m, nn.CrossEntropyLoss(), d) @ v,
    "ekfac": lambda m, d, v: EKFACOperator(m, nn.CrossEntropyLoss(), d) @ v,
    "ggn_diagonal": lambda m, d, v: ggn_diagonal(m, nn.CrossEntropyLoss(), d) * v,
    "loss_stats": lambda m, d, v: _stats(m, d),
}


@pytest.mark.parametrize("product", list(PRODUCTS))
@pytest.mark.parametrize("hook", list(HOOKS))
def test_products_ignore_backward_hooks(hook: str, product: str) -> None:
    data = _batch()
    v = torch.randn(38, dtype=F64, generator=torch.Generator().manual_seed(2))
    want = PRODUCTS[product](_model(), data, v)
    model, calls = _model(), Calls()
    handles = HOOKS[hook](model, calls)
    try:
        got = PRODUCTS[product](model, data, v)
        assert calls.n == 0  # not called during products
        assert torch.equal(got, want)
        # still registered and in force for the user's own backward passes
        _user_backward(model, data)
        assert calls.n > 0
    finally:
        for handle in handles:
            handle.remove()
    calls.n = 0
    _user_backward(model, data)
    assert calls.n == 0  # the user's handles removed them


def test_hooks_come_back_after_an_error() -> None:
    model, calls = _model(), Calls()
    handles = _full(model, calls) + _global(model, calls)
    op = HessianOperator(model, nn.CrossEntropyLoss(), _batch())
    registry = model[2]._backward_hooks
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        op @ torch.ones(38, dtype=F64)
    assert model[2]._backward_hooks is registry and len(registry) == 1
    assert len(nn.modules.module._global_backward_hooks) == 1
    for handle in handles:
        handle.remove()
    assert not registry and not nn.modules.module._global_backward_hooks
