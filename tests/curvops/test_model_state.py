"""The model is never changed: parameters, buffers, modes, requires_grad and .grad, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn

from curvops._model_state import curvature_mode, model_state, state_differences
from curvops.diagonal import ggn_diagonal
from curvops.fisher import FisherOperator
from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.stats import loss_stats
from spectral.krylov import lanczos

from .conftest import make_cnn, make_data, make_inputs, make_mlp, make_targets


def _prepared_cnn(training: bool) -> nn.Module:
    model = make_cnn().train(training)
    model[0].weight.requires_grad_(False)  # a frozen parameter
    model[4].weight.grad = torch.full_like(model[4].weight, 0.25)  # an existing gradient
    return model


@pytest.mark.parametrize(
    ("bn_mode", "training"),
    [("train", True), ("eval", True), ("train", False), (None, True)],
    ids=["bn-train", "bn-eval", "bn-train-model-eval", "bn-current-model-train"],
)
def test_products_eigsh_lanczos_leave_bn_cnn_unchanged(bn_mode: str | None, training: bool) -> None:
    model = _prepared_cnn(training)
    x, y = make_inputs("cnn", 9), make_targets("ce", 9)
    before = model_state(model)
    ops = [
        HessianOperator(
            model, nn.CrossEntropyLoss(), (x, y), bn_mode=bn_mode, params=lambda n, p: True
        ),
        GGNOperator(model, nn.CrossEntropyLoss(), make_data("list", x, y), bn_mode=bn_mode),
        FisherOperator(model, nn.CrossEntropyLoss(), make_data("loader", x, y), bn_mode=bn_mode),
    ]
    for op in ops:
        v = np.ones(op.shape[0])
        op @ v
        op.matmat(np.ones((op.shape[0], 2)))
        sla.eigsh(op, k=1, which="LA", tol=1e-4, ncv=6, maxiter=20)
        lanczos(op, 5, seed=0)
    ggn_diagonal(model, nn.CrossEntropyLoss(), (x, y), bn_mode=bn_mode)
    loss_stats(model, nn.CrossEntropyLoss(), (x, y), batch_size=4, bn_mode=bn_mode, num_probes=1)
    assert state_differences(before, model) == []
    assert model[4].weight.grad is not None and model[0].weight.grad is None


def test_curvature_mode_sets_and_restores_modes() -> None:
    model = make_mlp().train()
    cnn = make_cnn().eval()
    with curvature_mode(model, None):
        assert not model[2].training  # dropout off
        assert model[0].training
    assert model[2].training
    with curvature_mode(cnn, "train"):
        assert cnn[1].training and not cnn[1].track_running_stats
        assert not cnn[0].training
    assert not cnn[1].training and cnn[1].track_running_stats


def test_restores_modes_after_an_exception() -> None:
    model = make_cnn().train()
    before = model_state(model)
    x, y = make_inputs("cnn", 4), make_targets("ce", 4)
    x[2, 0, 0, 0] = float("nan")  # in the second batch: the first one is checked when built
    data = [(x[:2], y[:2]), (x[2:], y[2:])]
    op = HessianOperator(model, nn.CrossEntropyLoss(), data, bn_mode="eval")
    with pytest.raises(ArithmeticError):
        op @ np.ones(op.shape[0])
    assert state_differences(before, model) == []


def test_bn_train_mode_uses_batch_statistics_and_eval_running_ones() -> None:
    model = make_cnn().eval()
    x, y = make_inputs("cnn", 6), make_targets("ce", 6)
    Ht = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), bn_mode="train").to_dense()
    He = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), bn_mode="eval").to_dense()
    Hn = HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    assert torch.equal(He, Hn)  # the model is in eval mode
    assert not torch.allclose(Ht, He)
    # in train mode the conv bias is cancelled by the batch normalisation
    bias = slice(18, 20)
    assert float(Ht[bias].abs().max()) <= 1e-12
    assert float(He[bias].abs().max()) > 1e-6


def test_state_differences_detects_changes() -> None:
    model = make_cnn()
    before = model_state(model)
    model.train()(make_inputs("cnn", 4))  # updates running statistics
    diffs = state_differences(before, model)
    assert "buffers: 1.running_mean" in diffs and "buffers: 1.num_batches_tracked" in diffs
