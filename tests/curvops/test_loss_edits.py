"""The loss as it is now: a setting or class weight changed after construction reaches
the next product (bitwise equal to a freshly built operator's, and to the dense
reference), a bad one is refused like at construction, and nothing recorded with
the old loss is reused (``curvops.configuration``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import curvops.validation
from curvops import EKFACOperator, FisherOperator, GGNOperator, HessianOperator, KFACOperator
from curvops.configuration import ConfigurationState, configuration_of
from curvops.losses import declare_loss, sequence_cross_entropy
from curvops.testing import dense_fisher, dense_ggn, dense_hessian

from .conftest import small_batch, small_classifier

F64 = torch.float64


_model, _batch = small_classifier, small_batch


def _data(layout: str) -> Any:
    x, y = _batch()
    return (x, y) if layout == "one batch" else [(x[:5], y[:5]), (x[5:], y[5:])]


def _weighted_ce() -> nn.CrossEntropyLoss:
    return nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=F64))


def _scale_weight(loss: nn.Module) -> None:
    loss.weight.mul_(torch.tensor([1.0, 1.0, 4.0], dtype=F64))  # the graph saved it


def _data_weight(loss: nn.Module) -> None:
    loss.weight.data[1] = 0.25  # no version bump


def _new_weight(loss: nn.Module) -> None:
    loss.weight = torch.tensor([3.0, 1.0, 1.0], dtype=F64)


def _smoothing(loss: nn.Module) -> None:
    loss.label_smoothing = 0.2


def _ignore(loss: nn.Module) -> None:
    loss.ignore_index = 2


def _sum(loss: nn.Module) -> None:
    loss.reduction = "sum"


EDITS: dict[str, Callable[[nn.Module], None]] = {
    "weight in place": _scale_weight,
    "weight through .data": _data_weight,
    "weight reassigned": _new_weight,
    "label_smoothing": _smoothing,
    "ignore_index": _ignore,
    "reduction": _sum,
}

KINDS: dict[str, Callable[..., Any]] = {
    "hessian": lambda m, loss, d, cache: HessianOperator(m, loss, d, cache=cache),
    "ggn": lambda m, loss, d, cache: GGNOperator(m, loss, d, cache=cache),
    "fisher-empirical": lambda m, loss, d, cache: FisherOperator(
        m, loss, d, kind="empirical", cache=cache
    ),
}

REFERENCES: dict[str, Callable[..., torch.Tensor]] = {
    "hessian": dense_hessian,
    "ggn": dense_ggn,
    "fisher-empirical": functools.partial(dense_fisher, kind="empirical"),
}


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("layout", ["one batch", "two batches"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_loss_reaches_the_next_product(
    edit: str, kind: str, layout: str, cache: bool
) -> None:
    model, data = _model(), _data(layout)
    loss = _weighted_ce()
    op = KINDS[kind](model, loss, data, cache)
    v = torch.randn(op.shape[0], dtype=F64, generator=torch.Generator().manual_seed(2))
    before = op @ v
    EDITS[edit](loss)
    after = op @ v
    fresh = KINDS[kind](model, loss, data, cache) @ v
    assert not torch.allclose(after, before)  # the edit matters for this operator
    assert torch.equal(after, fresh)
    dense = REFERENCES[kind](model, loss, data) @ v
    assert torch.allclose(after, dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("edit", ["ignore_index", "reduction"])
def test_an_edited_loss_reaches_the_mc_fisher(edit: str) -> None:
    model, data = _model(), _data("two batches")
    loss = nn.CrossEntropyLoss()
    op = FisherOperator(model, loss, data, kind="mc", seed=3, cache=True)
    v = torch.randn(op.shape[0], dtype=F64, generator=torch.Generator().manual_seed(2))
    before = op @ v
    EDITS[edit](loss)
    after = op @ v
    assert not torch.allclose(after, before)
    fresh = FisherOperator(model, loss, data, kind="mc", seed=3, cache=True)
    assert torch.equal(after, fresh @ v)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_kfac_factors_follow_an_edited_loss(cls: type) -> None:
    model, data = _model(), _data("two batches")
    loss = nn.CrossEntropyLoss()
    op = cls(model, loss, data)
    v = torch.randn(op.shape[0], dtype=F64, generator=torch.Generator().manual_seed(2))
    before = op @ v
    loss.reduction = "sum"
    after = op @ v
    assert not torch.allclose(after, before)
    assert torch.equal(after, cls(model, loss, data) @ v)
    loss.label_smoothing = 0.1  # not a likelihood K-FAC's type-2 Fisher can use
    with pytest.raises(ValueError, match="loss_fn"):
        op @ v


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    ("value", "name"),
    [(-1.0, "loss_fn.weight"), (float("nan"), "loss_fn.weight"), (float("inf"), "loss_fn.weight")],
)
def test_a_bad_class_weight_written_after_construction_is_refused(
    kind: str, value: float, name: str
) -> None:
    model, data = _model(), _data("one batch")
    loss = _weighted_ce()
    op = KINDS[kind](model, loss, data, True)
    v = torch.ones(op.shape[0], dtype=F64)
    op @ v
    loss.weight.data[0] = value
    for _ in range(2):  # refused in every product, never taken as the new normal
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            op @ v
    loss.weight.data[0] = 1.0  # repaired: products run again, equal to a fresh operator
    assert torch.equal(op @ v, KINDS[kind](model, loss, data, True) @ v)


def test_a_reduction_none_written_after_construction_is_refused() -> None:
    model, data = _model(), _data("one batch")
    loss = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss, data)
    op @ torch.ones(op.shape[0], dtype=F64)
    loss.reduction = "none"
    with pytest.raises(ValueError, match=r"loss_fn\.reduction"):
        op @ torch.ones(op.shape[0], dtype=F64)


def test_an_ignore_index_that_leaves_targets_out_of_range_is_refused() -> None:
    model = _model()
    x, _ = _batch()
    y = torch.tensor([0, 1, 2, 3, 3, 0, 1, 2])  # 3 is ignored at construction
    loss = nn.CrossEntropyLoss(ignore_index=3)
    op = GGNOperator(model, loss, (x, y))
    op @ torch.ones(op.shape[0], dtype=F64)
    loss.ignore_index = -100
    with pytest.raises(ValueError, match=r"data \(batch 0\)"):
        op @ torch.ones(op.shape[0], dtype=F64)


def test_partial_and_declared_losses_are_followed() -> None:
    model, data = _model(), _data("two batches")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    partial = functools.partial(nn.functional.cross_entropy, label_smoothing=0.0)
    op = HessianOperator(model, partial, data, cache=True)
    op @ v
    partial.keywords["label_smoothing"] = 0.3
    assert torch.equal(op @ v, HessianOperator(model, partial, data, cache=True) @ v)

    seq = sequence_cross_entropy()
    declared = declare_loss(lambda f, y: seq(f.unsqueeze(1), y.unsqueeze(1)), normaliser="targets")
    op = GGNOperator(model, declared, data, cache=True)
    op @ v
    declared.ignore_index = 1  # counted targets change: batches are reweighted
    assert torch.equal(op @ v, GGNOperator(model, declared, data, cache=True) @ v)


def test_an_unchanged_loss_is_not_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = curvops.validation.validate  # what validated_on_ranks runs

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(curvops.validation, "validate", counting)
    loss = _weighted_ce()
    op = HessianOperator(_model(), loss, _data("one batch"))
    v = torch.ones(op.shape[0], dtype=F64)
    for _ in range(3):
        op @ v
    assert len(calls) == 1  # construction only
    _smoothing(loss)
    op @ v
    op @ v
    assert len(calls) == 2  # once for the change


def test_configuration_state_records_only_an_accepted_change() -> None:
    loss = _weighted_ce()
    state = ConfigurationState(loss)
    assert state.update() and state.generation == 1

    def refuse() -> None:
        raise ValueError("refused")

    loss.label_smoothing = 0.5
    for _ in range(2):
        with pytest.raises(ValueError, match="refused"):
            state.update(check=refuse)
    assert state.generation == 1
    assert state.update() and state.generation == 2
    assert not state.update()


def test_configuration_of_covers_submodules_partials_and_objects() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.CrossEntropyLoss(weight=torch.ones(2))

        def forward(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.inner(f, y)

    wrapped = Wrapped()
    settings, tensors, _ = configuration_of(wrapped)
    names = {entry[0][1] for entry in settings if isinstance(entry[0], tuple)}
    assert {"training", "reduction", "label_smoothing"} <= names
    assert [tuple(t.shape) for t in tensors] == [(2,)]
    state = ConfigurationState(wrapped)
    state.update()
    wrapped.inner.label_smoothing = 0.1  # a submodule's setting
    assert state.update()
    wrapped.inner = nn.CrossEntropyLoss(weight=torch.ones(2), label_smoothing=0.1)  # replaced
    assert state.update()
    w = torch.ones(3)
    settings, tensors, _ = configuration_of(
        functools.partial(nn.functional.cross_entropy, weight=w)
    )
    assert tensors == [w]
    assert configuration_of(nn.functional.cross_entropy) == ((), [], [])
