"""HessianOperator against dense float64 references; caching, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops.hessian import HessianOperator
from curvops.testing import check_operator_contract, dense_hessian
from spectral.errors import NumericalError

from .conftest import (
    CASES,
    Case,
    make_cnn,
    make_data,
    make_inputs,
    make_mlp,
    make_targets,
    random_columns,
    relative_error,
)


def test_hessian_matches_dense(case: Case) -> None:
    model, loss, data = case.build()
    H = HessianOperator(model, loss, data, bn_mode=case.bn_mode)
    D = dense_hessian(model, loss, data, bn_mode=case.bn_mode)
    X = random_columns(H.num_params)
    assert relative_error(H.matmat(X), D @ X) <= 1e-10
    assert H.symmetric and not H.psd


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=lambda c: c.id)
def test_hessian_contract(case: Case) -> None:
    model, loss, data = case.build()
    H = HessianOperator(model, loss, data, bn_mode=case.bn_mode)
    check_operator_contract(H, dense_hessian(model, loss, data, bn_mode=case.bn_mode), rtol=1e-10)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_unequal_batches_equal_one_big_batch(model_name: str) -> None:
    model = make_mlp() if model_name == "mlp" else make_cnn()
    x, y = make_inputs(model_name, 9), make_targets("ce", 9)
    big = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), bn_mode="eval")
    X = random_columns(big.num_params, 2)
    for layout in ("list", "loader"):
        split = HessianOperator(
            model, nn.CrossEntropyLoss(), make_data(layout, x, y), bn_mode="eval"
        )
        assert split.num_samples == 9
        assert relative_error(split.matmat(X), big.matmat(X)) <= 1e-12


def test_cache_follows_parameter_changes_and_is_bitwise_deterministic() -> None:
    model = make_cnn()
    data = (make_inputs("cnn", 6), make_targets("ce", 6))
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, bn_mode="train")
    x = random_columns(H.num_params, 1)[:, 0]
    y1, y2 = H @ x, H @ x
    assert torch.equal(y1, y2)
    uncached = HessianOperator(model, nn.CrossEntropyLoss(), data, bn_mode="train", cache=False)
    assert torch.equal(uncached @ x, uncached @ x)
    assert relative_error(uncached @ x, y1) <= 1e-13
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    fresh = HessianOperator(model, nn.CrossEntropyLoss(), data, bn_mode="train", cache=False)
    assert relative_error(H @ x, fresh @ x) <= 1e-13
    assert relative_error(H @ x, y1) > 1e-6


def test_matmat_columns_match_matvec() -> None:
    model = make_mlp()
    data = make_data("list", make_inputs("mlp", 9), make_targets("mse", 9))
    H = HessianOperator(model, nn.MSELoss(), data)
    X = random_columns(H.num_params, 3)
    Y = H.matmat(X)
    for j in range(3):
        assert relative_error(H.matvec(X[:, j]), Y[:, j]) <= 1e-13


def test_parameter_subset_is_a_principal_submatrix() -> None:
    model = make_mlp()
    data = (make_inputs("mlp", 5), make_targets("ce", 5))
    D = dense_hessian(model, nn.CrossEntropyLoss(), data)
    H = HessianOperator(model, nn.CrossEntropyLoss(), data, params=[model[3]])
    n0 = sum(p.numel() for p in model[0].parameters())
    assert H.param_names == ["3.weight", "3.bias"]
    assert relative_error(H.to_dense(), D[n0:, n0:]) <= 1e-12


def test_vector_maps_roundtrip() -> None:
    model = make_mlp()
    H = HessianOperator(
        model, nn.CrossEntropyLoss(), (make_inputs("mlp", 3), make_targets("ce", 3))
    )
    v = torch.arange(H.num_params, dtype=torch.float64)
    parts = H.vector_to_params(v)
    assert [p.shape for p in parts] == [p.shape for _, p in H.params]
    assert torch.equal(H.params_to_vector(parts), v)
    assert torch.equal(H.params_to_vector(H.vector_to_params(v.numpy())), v)
    with pytest.raises(ValueError, match="'v'"):
        H.vector_to_params(np.zeros(3))
    with pytest.raises(ValueError, match="'tensors'"):
        H.params_to_vector(parts[:1])


def test_refuses_bad_arguments() -> None:
    model = make_mlp()
    data = (make_inputs("mlp", 3), make_targets("ce", 3))
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="batchsum"), data)
    with pytest.raises(ValueError, match="bn_mode"):
        HessianOperator(model, nn.CrossEntropyLoss(), data, bn_mode="test")
    with pytest.raises(TypeError, match="model"):
        HessianOperator("net", nn.CrossEntropyLoss(), data)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="params"):
        HessianOperator(model, nn.CrossEntropyLoss(), data, params=[nn.Linear(1, 1).weight])


def test_non_finite_product_names_the_batch() -> None:
    model = make_mlp()
    x, y = make_inputs("mlp", 9), make_targets("mse", 9)
    x[6, 0] = float("nan")
    H = HessianOperator(model, nn.MSELoss(), make_data("list", x, y))
    with pytest.raises(NumericalError, match="batch 1"):
        H @ np.ones(H.num_params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hessian_on_gpu_matches_cpu() -> None:
    model = make_cnn()
    data = (make_inputs("cnn", 6), make_targets("ce", 6))
    H_cpu = HessianOperator(model, nn.CrossEntropyLoss(), data, bn_mode="train")
    gpu_model = make_cnn().cuda()
    H_gpu = HessianOperator(gpu_model, nn.CrossEntropyLoss(), data, bn_mode="train")
    x = random_columns(H_cpu.num_params, 1)[:, 0]
    y = H_gpu @ x.cuda()
    assert y.device.type == "cuda"
    assert relative_error(y.cpu(), H_cpu @ x) <= 1e-10


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_bn_cnn_hessian_matches_finite_differences(bn_mode: str) -> None:
    """Independent of autograd second derivatives (torch.func ones fail for train-mode BN)."""
    from curvops._model_state import curvature_mode, functional_forward

    model = make_cnn()
    x, y = make_inputs("cnn", 6), make_targets("ce", 6)
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), bn_mode=bn_mode)
    names = [n for n, _ in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def grad_at(w: torch.Tensor) -> torch.Tensor:
        w = w.clone().requires_grad_(True)
        parts = list(torch.split(w, [s.numel() for s in shapes]))
        tensors = [t.reshape(s) for t, s in zip(parts, shapes)]
        with curvature_mode(model, bn_mode):
            loss = nn.CrossEntropyLoss()(functional_forward(model, names, tensors, x), y)
        return torch.autograd.grad(loss, w)[0]

    v = random_columns(H.num_params, 1)[:, 0]
    h = 1e-5
    fd = (grad_at(w0 + h * v) - grad_at(w0 - h * v)) / (2 * h)
    assert relative_error(H @ v, fd) <= 1e-7
