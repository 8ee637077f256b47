"""K-FAC and E-KFAC sharing one computation of the factors (share_with, make_proxies)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvops.kfac as kfac_module
from curvops import EKFACOperator, KFACOperator
from curvops.proxies import make_proxies

DT = torch.float64


def _case() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).to(DT)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
    x = torch.randn(12, 2, 4, 4, generator=g, dtype=DT)
    y = torch.arange(12) % 3
    return net, nn.CrossEntropyLoss(), (x, y)


def test_shared_operators_equal_their_own_and_compute_the_factors_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net, loss_fn, data = _case()
    kw = {"remainder": "diagonal", "bn_mode": "eval"}
    alone_k = KFACOperator(net, loss_fn, data, **kw).to_dense()  # type: ignore[arg-type]
    alone_e = EKFACOperator(net, loss_fn, data, **kw).to_dense()  # type: ignore[arg-type]
    calls = []
    compute = kfac_module.KFACOperator._compute_factors

    def counting(self: KFACOperator) -> object:
        calls.append(type(self).__name__)
        return compute(self)

    monkeypatch.setattr(kfac_module.KFACOperator, "_compute_factors", counting)
    proxies = make_proxies(["ekfac", "kfac", "diag-ggn"], net, loss_fn, data, bn_mode="eval")
    E, K = proxies["ekfac"], proxies["kfac"]
    assert isinstance(K, KFACOperator) and isinstance(E, EKFACOperator)
    torch.testing.assert_close(K.to_dense(), alone_k, rtol=0, atol=1e-14)
    torch.testing.assert_close(E.to_dense(), alone_e, rtol=0, atol=1e-14)
    assert calls == ["EKFACOperator"]  # the factors were computed once, for both
    with torch.no_grad():  # a changed model: both follow it, again from one computation
        net[0].weight.mul_(1.5)
    K.to_dense()
    E.to_dense()
    assert len(calls) == 2


def test_sharing_needs_the_same_model_data_and_settings() -> None:
    net, loss_fn, data = _case()
    K = KFACOperator(net, loss_fn, data, remainder="diagonal")
    with pytest.raises(ValueError, match="share_with"):
        EKFACOperator(net, loss_fn, data, remainder="diagonal", approx="reduce", share_with=K)
    with pytest.raises(ValueError, match="share_with"):
        EKFACOperator(net, loss_fn, (data[0], data[1]), remainder="diagonal", share_with=K)
    with pytest.raises(TypeError, match="share_with"):
        KFACOperator(net, loss_fn, data, remainder="diagonal", share_with=object())  # type: ignore[arg-type]
