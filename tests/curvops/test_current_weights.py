"""Contract 2 ("the model as it is now"): every route that changes the weights is
seen by the next product, bitwise equal to a freshly built operator's."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from curvops import EKFACOperator, FisherOperator, GGNOperator, HessianOperator, KFACOperator


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def _data(batches: int) -> object:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    return (x, y) if batches == 1 else [(x[:4], y[:4]), (x[4:], y[4:])]


def _sgd_step(m: nn.Module) -> None:
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    out = m(torch.randn(5, 3, dtype=torch.float64))
    out.square().mean().backward()
    opt.step()
    m.zero_grad(set_to_none=True)


def _data_edit(m: nn.Module) -> None:
    m[0].weight.data.mul_(3)  # bumps no version counter


def _copy_no_grad(m: nn.Module) -> None:
    with torch.no_grad():
        m[3].weight.copy_(m[3].weight * -2)


def _state_dict(assign: bool) -> Callable[[nn.Module], None]:
    def change(m: nn.Module) -> None:
        sd = {
            k: v.clone() * 1.5 if v.is_floating_point() else v.clone()
            for k, v in m.state_dict().items()
        }
        m.load_state_dict(sd, assign=assign)

    return change


def _new_parameter(m: nn.Module) -> None:
    m[0].bias = nn.Parameter(m[0].bias.detach() + 1)


def _new_module(m: nn.Module) -> None:
    old = m[3]
    m[3] = nn.Linear(4, 2).double()
    with torch.no_grad():
        m[3].weight.copy_(old.weight * 2)


def _buffer_edit(m: nn.Module) -> None:
    m[2].running_var.data.mul_(4)  # eval-mode BatchNorm reads it


ROUTES: dict[str, Callable[[nn.Module], None]] = {
    "optimizer-step": _sgd_step,
    "data-edit": _data_edit,
    "copy-under-no-grad": _copy_no_grad,
    "load_state_dict": _state_dict(False),
    "load_state_dict-assign": _state_dict(True),
    "new-parameter": _new_parameter,
    "new-module": _new_module,
    "buffer-data-edit": _buffer_edit,
}
OPERATORS = {
    "hessian": lambda m, d, **kw: HessianOperator(m, nn.CrossEntropyLoss(), d, **kw),
    "ggn": lambda m, d, **kw: GGNOperator(m, nn.CrossEntropyLoss(), d, **kw),
    "fisher": lambda m, d, **kw: FisherOperator(m, nn.CrossEntropyLoss(), d, kind="mc", **kw),
}


@pytest.mark.parametrize("cache", [None, True, False])
@pytest.mark.parametrize("op_name", sorted(OPERATORS))
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_next_product_sees_the_change(route: str, op_name: str, cache: bool | None) -> None:
    model = _model().eval()
    data = _data(1 if cache is None else 2)
    make = OPERATORS[op_name]
    op = make(model, data, cache=cache)
    v = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = op @ v
    ROUTES[route](model)
    after = op @ v
    fresh = make(model, data, cache=cache) @ v
    assert torch.equal(after, fresh)
    assert not torch.equal(after, before)
    assert [id(p) for _, p in op.params] == [id(p) for p in model.parameters()]


def test_linearized_ggn_sees_data_edit() -> None:
    model = _model().eval()
    data = _data(1)
    op = GGNOperator(model, nn.CrossEntropyLoss(), data, linearize=True)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    before = op @ v
    _data_edit(model)
    after = op @ v
    assert not torch.equal(after, before)
    fresh = GGNOperator(model, nn.CrossEntropyLoss(), data, linearize=True) @ v
    assert torch.equal(after, fresh)


def test_unchanged_model_keeps_the_cached_graph() -> None:
    model = _model().eval()
    op = HessianOperator(model, nn.CrossEntropyLoss(), _data(1))
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    graph = next(iter(op._graph_cache.values()))[1]
    op @ v
    assert next(iter(op._graph_cache.values()))[1] is graph


@pytest.mark.parametrize("change", ["dtype", "removed"])
def test_changed_dtype_or_missing_parameter_refused(change: str) -> None:
    model = _model()
    op = HessianOperator(model, nn.CrossEntropyLoss(), _data(1))
    if change == "dtype":
        model.float()
        match = "float32"
    else:
        del model[0].bias
        model[0].register_parameter("bias", None)
        match = "0.bias"
    with pytest.raises(ValueError, match=match) as info:
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert "Argument 'model'" in str(info.value)


KRONECKER = {
    "kfac": lambda m, d: KFACOperator(m, nn.CrossEntropyLoss(), d, remainder="diagonal"),
    "ekfac": lambda m, d: EKFACOperator(m, nn.CrossEntropyLoss(), d, remainder="diagonal"),
}


@pytest.mark.parametrize("batches", [1, 2])
@pytest.mark.parametrize("op_name", sorted(KRONECKER))
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_kronecker_factors_follow_the_change(route: str, op_name: str, batches: int) -> None:
    """K-FAC / E-KFAC factors are cached per model state: every route is seen (a
    ``.data`` edit bumps no version counter, so a version-keyed cache missed it)."""
    model = _model().eval()
    data = _data(batches)
    make = KRONECKER[op_name]
    op = make(model, data)
    v = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = op @ v
    ROUTES[route](model)
    if route == "new-module":  # the factors' hooks are on the layer objects
        with pytest.raises(ValueError, match=r"'model'.*module\(s\) \['3'\] were replaced"):
            op @ v
        return
    after = op @ v
    fresh = make(model, data) @ v
    assert torch.equal(after, fresh)
    assert not torch.equal(after, before)


def _edit_inputs(data: object, through_data: bool) -> None:
    batch = data if isinstance(data, tuple) else data[-1]  # type: ignore[index]
    inputs = batch[0].data if through_data else batch[0]  # .data: no version bump
    inputs[1].mul_(-2.0)


def _edit_targets(data: object, through_data: bool) -> None:
    batch = data if isinstance(data, tuple) else data[-1]  # type: ignore[index]
    targets = batch[1].data if through_data else batch[1]
    targets[0] = 1 - batch[1][0]


@pytest.mark.parametrize("edit", [_edit_inputs, _edit_targets], ids=["inputs", "targets"])
@pytest.mark.parametrize("cache", [None, True])
@pytest.mark.parametrize("op_name", sorted(OPERATORS) + sorted(KRONECKER))
def test_next_product_sees_a_data_edit_of_the_batch(
    op_name: str, cache: bool | None, edit: Callable[[object, bool], None]
) -> None:
    """In-memory batches edited in place through ``.data``: a cached graph recorded on
    the old values must not be mixed with the new ones (it was: the saved inputs were
    the new values, the activations the old ones).  K-FAC keys its factors on the
    data's version counters (a bitwise comparison would cost more than its product):
    it sees in-place edits, not edits through ``.data``."""
    model = _model().eval()
    data = _data(1 if cache is None else 2)
    if op_name in KRONECKER:
        make: Callable[..., object] = lambda m, d, **kw: KRONECKER[op_name](m, d)  # noqa: E731
    else:
        make = OPERATORS[op_name]
    op = make(model, data, cache=cache)
    v = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # type: ignore[attr-defined]
    before = op @ v  # type: ignore[operator]
    edit(data, op_name not in KRONECKER)
    after = op @ v  # type: ignore[operator]
    fresh = make(model, data, cache=cache) @ v  # type: ignore[operator]
    assert torch.equal(after, fresh)
    if edit is _edit_inputs or op_name == "hessian":  # GGN, Fisher, K-FAC: no targets in CE's
        assert not torch.equal(after, before)  # output curvature


@pytest.mark.parametrize("through_data", [False, True], ids=["in-place", "data"])
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("op_name", sorted(OPERATORS))
def test_targets_newly_ignored_reweight_the_batches(
    op_name: str, cache: bool, through_data: bool
) -> None:
    """The batches' weights are the loss's normalisers (counted targets): a target set
    to ``ignore_index`` after construction changes them (weights counted at
    construction mis-weighted the batches: 60 % off for the Hessian)."""
    model = _model().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    data = [(x[:4], y[:4].clone()), (x[4:], y[4:].clone())]
    loss = nn.CrossEntropyLoss(ignore_index=-100)
    kwargs = {"kind": "mc"} if op_name == "fisher" else {}
    cls = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}[op_name]
    op = cls(model, loss, data, cache=cache, **kwargs)
    v = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=g)
    before = op @ v
    targets = data[1][1].data if through_data else data[1][1]
    targets[:3] = -100
    after = op @ v
    fresh = cls(model, loss, data, cache=cache, **kwargs) @ v
    assert torch.equal(after, fresh)
    assert not torch.allclose(after, before, rtol=1e-3)
