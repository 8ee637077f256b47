"""Stochastic Lanczos quadrature: accuracy, Gauss-quadrature exactness, pooling, backends."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from spectral import synthetic
from spectral.probes import random_probe
from spectral.quadrature import slq


@pytest.fixture(scope="module")
def marchenko_pastur() -> tuple[synthetic.GramOperator, np.ndarray]:
    # n = 4000, p = 1000 (ratio 4): matrix-free X^T X / p, exact spectrum from the 1000 x 1000
    # Gram matrix. The matrix seed differs from every probe seed below: with equal seeds
    # the first Gaussian probe would be the first row of X (in the range of the operator).
    op = synthetic.wishart_operator(4000, 1000, seed=12345)
    return op, op.eigenvalues()


@pytest.mark.parametrize("probe", ["rademacher", "gaussian", "sphere"])
def test_one_probe_slq_matches_marchenko_pastur(
    marchenko_pastur: tuple[synthetic.GramOperator, np.ndarray], probe: str
) -> None:
    op, lam = marchenko_pastur
    density = slq(op, 80, num_probes=1, probe=probe, seed=7)
    spread = lam[-1] - lam[0]
    assert density.wasserstein(lam) <= 0.02 * spread
    # The Marchenko-Pastur atom: 3/4 of the mass at 0, found by a Ritz value ~ 0.
    atom = float(density.weights[np.abs(density.nodes) < 1e-8].sum())
    assert atom == pytest.approx(synthetic.marchenko_pastur_atom(4.0), abs=0.03)
    # Ritz values interlace: they stay inside [lambda_min, lambda_max].
    assert density.nodes[0] >= lam[0] - 1e-10 and density.nodes[-1] <= lam[-1] + 1e-10
    assert density.num_probes == 1 and len(density) == 80


@pytest.mark.parametrize("probe", ["rademacher", "gaussian", "sphere"])
def test_gauss_quadrature_moments_are_exact(probe: str) -> None:
    # sum_i w_i theta_i^p = v^T A^p v / ||v||^2 for p <= 2m - 1 (one probe, reproduced
    # from the same seed).
    n, m = 60, 5
    lam = np.linspace(-1.0, 1.0, n) + 0.3
    A = synthetic.prescribed_spectrum(lam, seed=1)
    density = slq(A, m, probe=probe, seed=3)
    v = random_probe(n, probe, np.random.default_rng(3))
    u = v / np.linalg.norm(v)
    x = u.copy()
    for p in range(2 * m):
        expected = float(u @ x)  # u^T A^p u
        assert density.moment(p) == pytest.approx(expected, rel=1e-10, abs=1e-12)
        x = A @ x
    # one degree beyond: generically not exact
    assert abs(density.moment(2 * m) - float(u @ x)) > 1e-12


def test_invariant_krylov_space_gives_exact_weights() -> None:
    # Rademacher probes on a diagonal matrix: (u_j^T v)^2 / ||v||^2 = 1/n for every j, so the
    # quadrature recovers each distinct eigenvalue with weight multiplicity / n.
    A = np.diag(np.repeat([1.0, 2.0, 7.0], [5, 3, 2]))
    density = slq(A, 8, num_probes=2, seed=0)
    assert density.probe_nodes is not None
    assert density.probe_nodes.shape == (2, 8)
    assert np.isnan(density.probe_nodes[:, 3:]).all()  # breakdown after 3 steps
    np.testing.assert_allclose(density.nodes, [1, 1, 2, 2, 7, 7], atol=1e-12)
    np.testing.assert_allclose(density.weights, [0.25, 0.25, 0.15, 0.15, 0.1, 0.1], atol=1e-12)
    assert density.trace(10) == pytest.approx(np.trace(A), rel=1e-12)


def test_pooling_and_reproducibility() -> None:
    A = synthetic.prescribed_spectrum(np.linspace(0, 1, 50), seed=2)
    d1 = slq(A, 10, num_probes=4, seed=11)
    d2 = slq(A, 10, num_probes=4, seed=11)
    np.testing.assert_array_equal(d1.nodes, d2.nodes)
    np.testing.assert_array_equal(d1.weights, d2.weights)
    assert d1.num_probes == 4 and len(d1) == 40
    assert d1.weights.sum() == pytest.approx(1.0, abs=1e-14)
    per_probe = d1.probe_expectations(lambda x: x)
    assert d1.moment(1) == pytest.approx(per_probe.mean(), rel=1e-12)
    # the first probe of a 4-probe run is the 1-probe run with the same generator state
    single = slq(A, 10, num_probes=1, seed=11)
    assert d1.probe_nodes is not None and single.probe_nodes is not None
    np.testing.assert_allclose(d1.probe_nodes[0], single.probe_nodes[0], rtol=1e-13)
    # a Generator is advanced: two calls give different probes
    rng = np.random.default_rng(0)
    assert not np.array_equal(slq(A, 5, seed=rng).nodes, slq(A, 5, seed=rng).nodes)


def test_no_reorthogonalisation_keeps_quadrature_accurate() -> None:
    # Ghost Ritz values appear without reorthogonalisation, but tr f(A) is unaffected.
    lam = np.concatenate([np.linspace(0.0, 1.0, 300), [5.0, 8.0, 12.0]])
    A = np.diag(lam)
    full = slq(A, 60, seed=4, reorth="full")
    plain = slq(A, 60, seed=4, reorth="none")
    for f in (np.exp, lambda x: 1.0 / (1.0 + x), lambda x: x**3):
        assert plain.expectation(f) == pytest.approx(full.expectation(f), rel=1e-8)
    # ghosts: several copies of the converged top eigenvalue without reorthogonalisation...
    assert np.sum(plain.nodes > 11.9) > 1 and np.sum(full.nodes > 11.9) == 1
    # ...whose weights add up to the true weight
    top_full = full.weights[full.nodes > 11.9].sum()
    top_plain = plain.weights[plain.nodes > 11.9].sum()
    assert top_plain == pytest.approx(top_full, rel=1e-6)
    assert top_full == pytest.approx(1.0 / lam.size, rel=1e-6)  # Rademacher: (u_top^T v)^2/n


def test_namespaces_give_the_same_density() -> None:
    torch = pytest.importorskip("torch")
    xps = pytest.importorskip("array_api_strict")
    A = synthetic.prescribed_spectrum(np.linspace(-1, 2, 40), seed=6)
    ref = slq(A, 12, num_probes=2, probe="gaussian", seed=9)
    for other in (torch.from_numpy(A), xps.asarray(A)):
        d = slq(other, 12, num_probes=2, probe="gaussian", seed=9)
        np.testing.assert_allclose(d.nodes, ref.nodes, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(d.weights, ref.weights, rtol=1e-10, atol=1e-12)


def test_matrix_free_operator_gives_the_dense_result() -> None:
    from spectral.operator import as_operator

    lam = np.linspace(1.0, 2.0, 100)
    dense = slq(np.diag(lam), 15, seed=0)
    matrix_free = slq(as_operator(lambda x: lam * x, size=100), 15, seed=0)
    np.testing.assert_allclose(matrix_free.nodes, dense.nodes, rtol=1e-12)
    np.testing.assert_allclose(matrix_free.weights, dense.weights, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_probes": 0}, "num_probes"),
        ({"probe": "uniform"}, "probe"),
        ({"num_iters": 11}, "num_iters"),
        ({"num_iters": 0}, "num_iters"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"num_iters": 3}
    args.update(kwargs)
    num_iters = args.pop("num_iters")
    with pytest.raises(ValueError, match=match):
        slq(np.eye(10), num_iters, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("e", [-560, -1000, 560, 1000])
def test_explicit_probes_of_any_scale_give_the_same_density(e: int) -> None:
    """Only a probe's direction matters: scaled by ``2**e`` (exact) the density is bitwise the
    same. Probes of ``2**-560`` were refused as "non-zero columns expected" (their squared
    norm underflows), and ``2**560`` ones raised a numpy overflow warning."""
    A = np.diag(np.arange(1.0, 51.0))
    V = np.random.default_rng(0).standard_normal((50, 3))
    ref = slq(A, 6, probes=V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = slq(A, 6, probes=V * 2.0**e)
    np.testing.assert_array_equal(d.nodes, ref.nodes)
    np.testing.assert_array_equal(d.weights, ref.weights)


def test_complex_probes_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="Argument 'probes': expected a real array"):
        slq(np.eye(10), 3, probes=np.ones((10, 1)) + 1j)
    V = np.zeros((10, 2))
    V[0, 0] = 1e-300
    with pytest.raises(ValueError, match="Argument 'probes': expected non-zero columns"):
        slq(np.eye(10), 3, probes=V)
