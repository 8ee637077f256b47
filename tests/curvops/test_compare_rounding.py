"""compare() and its proxies: singular to working precision, parameters, tolerances, arguments.

* An exactly singular operator's log-det is ``-inf`` also where it is estimated (SLQ
  nodes within :math:`m\\varepsilon\\max|\\theta|` of 0) and for the GGN-diagonal proxy
  (entries within :math:`\\varepsilon\\max d`: a parameter the loss does not see).
* Diagonal and block proxies carry their parameters, so grading them against an
  operator over other parameters of the same size is refused.
* The Newton-step solves default to :math:`\\sqrt\\varepsilon` of each side's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import Dense, Diagonal, GGNOperator, HessianOperator, compare, compare_all
from curvops.algebra import parameter_names_of, parameter_shapes_of
from curvops.diagonal import ggn_diagonal
from curvops.proxies import diagonal_approximation, layer_blocks, make_proxy
from curvops.structure import exact_logdet
from curvops.testing import dense_ggn
from spectral import SpectralDensity
from spectral.errors import NumericalError


def _dependent_inputs(seed: int) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Linear(3, 1) + MSE on inputs with x3 = x1 + x2: a GGN with one exact null vector."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 2, dtype=torch.float64, generator=g)
    x = torch.cat([x, x[:, :1] + x[:, 1:2]], 1)
    y = torch.randn(8, 1, dtype=torch.float64, generator=g)
    net = nn.Linear(3, 1).double()
    return net, nn.MSELoss(), (x, y)


def test_slq_logdet_of_an_exactly_singular_ggn_is_minus_inf() -> None:
    # seed 1: the Lanczos node of the null vector came out as +2.5e-17 (log: -38.2)
    net, loss_fn, data = _dependent_inputs(1)
    A = GGNOperator(net, loss_fn, data)
    r = compare(Dense(dense_ggn(net, loss_fn, data), symmetric=True), A, k=1, num_iters=10)
    assert r.spectrum_exact == "slq"
    assert r.logdet_exact == -math.inf and r.logdet_approximation == -math.inf
    assert r.logdet_error == 0.0


def test_slq_logdet_keeps_small_but_positive_nodes() -> None:
    from curvops.comparison import slq_logdet

    tiny = SpectralDensity(np.array([2.5e-17, 4.0]), np.array([0.25, 0.75]))
    assert slq_logdet(tiny, 4, torch.float64) == -math.inf
    small = SpectralDensity(np.array([1e-10, 4.0]), np.array([0.5, 0.5]))
    want = 2 * (0.5 * math.log(1e-10) + 0.5 * math.log(4.0))
    got = slq_logdet(small, 2, torch.float64)
    # the sum of two logs times n = 2: a few roundings of |want|
    assert abs(got - want) <= 8 * np.finfo(np.float64).eps * abs(want)
    # the floor is the operator's precision: 1e-10 * max is noise for a float32 operator
    assert slq_logdet(small, 2, torch.float32) == -math.inf


def _bn_case(dtype: torch.dtype) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(9, 2, generator=g, dtype=torch.float64)
    return net.to(dtype), nn.CrossEntropyLoss(), (x.to(dtype), torch.arange(9) % 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["exact", "mc", "empirical"])
def test_diagonal_proxy_of_a_bias_the_loss_cannot_see_is_exactly_zero(
    dtype: torch.dtype, method: str
) -> None:
    # the first Linear's bias is removed by BatchNorm's mean (training mode): its GGN
    # diagonal is exactly 0 but computed as eps^2-sized noise
    net, loss_fn, data = _bn_case(dtype)
    D = diagonal_approximation(net, loss_fn, data, method=method, bn_mode="train")
    raw = ggn_diagonal(net, loss_fn, data, method=method, bn_mode="train")
    bias = slice(6, 9)
    d = D.diagonal
    assert d[bias].tolist() == [0.0, 0.0, 0.0]
    assert float(raw[bias].abs().max()) <= float(torch.finfo(dtype).eps) * float(raw.max())
    keep = torch.ones_like(raw, dtype=torch.bool)
    keep[bias] = False
    assert torch.equal(d[keep], raw[keep])  # every other entry as computed
    assert exact_logdet(D) == -math.inf


def test_hutchinson_diagonal_proxy_gets_the_same_floor() -> None:
    net, loss_fn, data = _bn_case(torch.float64)
    D = diagonal_approximation(net, loss_fn, data, method="hutchinson", bn_mode="train")
    assert D.diagonal[6:9].tolist() == [0.0, 0.0, 0.0]  # product noise was +-1e-18
    assert exact_logdet(D) == -math.inf


def test_diagonal_and_block_proxies_over_other_parameters_are_refused() -> None:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    data = (torch.randn(8, 3, generator=g, dtype=torch.float64), torch.arange(8) % 3)
    loss_fn = nn.CrossEntropyLoss()
    G2 = GGNOperator(net, loss_fn, data, params=["2.weight"])
    for spec in ("diag-ggn", "diag-hutchinson", "blocks"):
        P0 = make_proxy(spec, net, loss_fn, data, params=["0.weight"], num_matvecs=4)
        with pytest.raises(ValueError, match=r"'approximation'.*same parameters"):
            compare(P0, G2, k=2, num_iters=9)
        with pytest.raises(ValueError, match="same parameters"):
            compare_all({spec: P0}, G2, k=2, num_iters=9)
        P2 = make_proxy(spec, net, loss_fn, data, params=["2.weight"], num_matvecs=4)
        assert parameter_names_of(P2) == ("2.weight",)
        assert parameter_shapes_of(P2) == ((3, 3),)
        compare(P2, G2, k=2, num_iters=9)  # the same parameters: graded


def test_proxies_over_same_named_parameters_of_other_shapes_are_refused() -> None:
    # weight (6, 2) + bias (6,) and weight (9, 1) + bias (9,): 18 coordinates each
    a, b = nn.Linear(2, 6).double(), nn.Linear(1, 9).double()
    xa, xb = torch.ones(4, 2, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64)
    ya, yb = torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, 9, dtype=torch.float64)
    Ga = GGNOperator(a, nn.MSELoss(), (xa, ya))
    for proxy in (
        diagonal_approximation(b, nn.MSELoss(), (xb, yb)),
        layer_blocks(b, nn.MSELoss(), (xb, yb)),
    ):
        with pytest.raises(ValueError, match="same shapes"):
            compare(proxy, Ga, k=1, num_iters=5)


def _float32_hessian() -> tuple[nn.Module, HessianOperator, tuple[torch.Tensor, torch.Tensor]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))  # float32
        x = torch.randn(64, 4) * 3
    data = (x, torch.arange(64) % 5)
    return net, HessianOperator(net, nn.CrossEntropyLoss(), data, bn_mode="eval"), data


def test_float32_hessian_newton_step_converges_to_the_default_tolerance() -> None:
    from curvops.comparison import default_solve_tol

    assert default_solve_tol(torch.float64) == math.sqrt(np.finfo(np.float64).eps)
    assert default_solve_tol(torch.float32) == math.sqrt(np.finfo(np.float32).eps)
    net, H, data = _float32_hessian()
    D = diagonal_approximation(net, nn.CrossEntropyLoss(), data)
    r = compare(D, H, k=2, num_iters=20)
    assert math.isfinite(r.newton_step_error)
    # 1e-8 is below float32's attainable relative residual eps * kappa: refused loudly
    with pytest.raises(NumericalError, match="did not converge"):
        compare(D, H, k=2, num_iters=20, solve_tol=1e-8)


@pytest.mark.parametrize("solve_tol", [0.0, -1.0, math.inf, math.nan, "1e-8"])
def test_compare_refuses_a_bad_solve_tol(solve_tol: object) -> None:
    A = Dense(np.diag([1.0, 2.0, 3.0]), symmetric=True)
    with pytest.raises(ValueError, match="solve_tol"):
        compare(A, A, k=1, solve_tol=solve_tol)  # type: ignore[arg-type]


def test_compare_accepts_numpy_integers() -> None:
    A = Dense(np.diag([1.0, 2.0, 3.0, 4.0]), symmetric=True)
    k: Any = np.int64(2)
    directions: Any = np.int32(3)
    seed: Any = np.int64(1)
    r = compare(Diagonal(np.ones(4)), A, k=k, num_directions=directions, seed=seed)
    assert r.top_eigenvalue_errors.shape == (2,) and r.quadratic_form_errors.shape == (3,)
    with pytest.raises(ValueError, match="'k'"):
        compare(A, A, k=True)
    with pytest.raises(ValueError, match="'k'"):
        compare(A, A, k=k + 2)  # k < n = 4


@pytest.mark.parametrize("seed", [None, 1.5, "0", True])
def test_compare_refuses_a_seed_that_is_not_an_integer(seed: object) -> None:
    A = Dense(np.diag([1.0, 2.0, 3.0]), symmetric=True)
    with pytest.raises(TypeError, match="'seed'"):
        compare(A, A, k=1, seed=seed)  # type: ignore[arg-type]


@pytest.mark.parametrize("gradient", ["abc", [1j, 0.0, 0.0], [object(), 1.0, 2.0]])
def test_compare_refuses_a_gradient_that_is_not_a_real_array(gradient: object) -> None:
    A = Dense(np.diag([1.0, 2.0, 3.0]), symmetric=True)
    with pytest.raises(TypeError, match="'gradient'"):
        compare(A, A, k=1, gradient=gradient)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_compare_refuses_a_non_finite_gradient(bad: float) -> None:
    A = Dense(np.diag([1.0, 2.0, 3.0]), symmetric=True)
    g = np.array([1.0, bad, 0.0])
    with pytest.raises(ValueError, match=r"'gradient'.*finite"):
        compare(A, A, k=1, gradient=g)
    with pytest.raises(ValueError, match=r"'gradient'.*finite"):
        compare(A, A, k=1, gradient=torch.as_tensor(g))


@pytest.mark.parametrize(
    "spec", ["low-rank-\u00b2", "low-rank-\u00b2-diag", "kfac-mc-empirical", "ekfac-empirical-mc"]
)
def test_make_proxy_refuses_malformed_names_naming_spec(spec: str) -> None:
    net = nn.Linear(2, 2).double()
    data = (torch.ones(3, 2, dtype=torch.float64), torch.tensor([0, 1, 0]))
    G = GGNOperator(net, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match="'spec'"):
        make_proxy(spec, net, nn.CrossEntropyLoss(), data, exact=G)


def _rank_deficient_float32_ggn() -> GGNOperator:
    """A float32 MLP GGN of size 19,210 and rank at most 32 * 9 = 288: log-det ``-inf``."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randn(32, 64, generator=g)
    return GGNOperator(net, nn.CrossEntropyLoss(), (x, torch.arange(32) % 10))


