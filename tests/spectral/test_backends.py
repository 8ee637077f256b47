"""The same run gives the same numbers with numpy, torch and array_api_strict inputs."""

from __future__ import annotations

from typing import Any

import array_api_strict
import numpy as np
import pytest
import torch

from spectral import _backend, diagonal, lanczos, random_probe, random_probes, top_eigenpairs
from tests.spectral.strategies import (
    rotate,
    single_threaded_blas,  # noqa: F401 (autouse fixture)
)

BACKENDS = {
    "numpy": lambda a: a,
    "torch": lambda a: torch.from_numpy(np.array(a)),
    "array_api_strict": lambda a: array_api_strict.asarray(np.array(a)),
}


def _matrix(n: int = 150) -> np.ndarray:
    rng = np.random.default_rng(3)
    spectrum = np.sort(np.r_[rng.uniform(-1.0, 1.0, n - 4), [4.0, 6.0, -5.0, 9.0]])
    return rotate(spectrum, 5)


def _host(x: Any) -> np.ndarray:
    return _backend.to_host_float64(x)


@pytest.mark.parametrize(
    ("reorth", "steps"),
    [("full", 40), ("partial", 40), ("none", 10), ("selective", 10), (6, 10)],
)
def test_lanczos_agrees_across_backends(reorth: str | int, steps: int) -> None:
    """Same numbers to 1e-12 (relative to ||A|| = 9).

    With full or partial reorthogonalisation the run is backward stable and agrees
    over 40 steps; without it, rounding differences between libraries are amplified
    once Ritz values converge (the chaotic phase of the plain recurrence), so the
    coefficients are compared over the first 10 steps and the quadrature (which
    stays stable, see ``test_ghosts_carry_the_true_weight_and_traces_agree``) over 40.
    """
    A = _matrix()
    v0 = np.random.default_rng(0).standard_normal(A.shape[0])
    ref = lanczos(A, steps, v0=v0, reorth=reorth)
    ref_ritz = ref.ritz()
    ref_long = ref_ritz if steps == 40 else lanczos(A, 40, v0=v0, reorth=reorth).ritz()
    for name, convert in BACKENDS.items():
        res = lanczos(convert(A), steps, v0=convert(v0), reorth=reorth)
        assert res.num_iters == ref.num_iters, name
        np.testing.assert_allclose(res.alpha, ref.alpha, rtol=0, atol=1e-12 * 9, err_msg=name)
        np.testing.assert_allclose(res.beta, ref.beta, rtol=0, atol=1e-12 * 9, err_msg=name)
        ritz = res.ritz()
        np.testing.assert_allclose(ritz.values, ref_ritz.values, atol=1e-12 * 9, err_msg=name)
        np.testing.assert_allclose(ritz.weights, ref_ritz.weights, atol=1e-12, err_msg=name)
        # the basis and Ritz vectors stay in the input's namespace
        assert type(res.basis) is type(convert(A)), name
        assert type(ritz.vectors) is type(convert(A)), name
        np.testing.assert_allclose(_host(res.basis), ref.basis, atol=1e-10, err_msg=name)
        long = (
            ritz if steps == 40 else lanczos(convert(A), 40, v0=convert(v0), reorth=reorth).ritz()
        )
        for f in (np.exp, np.square, np.cos):
            got = np.sum(long.weights * f(long.values))
            want = np.sum(ref_long.weights * f(ref_long.values))
            assert got == pytest.approx(want, rel=1e-12), name


def test_seeded_start_vectors_are_bitwise_identical_across_backends() -> None:
    A = _matrix(60)
    results = [lanczos(convert(A), 15, seed=42) for convert in BACKENDS.values()]
    first = [_host(r.basis[:, 0]) for r in results]
    for q in first[1:]:  # same probe bits; the normalisation may differ in the last bit
        np.testing.assert_allclose(q, first[0], rtol=0, atol=1e-15)
    for r in results[1:]:
        np.testing.assert_allclose(r.alpha, results[0].alpha, atol=1e-12 * 9)


def test_probes_are_bitwise_identical_across_backends() -> None:
    for kind in ("rademacher", "gaussian", "sphere"):
        ref = random_probes(50, 3, kind, seed=9)
        for convert in BACKENDS.values():
            like = convert(np.zeros(50))
            V = random_probes(50, 3, kind, seed=9, like=like)
            assert type(V) is type(like)
            np.testing.assert_array_equal(_host(V), ref)
            v = random_probe(50, kind, seed=9, like=like)
            np.testing.assert_array_equal(_host(v), ref[:, 0])


def test_torch_float32_stays_float32() -> None:
    A = torch.from_numpy(_matrix(80)).to(torch.float32)
    res = lanczos(A, 20, seed=0)
    assert res.basis.dtype == torch.float32
    assert res.alpha.dtype == np.float64
    assert res.orthogonality_loss < 1e-5
    ref = lanczos(_matrix(80), 20, seed=0)
    np.testing.assert_allclose(res.ritz().values[-3:], ref.ritz().values[-3:], rtol=1e-4)


