"""scipy eigsh / lobpcg / cg / minres and spectral.lanczos directly on the curvature operators."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn

from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.testing import dense_ggn, dense_hessian
from spectral.krylov import lanczos

from .conftest import make_cnn, make_data, make_inputs, make_targets


@pytest.fixture(scope="module")
def problem() -> dict[str, Any]:
    torch.set_num_threads(1)
    model = make_cnn()
    x, y = make_inputs("cnn", 9), make_targets("ce", 9)
    data = make_data("list", x, y)
    loss = nn.CrossEntropyLoss()
    return {
        "H": HessianOperator(model, loss, data, bn_mode="train"),
        "G": GGNOperator(model, loss, data, bn_mode="train"),
        "Hd": dense_hessian(model, loss, data, bn_mode="train").numpy(),
        "Gd": dense_ggn(model, loss, data, bn_mode="train").numpy(),
    }


@pytest.mark.parametrize("which", ["LA", "SA"])
@pytest.mark.parametrize("name", ["H", "G"])
def test_eigsh_matches_eigh(problem: dict[str, Any], name: str, which: str) -> None:
    op, D = problem[name], problem[name + "d"]
    ref = np.linalg.eigvalsh(D)
    v0 = np.random.default_rng(0).standard_normal(op.shape[0])
    vals = np.sort(sla.eigsh(op, k=2, which=which, tol=1e-12, ncv=24, v0=v0)[0])
    expected = ref[-2:] if which == "LA" else ref[:2]
    scale = np.abs(ref).max()
    assert np.max(np.abs(vals - expected)) <= 1e-9 * scale


def test_lobpcg_top_eigenvalues(problem: dict[str, Any]) -> None:
    G, D = problem["G"], problem["Gd"]
    X0 = np.random.default_rng(0).standard_normal((G.shape[0], 3))
    vals, _ = sla.lobpcg(G, X0, largest=True, tol=1e-10, maxiter=500)
    ref = np.linalg.eigvalsh(D)[-3:]
    assert np.max(np.abs(np.sort(vals) - ref)) <= 1e-7 * ref[-1]


def test_cg_on_damped_ggn(problem: dict[str, Any]) -> None:
    G, D = problem["G"], problem["Gd"]
    delta = 1e-2
    b = np.random.default_rng(1).standard_normal(G.shape[0])
    x, info = sla.cg(G.damp(delta), b, rtol=1e-12, maxiter=2000)
    assert info == 0
    ref = np.linalg.solve(D + delta * np.eye(D.shape[0]), b)
    assert np.linalg.norm(x - ref) <= 1e-8 * np.linalg.norm(ref)


def test_minres_on_shifted_hessian(problem: dict[str, Any]) -> None:
    H, D = problem["H"], problem["Hd"]
    mu = 0.37 * np.abs(np.linalg.eigvalsh(D)).max()
    b = np.random.default_rng(2).standard_normal(H.shape[0])
    x, info = sla.minres(H.shift(mu), b, rtol=1e-13, maxiter=2000)
    assert info == 0
    ref = np.linalg.solve(D + mu * np.eye(D.shape[0]), b)
    assert np.linalg.norm(x - ref) <= 1e-7 * np.linalg.norm(ref)


@pytest.mark.parametrize("name", ["H", "G"])
def test_spectral_lanczos_runs_on_operators(problem: dict[str, Any], name: str) -> None:
    op, D = problem[name], problem[name + "d"]
    n = op.shape[0]
    res = lanczos(op, n, seed=0)
    ritz = res.ritz()
    ref = np.linalg.eigvalsh(D)
    scale = np.abs(ref).max()
    assert abs(ritz.values[-1] - ref[-1]) <= 1e-8 * scale
    assert abs(ritz.values[0] - ref[0]) <= 1e-8 * scale
    assert isinstance(res.basis, torch.Tensor)  # vectors stayed torch tensors