def test_slq_logdet_of_a_rank_deficient_float32_ggn_is_never_finite() -> None:
    # measured: after 10 steps the null node was 1.5e-6, 1.8 times m eps max|theta|, and the
    # estimate a finite -2.5e5 for a log-det of -inf; it is below m sqrt(n) eps max|theta|
    from curvops.comparison import slq_logdet
    from spectral import slq

    A = _rank_deficient_float32_ggn()
    n = A.shape[0]
    for m in (10, 20):
        got = slq_logdet(slq(A, m, num_probes=2, seed=0), n, torch.float32)
        assert not math.isfinite(got) and got != math.inf


def test_an_undetermined_log_det_gives_a_nan_error() -> None:
    from curvops.comparison import slq_logdet

    # a node above m eps max but below m sqrt(n) eps max: not told from 0
    d = SpectralDensity(np.array([1e-6, 1.0]), np.array([0.5, 0.5]))
    assert math.isnan(slq_logdet(d, 10**4, torch.float32))
    A = _rank_deficient_float32_ggn()
    proxy = diagonal_approximation(A.model, A.loss_fn, A.data)
    r = compare(proxy, A, k=1, num_iters=10, num_probes=1)
    assert not math.isfinite(r.logdet_exact)
    if math.isnan(r.logdet_exact):
        assert math.isnan(r.logdet_error)
    else:  # -inf: a finite proxy log-det is infinitely far from it
        assert r.logdet_error == math.inf