def test_numpy_v0_with_torch_operator_is_transferred() -> None:
    A = _matrix(40)
    v0 = np.random.default_rng(1).standard_normal(40)
    res = lanczos(torch.from_numpy(A), 5, v0=v0)
    ref = lanczos(A, 5, v0=v0)
    assert isinstance(res.basis, torch.Tensor)
    np.testing.assert_allclose(res.alpha, ref.alpha, atol=1e-12 * 9)


def test_torch_tensors_requiring_grad_are_detached() -> None:
    """A matrix or start vector with ``requires_grad`` (a parameter, a gradient) runs as is.

    Warnings are errors: torch's ``float()``/``asarray`` warnings on graph tensors fail here.
    """
    A = _matrix(40)
    v0 = np.random.default_rng(1).standard_normal(40)
    At = torch.from_numpy(A).requires_grad_(True)
    vt = torch.from_numpy(v0.copy()).requires_grad_(True)
    ref = lanczos(A, 8, v0=v0)
    for reorth in ("full", "partial", "selective"):
        res = lanczos(At, 8, v0=vt, reorth=reorth)
        assert not res.basis.requires_grad
        np.testing.assert_allclose(res.alpha, ref.alpha, atol=1e-12 * 9)
    res = lanczos(torch.from_numpy(A), 8, v0=vt, reorth="none", store_basis=False)
    assert not res.residual_vector.requires_grad
    _, vecs = top_eigenpairs(At, 2, seed=0)
    assert not vecs.requires_grad
    assert not diagonal(At, method="exact").requires_grad
    assert At.grad is None


def test_store_basis_false_and_ritz_vectors_in_array_api_strict() -> None:
    A = array_api_strict.asarray(_matrix(60))
    lean = lanczos(A, 10, seed=1, reorth="none", store_basis=False)
    assert lean.basis is None
    assert isinstance(lean.residual_vector, type(A))


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_top_eigenpairs_agree_across_backends(which: str) -> None:
    A = _matrix()
    ref_vals, ref_vecs = top_eigenpairs(A, 3, which=which, seed=0)
    for name, convert in list(BACKENDS.items())[1:]:
        vals, vecs = top_eigenpairs(convert(A), 3, which=which, seed=0)
        assert type(vecs) is type(convert(A)), name
        np.testing.assert_allclose(vals, ref_vals, atol=1e-10, err_msg=name)
        overlap = np.abs(np.sum(_host(vecs) * ref_vecs, axis=0))
        np.testing.assert_allclose(overlap, 1.0, atol=1e-8, err_msg=name)


def test_backend_helpers() -> None:
    t = torch.arange(3, dtype=torch.float32)
    assert _backend.to_host_float64(t).dtype == np.float64
    back = _backend.from_host(np.array([1.0, 2.0]), like=t)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
    s = array_api_strict.asarray(np.array([1.0, 2.0]))
    np.testing.assert_array_equal(_backend.to_host_float64(s), [1.0, 2.0])
    assert float(_backend.vector_norm(_backend.namespace(s), s)) == pytest.approx(np.sqrt(5.0))
    assert _backend.supports_item_assignment(_backend.namespace(s))
    assert _backend.is_real_floating(_backend.namespace(t), t.dtype)


def test_basis_as_a_list_for_namespaces_without_item_assignment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Namespaces with immutable arrays (JAX) keep the basis as a list and stack it."""
    A = _matrix(60)
    ref = lanczos(A, 20, seed=0)
    monkeypatch.setattr(_backend, "supports_item_assignment", lambda xp: False)
    for reorth in ("full", "selective", 3):
        res = lanczos(array_api_strict.asarray(A), 20, seed=0, reorth=reorth)
        if reorth == "full":
            np.testing.assert_allclose(res.alpha, ref.alpha, atol=1e-12 * 9)
            np.testing.assert_allclose(_host(res.basis), ref.basis, atol=1e-10)
        assert tuple(res.basis.shape) == (60, 20)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_cuda_stays_on_device() -> None:
    A = _matrix(200)
    At = torch.from_numpy(A).to("cuda")
    res = lanczos(At, 30, seed=0)
    assert res.basis.device.type == "cuda"
    ref = lanczos(A, 30, seed=0)
    np.testing.assert_allclose(res.alpha, ref.alpha, atol=1e-12 * 9)
    vals, vecs = top_eigenpairs(At, 3, seed=0)
    assert vecs.device.type == "cuda"
    np.testing.assert_allclose(vals, np.linalg.eigvalsh(A)[-3:], atol=1e-9)


def test_top_eigenpairs_float32_torch() -> None:
    A = _matrix(120)
    vals, vecs = top_eigenpairs(torch.from_numpy(A).to(torch.float32), 2, seed=0)
    assert vecs.dtype == torch.float32
    np.testing.assert_allclose(vals, np.linalg.eigvalsh(A)[-2:], rtol=1e-4)
