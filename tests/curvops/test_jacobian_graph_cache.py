"""GGN and Fisher: the cached forward and J^T u graphs (curvops.products.jacobian_graph)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvops.curvature as curvature_module
from curvops import lean_ops
from curvops._model_state import model_state, state_differences
from curvops.fisher import FisherOperator
from curvops.ggn import GGNOperator
from curvops.testing import dense_fisher, dense_ggn

from .conftest import (
    CallCounter,
    KitchenSink,
    make_cnn,
    make_inputs,
    make_mlp,
    make_targets,
    random_columns,
)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("lean", [True, False])
def test_cached_ggn_matches_dense_and_uncached(
    bn_mode: str, lean: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through every lean operation (KitchenSink) and the conftest CNN, both BN modes."""
    monkeypatch.setattr(lean_ops, "LEAN_MIN_ELEMENTS", 0)
    gen = torch.Generator().manual_seed(3)
    for model, x in (
        (KitchenSink().double(), torch.randn(5, 2, 8, 8, generator=gen, dtype=torch.float64)),
        (make_cnn(), make_inputs("cnn", 5)),
    ):
        y = torch.randint(0, 3, (5,), generator=gen)
        before = model_state(model)
        loss = nn.CrossEntropyLoss()
        G = GGNOperator(model, loss, (x, y), bn_mode=bn_mode, lean_kernels=lean)
        plain = GGNOperator(model, loss, (x, y), bn_mode=bn_mode, cache=False)
        D = dense_ggn(model, loss, (x, y), bn_mode=bn_mode)
        for k in (1, 3):
            X = random_columns(G.num_params, k)
            Y = G.matmat(X)
            assert _relative_error(Y, D @ X) <= 1e-10
            assert _relative_error(Y, plain.matmat(X)) <= 1e-12
            assert torch.equal(Y, G.matmat(X))  # deterministic replay
        assert len(G._graph_cache) == 1  # the cached path was taken
        assert state_differences(before, model) == []


def test_ggn_graph_reused_and_invalidated(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = CallCounter(monkeypatch, curvature_module, "jacobian_graph")
    model, loss = make_cnn(), nn.CrossEntropyLoss()
    x, y = make_inputs("cnn", 6), make_targets("ce", 6)
    G = GGNOperator(model, loss, (x, y), bn_mode="train")
    v = random_columns(G.num_params, 1)[:, 0]
    y1 = G @ v
    assert torch.equal(G @ v, y1)
    assert builds.calls == 1
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    y2 = G @ v
    assert builds.calls == 2
    assert _relative_error(y2, dense_ggn(model, loss, (x, y), bn_mode="train") @ v) <= 1e-10
    with torch.no_grad():
        x.mul_(-1.0)  # the batch tensor in place
    G @ v
    assert builds.calls == 3
    uncached = GGNOperator(model, loss, (x, y), cache=False)
    uncached @ v
    assert builds.calls == 3


def test_ggn_list_cache_is_opt_in_and_loader_never_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = CallCounter(monkeypatch, curvature_module, "jacobian_graph")
    model, loss = make_mlp(), nn.MSELoss()
    x, y = make_inputs("mlp", 9), make_targets("mse", 9)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    v = random_columns(sum(p.numel() for p in model.parameters()), 1)[:, 0]
    reference = dense_ggn(model, loss, data) @ v
    for cache, expected in ((None, 0), (True, 2)):
        builds.calls = 0
        G = GGNOperator(model, loss, data, cache=cache)
        assert _relative_error(G @ v, reference) <= 1e-10
        G @ v
        assert builds.calls == expected
    builds.calls = 0
    G = GGNOperator(model, loss, DataLoader(TensorDataset(x, y), batch_size=4), cache=True)
    assert _relative_error(G @ v, reference) <= 1e-10
    assert builds.calls == 0


@pytest.mark.parametrize("kind", ["mc", "empirical"])
def test_cached_fisher_matches_dense_and_follows_the_seed(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = CallCounter(monkeypatch, curvature_module, "jacobian_graph")
    model, loss = make_cnn(), nn.CrossEntropyLoss()
    x, y = make_inputs("cnn", 6), make_targets("ce", 6)
    F = FisherOperator(model, loss, (x, y), kind=kind, mc_samples=2, seed=4)
    X = random_columns(F.num_params, 2)
    D = dense_fisher(model, loss, (x, y), kind=kind, mc_samples=2, seed=4)
    Y = F.matmat(X)
    assert _relative_error(Y, D @ X) <= 1e-10
    assert torch.equal(F.matmat(X), Y)
    assert builds.calls == 1
    plain = FisherOperator(model, loss, (x, y), kind=kind, mc_samples=2, seed=4, cache=False)
    assert _relative_error(plain.matmat(X), Y) <= 1e-12
    F.seed = 5  # a new seed draws new targets: the cached Q is stale
    Y5 = F.matmat(X)
    assert builds.calls == 2
    D5 = dense_fisher(model, loss, (x, y), kind=kind, mc_samples=2, seed=5)
    assert _relative_error(Y5, D5 @ X) <= 1e-10
