"""GGNOperator(linearize=True): the traced single-batch Jacobian path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvops.ggn as ggn_module
from curvops._model_state import model_state, state_differences
from curvops.ggn import GGNOperator
from curvops.products import JacobianSandwichLinearization
from curvops.testing import dense_ggn

from .conftest import (
    CASES,
    CallCounter,
    Case,
    make_cnn,
    make_data,
    make_inputs,
    make_targets,
    random_columns,
)

SINGLE = [c for c in CASES if c.layout == "batch"]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", SINGLE, ids=lambda c: c.id)
def test_linearized_matches_dense_and_default_path(case: Case) -> None:
    model, loss, data = case.build()
    before = model_state(model)
    traced = GGNOperator(model, loss, data, bn_mode=case.bn_mode, linearize=True)
    plain = GGNOperator(model, loss, data, bn_mode=case.bn_mode, cache=False)
    D = dense_ggn(model, loss, data, bn_mode=case.bn_mode)
    for k in (1, 3):
        X = random_columns(traced.num_params, k)
        Y = traced.matmat(X)
        assert _relative_error(Y, D @ X) <= 1e-10
        if k == 1:  # same operations as a matvec, same bits
            assert torch.equal(Y, plain.matmat(X))
        else:  # the default matmat shares one forward pass: rounding may differ
            assert _relative_error(Y, plain.matmat(X)) <= 1e-13
        assert torch.equal(Y, traced.matmat(X))  # deterministic replay
    assert isinstance(traced._graph_cache[0][1], JacobianSandwichLinearization)  # traced path
    assert state_differences(before, model) == []


def test_trace_reused_and_invalidated(monkeypatch: pytest.MonkeyPatch) -> None:
    traces = CallCounter(monkeypatch, ggn_module, "jacobian_sandwich_linearization")
    model, loss = make_cnn(), nn.CrossEntropyLoss()
    x, y = make_inputs("cnn", 6), make_targets("ce", 6)
    G = GGNOperator(model, loss, (x, y), bn_mode="train", linearize=True)
    v = random_columns(G.num_params, 1)[:, 0]
    y1 = G @ v
    assert torch.equal(G @ v, y1)
    assert traces.calls == 1
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    y2 = G @ v
    assert traces.calls == 2
    assert _relative_error(y2, dense_ggn(model, loss, (x, y), bn_mode="train") @ v) <= 1e-10
    assert _relative_error(y2, y1) > 1e-6
    with torch.no_grad():
        x.mul_(-1.0)  # in-place change of the batch inputs
    y3 = G @ v
    assert traces.calls == 3
    assert _relative_error(y3, dense_ggn(model, loss, (x, y), bn_mode="train") @ v) <= 1e-10


def test_trace_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    traces = CallCounter(monkeypatch, ggn_module, "jacobian_sandwich_linearization", fail=True)
    model, loss = make_cnn(), nn.CrossEntropyLoss()
    data = (make_inputs("cnn", 6), make_targets("ce", 6))
    G = GGNOperator(model, loss, data, bn_mode="eval", linearize=True)
    X = random_columns(G.num_params, 2)
    D = dense_ggn(model, loss, data, bn_mode="eval")
    assert _relative_error(G.matmat(X), D @ X) <= 1e-10
    assert _relative_error(G.matmat(X), D @ X) <= 1e-10
    assert traces.calls == 1  # not retried after a failure


def test_off_by_default_and_for_several_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    traces = CallCounter(monkeypatch, ggn_module, "jacobian_sandwich_linearization")
    model, loss = make_cnn(), nn.CrossEntropyLoss()
    x, y = make_inputs("cnn", 9), make_targets("ce", 9)
    v = random_columns(sum(p.numel() for p in model.parameters()), 1)[:, 0]
    GGNOperator(model, loss, (x, y), bn_mode="eval") @ v
    GGNOperator(model, loss, make_data("list", x, y), bn_mode="eval", linearize=True) @ v
    assert traces.calls == 0


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_linearize_is_refused_for_recurrent_layers(kind: str) -> None:
    """torch.func.linearize traced wrong tangents through the recurrent kernels: a GGN
    2-99 % off the finite differences, non-symmetric and indefinite, without an error."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = getattr(nn, kind)(2, 2, batch_first=True)
            self.head = nn.Linear(2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Net().double()
    data = (torch.randn(6, 3, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match=rf"'linearize'.*{kind}.*'rnn'"):
        GGNOperator(model, nn.CrossEntropyLoss(), data, linearize=True)
    G = GGNOperator(model, nn.CrossEntropyLoss(), data)  # the default path is exact
    dense = G @ torch.eye(G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(dense, dense_ggn(model, nn.CrossEntropyLoss(), data))


def test_a_wrong_trace_is_detected_and_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each trace is checked against one untraced product: a trace that is off (here
    by 1e-3, deliberately) is dropped with a warning, and the products are exact."""
    traced = ggn_module.jacobian_sandwich_linearization

    def off(*args: object, **kwargs: object) -> JacobianSandwichLinearization:
        lin = traced(*args, **kwargs)  # type: ignore[arg-type]
        apply = lin.apply
        lin.apply = lambda V: [t * (1 + 1e-3) for t in apply(V)]  # type: ignore[method-assign]
        return lin

    monkeypatch.setattr(ggn_module, "jacobian_sandwich_linearization", off)
    model, loss = make_cnn(), nn.CrossEntropyLoss()
    data = (make_inputs("cnn", 6), make_targets("ce", 6))
    G = GGNOperator(model, loss, data, bn_mode="eval", linearize=True)
    X = random_columns(G.num_params, 2)
    with caplog.at_level("WARNING", logger="curvops.ggn"):
        got = G.matmat(X)
    assert _relative_error(got, dense_ggn(model, loss, data, bn_mode="eval") @ X) <= 1e-10
    assert "traced this model wrongly" in caplog.text


def test_masked_softmax_row_is_not_traced_wrongly() -> None:
    """A fully masked attention row (softmax of -inf, then nan_to_num): torch.func traced
    a finite GGN 35 % off the true one; now the trace is rejected and the operator
    behaves as the default path (PyTorch's own backward of that row is NaN: an error)."""
    from spectral.errors import NumericalError

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.o = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores = self.q(x) @ x.transpose(1, 2)
            mask = torch.zeros_like(scores, dtype=torch.bool)
            mask[:, 0, :] = True
            att = torch.softmax(scores.masked_fill(mask, float("-inf")), -1).nan_to_num(0.0)
            return self.o((att @ x).mean(1))

    torch.manual_seed(0)
    model = Masked().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    for linearize in (False, True):
        G = GGNOperator(model, nn.CrossEntropyLoss(), (x, y), linearize=linearize)
        with pytest.raises(NumericalError, match="non-finite"):
            G @ torch.ones(G.shape[0], dtype=torch.float64)
