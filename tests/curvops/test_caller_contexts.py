"""Curvature under a caller's ``torch.inference_mode()`` or ``parametrize.cached()``.

Autograd records nothing in inference mode, not even inside ``torch.enable_grad()``:
before, a Hessian product there was 0.48 and a GGN product 0.24 (max entry) away from
the same product outside, without an error, and K-FAC, ``loss_stats`` and
``loss_gradient`` failed with PyTorch's errors.  Products now leave inference mode;
a batch made of inference tensors is refused naming the batch.  Inside
``torch.nn.utils.parametrize.cached()`` the cached parametrised weights replaced the
products' own (a Hessian 90 % off); the cache is now suspended during products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import spectral
from curvops import (
    Diagonal,
    EKFACOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
    compare,
    diagonal_approximation,
    ggn_diagonal,
    inverse,
    loss_stats,
)

from .conftest import small_batch, small_classifier

LOSS = nn.CrossEntropyLoss()
P = 38  # small_classifier's parameter count
EYE = np.eye(P)


def _report(op: Any) -> np.ndarray:
    approx = Diagonal(np.ones(P))
    report = compare(approx, op, k=2, num_iters=10, num_directions=2, seed=0)
    return np.array([v for v in vars(report).values() if isinstance(v, float)])


COMPUTATIONS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "hessian": lambda m, d: HessianOperator(m, LOSS, d) @ EYE,
    "hessian-uncached": lambda m, d: HessianOperator(m, LOSS, [d, d]) @ EYE,
    "ggn": lambda m, d: GGNOperator(m, LOSS, d) @ EYE,
    "ggn-dual-numbers": lambda m, d: GGNOperator(m, LOSS, d, cache=False) @ EYE,
    "fisher-mc": lambda m, d: FisherOperator(m, LOSS, d, kind="mc", seed=1) @ EYE,
    "kfac": lambda m, d: KFACOperator(m, LOSS, d) @ EYE,
    "ekfac": lambda m, d: EKFACOperator(m, LOSS, d) @ EYE,
    "ggn_diagonal": lambda m, d: ggn_diagonal(m, LOSS, d).numpy(),
    "diagonal-mc": lambda m, d: diagonal_approximation(m, LOSS, d, method="mc") @ np.ones(P),
    "loss_stats": lambda m, d: np.array(loss_stats(m, LOSS, d, num_probes=2).hess_mu),
    "loss_gradient": lambda m, d: HessianOperator(m, LOSS, d).loss_gradient().numpy(),
    "lanczos": lambda m, d: spectral.lanczos(HessianOperator(m, LOSS, d), 8, seed=0).alpha,
    "inverse-cg": lambda m, d: inverse(GGNOperator(m, LOSS, d).damp(0.1)) @ np.ones(P),
    "compare": lambda m, d: _report(GGNOperator(m, LOSS, d)),
}


@pytest.mark.parametrize("name", sorted(COMPUTATIONS))
def test_results_under_inference_mode_equal_those_outside(name: str) -> None:
    model, data = small_classifier(), small_batch()
    outside = np.asarray(COMPUTATIONS[name](model, data))
    with torch.inference_mode():
        inside = np.asarray(COMPUTATIONS[name](model, data))
        assert torch.is_inference_mode_enabled()  # the caller's mode is back
    assert np.nanmax(np.abs(outside)) > 0
    np.testing.assert_array_equal(inside, outside)


def test_operator_built_outside_and_vector_made_inside() -> None:
    model, data = small_classifier(), small_batch()
    H = HessianOperator(model, LOSS, data)
    want = H @ torch.ones(P, dtype=torch.float64)
    with torch.inference_mode():
        v = torch.ones(P, dtype=torch.float64)
        got = H @ v
    assert torch.equal(got, want)


def test_batch_of_inference_tensors_is_refused_naming_it() -> None:
    model, (x, y) = small_classifier(), small_batch()
    with torch.inference_mode():
        x_inf = x.clone()
    with pytest.raises(ValueError, match=r"'data \(batch 1\)'.*inference_mode.*clone"):
        HessianOperator(model, LOSS, [(x, y), (x_inf, y)])


def test_parametrization_cache_is_suspended_during_products_and_restored() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        parametrizations.orthogonal(nn.Linear(3, 3)), nn.Tanh(), nn.Linear(3, 3)
    ).double()
    x, y = small_batch()
    H = HessianOperator(net, LOSS, (x, y))
    G = GGNOperator(net, LOSS, (x, y))
    want_H, want_G = H @ np.eye(H.shape[0]), G @ np.eye(G.shape[0])
    with parametrize.cached():
        cached_weight = net[0].weight  # computed once and cached
        got_H = HessianOperator(net, LOSS, (x, y)) @ np.eye(H.shape[0])
        got_G = GGNOperator(net, LOSS, (x, y)) @ np.eye(G.shape[0])
        assert net[0].weight is cached_weight  # the caller's cache is back
    np.testing.assert_array_equal(got_H, want_H)
    np.testing.assert_array_equal(got_G, want_G)
