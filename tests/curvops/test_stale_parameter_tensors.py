"""Tensors computed from the parameters before a product: refused, never a silent gap.

Products evaluate the model with its parameters swapped for their own tensors.  A
tensor derived from a parameter and kept as a plain module attribute (a tied weight
made once in ``__init__``, an effective weight cached by ``forward``) still refers to
the model's own parameter, so every product left out the paths through it: the
Hessian of the models below was 95 % (tied view) and 91 % (cache) off, without an
error.  Now the operator refuses such a model when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
    ggn_diagonal,
    loss_stats,
)
from curvops._model_state import model_state, state_differences
from curvops.testing import dense_hessian

from .conftest import relative_error

EPS = float(np.finfo(np.float64).eps)


class TiedView(nn.Module):
    """A decoder tied to the encoder through a view made once in ``__init__``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 6, bias=False, dtype=torch.float64)
        self.dec_weight = self.enc.weight.view(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.enc(x)) @ self.dec_weight


class CachedWeight(nn.Module):
    """Caches an effective weight the first time it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4, dtype=torch.float64)
        self.head = nn.Linear(4, 4, dtype=torch.float64)
        self.effective: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.effective is None:
            self.effective = 2 * self.inner.weight
        return self.head(torch.tanh(x @ self.effective.T + self.inner.bias))


class UncachedWeight(CachedWeight):
    """The same function computed afresh in every call: the reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x @ (2 * self.inner.weight).T + self.inner.bias))


def _build(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls()  # float64 already (.double() would leave a view made in __init__ behind)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return x, torch.arange(8) % 4


LOSS = nn.CrossEntropyLoss()

BUILDERS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "hessian": lambda m, d: HessianOperator(m, LOSS, d),
    "ggn": lambda m, d: GGNOperator(m, LOSS, d),
    "fisher": lambda m, d: FisherOperator(m, LOSS, d),
    "kfac": lambda m, d: KFACOperator(m, LOSS, d, remainder="diagonal"),
    "ggn-diagonal": lambda m, d: ggn_diagonal(m, LOSS, d),
    "loss-stats": lambda m, d: loss_stats(m, LOSS, d, batch_size=4, num_probes=2),
}


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("case", ["tied-view", "filled-cache"])
def test_tensors_derived_from_the_parameters_are_refused(case: str, kind: str) -> None:
    if case == "tied-view":
        model, culprit = _build(TiedView), "enc.weight"
    else:
        model, culprit = _build(CachedWeight), "inner.weight"
        model(_data()[0])  # the user's own forward pass fills the cache
    before = model_state(model)
    with pytest.raises(ValueError, match=r"Argument 'model'.*computed from them earlier") as info:
        BUILDERS[kind](model, _data())
    assert repr(culprit) in str(info.value)
    assert state_differences(before, model) == []


OPERATORS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "hessian": lambda m, d: HessianOperator(m, LOSS, d),
    "ggn": lambda m, d: GGNOperator(m, LOSS, d),
    "ggn-linearized": lambda m, d: GGNOperator(m, LOSS, d, linearize=True),
    "fisher-mc": lambda m, d: FisherOperator(m, LOSS, d),
    "fisher-empirical": lambda m, d: FisherOperator(m, LOSS, d, kind="empirical"),
    "kfac": lambda m, d: KFACOperator(m, LOSS, d, remainder="diagonal"),
}


@pytest.mark.parametrize("batches", [1, 2])
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_a_cache_filled_after_the_operator_was_built_is_refused(kind: str, batches: int) -> None:
    """The operator is built while the cache is empty (nothing to refuse), then the
    user's own forward pass fills it from the real parameters: the first product
    records its graph through the stale cache and refuses it."""
    model = _build(CachedWeight)
    data = _data() if batches == 1 else [_data(), _data()]
    op = OPERATORS[kind](model, data)
    model(_data()[0])  # fills model.effective with the parameters' own graph
    before = model_state(model)
    with pytest.raises(ValueError, match=r"Argument 'model'.*computed from them earlier") as info:
        op @ np.ones(op.shape[0])
    assert "'inner.weight'" in str(info.value)
    assert state_differences(before, model) == []


def test_a_cache_filled_between_graph_builds_is_refused() -> None:
    """A cached Hessian records a new graph after the parameters changed: a cache the
    user's forward pass filled in between is refused there, after exact products."""
    model, reference = _build(CachedWeight), _build(UncachedWeight)
    data = _data()
    v = np.random.default_rng(2).standard_normal(sum(p.numel() for p in model.parameters()))
    op = HessianOperator(model, LOSS, data)
    H = dense_hessian(reference, LOSS, data).numpy()
    assert relative_error(op @ v, H @ v) <= 1e3 * EPS
    with torch.no_grad():
        model.head.weight.mul_(0.5)  # a training step: the next product records anew
    model(data[0])
    with pytest.raises(ValueError, match=r"computed from them earlier"):
        op @ v


def test_a_cache_the_product_fills_itself_is_exact_and_emptied_again() -> None:
    """Empty when the operator is built, the cache is filled from the product's own
    parameters in every product and put back to ``None`` after it."""
    model, reference = _build(CachedWeight), _build(UncachedWeight)
    data = _data()
    v = np.random.default_rng(0).standard_normal(sum(p.numel() for p in model.parameters()))
    H = dense_hessian(reference, LOSS, data).numpy()
    op = HessianOperator(model, LOSS, data)
    assert relative_error(op @ v, H @ v) <= 1e3 * EPS
    assert model.effective is None


def test_hooks_that_recompute_their_weight_are_not_refused() -> None:
    """``nn.utils.weight_norm`` (the old hook) keeps the weight it computed last as a
    plain attribute, with that computation's graph, but computes it afresh from the
    product's parameters before every use: the products are those of the same
    weight-normalised model written with ``parametrizations.weight_norm``."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    old = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 4))
    old = old.double()
    new = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        for a, b in zip(new.parameters(), old.parameters(), strict=True):
            a.copy_(b)
    data = _data()
    old(data[0])  # the user's forward pass: old[0].weight now holds its graph
    assert old[0].weight.grad_fn is not None
    v = np.random.default_rng(1).standard_normal(sum(p.numel() for p in old.parameters()))
    want = HessianOperator(new, LOSS, data) @ v
    assert relative_error(HessianOperator(old, LOSS, data) @ v, want) <= 1e3 * EPS


def test_inputs_that_require_gradients_are_not_refused() -> None:
    model = _build(UncachedWeight)
    x, y = _data()
    op = HessianOperator(model, LOSS, (x.requires_grad_(), y))
    assert np.all(np.isfinite(op @ np.ones(op.shape[0])))
