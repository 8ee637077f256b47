"""curvops.stats against dense definitions on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from curvops._model_state import curvature_mode
from curvops.stats import (
    hutchinson_frobenius_sq,
    layer_weight_norms,
    loss_stats,
    minibatches,
    weight_norms,
)
from curvops.structured import Dense
from curvops.testing import dense_ggn, dense_hessian

from .conftest import make_cnn, make_inputs, make_mlp, make_targets


def _dense_stats(
    model: nn.Module,
    loss: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sizes: list[int],
    z: torch.Tensor,
    curvature: str,
    bn_mode: str | None,
) -> dict:
    dense = dense_hessian if curvature == "hessian" else dense_ggn
    params = [p for p in model.parameters() if p.requires_grad]
    Ls, gs, Cs, ws = [], [], [], []
    start = 0
    for s in sizes:
        xb, yb = x[start : start + s], y[start : start + s]
        start += s
        with curvature_mode(model, bn_mode):
            L = loss(model(xb), yb)
        g = torch.autograd.grad(L, params)
        Ls.append(float(L.detach()))
        gs.append(torch.cat([t.reshape(-1) for t in g]))
        Cs.append(dense(model, loss, (xb, yb), bn_mode=bn_mode))
        ws.append(s / sum(sizes))
    w = torch.tensor(ws, dtype=torch.float64)
    L = torch.tensor(Ls, dtype=torch.float64)
    G = torch.stack(gs)
    gbar = w @ G
    Cbar = sum(wi * C for wi, C in zip(ws, Cs))
    mu = float(z @ Cbar @ z)
    hv = sum(wi * float((C @ z) @ (C @ z)) for wi, C in zip(ws, Cs)) - float(
        (Cbar @ z) @ (Cbar @ z)
    )
    return {
        "loss_mean": float(w @ L),
        "loss_var": float(w @ (L - w @ L) ** 2),
        "grad_mean_norm_sq": float(gbar @ gbar),
        "grad_var": float(sum(wi * (g - gbar) @ (g - gbar) for wi, g in zip(ws, G))),
        "hess_mean_norm_sq": float((Cbar @ z) @ (Cbar @ z)),
        "hess_var": hv,
        "hess_mu": mu,
        "delta": float((Cbar @ z - mu * z) @ (Cbar @ z - mu * z)),
        "alpha": math.sqrt(hv) / abs(mu),
        "fro": float((Cbar**2).sum()),
    }


@pytest.mark.parametrize(
    ("model_name", "loss_name", "curvature", "bn_mode"),
    [
        ("mlp", "ce", "hessian", None),
        ("cnn", "mse", "ggn", "train"),
        ("cnn", "ce", "hessian", "eval"),
    ],
)
def test_stats_match_dense_definitions(
    model_name: str, loss_name: str, curvature: str, bn_mode: str | None
) -> None:
    model = make_mlp() if model_name == "mlp" else make_cnn()
    loss = {"ce": nn.CrossEntropyLoss(), "mse": nn.MSELoss()}[loss_name]
    x, y = make_inputs(model_name, 10), make_targets(loss_name, 10)
    P = sum(p.numel() for p in model.parameters())
    z = torch.randn(P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z = z / z.norm()
    s = loss_stats(
        model,
        loss,
        (x, y),
        batch_size=4,
        curvature=curvature,
        z=z * 2.0,
        bn_mode=bn_mode,
        num_probes=100,
        seed=1,
    )
    ref = _dense_stats(model, loss, x, y, [4, 4, 2], z, curvature, bn_mode)
    assert s.num_batches == 3 and s.num_samples == 10 and s.curvature == curvature
    for key in (
        "loss_mean",
        "loss_var",
        "grad_mean_norm_sq",
        "grad_var",
        "hess_mean_norm_sq",
        "hess_var",
        "hess_mu",
        "delta",
        "alpha",
    ):
        assert getattr(s, key) == pytest.approx(ref[key], rel=1e-9, abs=1e-13), key
    assert abs(s.frobenius_norm_sq - ref["fro"]) <= 4 * s.frobenius_norm_sq_stderr


def test_hutchinson_is_exact_for_diagonal_and_unbiased() -> None:
    M = np.diag([1.0, -2.0, 3.0])
    est, err = hutchinson_frobenius_sq(Dense(M), num_probes=4)
    assert est == pytest.approx(14.0) and err == pytest.approx(0.0)
    A = np.random.default_rng(0).standard_normal((6, 6))
    A = A + A.T
    est, err = hutchinson_frobenius_sq(Dense(A), num_probes=2000, seed=2)
    assert abs(est - float((A**2).sum())) <= 4 * err


def test_weight_norms() -> None:
    model = make_mlp()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    l2, linf = weight_norms(model)
    assert l2 == pytest.approx(float(flat.norm()), rel=1e-14)
    assert linf == float(flat.abs().max())
    per = layer_weight_norms(model)
    assert set(per) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert per["3.bias"][1] == float(model[3].bias.detach().abs().max())


def test_minibatches_and_errors() -> None:
    data = [(torch.zeros(5, 1), torch.zeros(5)), (torch.zeros(3, 1), torch.zeros(3))]
    assert [b.size for b in minibatches(data, 2)] == [2, 2, 1, 2, 1]
    assert [b.index for b in minibatches(data)] == [0, 1]
    with pytest.raises(ValueError, match="batch_size"):
        list(minibatches(data, 0))
    model = make_mlp()
    d = (make_inputs("mlp", 4), make_targets("ce", 4))
    with pytest.raises(ValueError, match="curvature"):
        loss_stats(model, nn.CrossEntropyLoss(), d, curvature="fisher")
    with pytest.raises(ValueError, match="'z'"):
        loss_stats(model, nn.CrossEntropyLoss(), d, z=np.zeros(51))
