"""A spectrum and its Ritz-vector file are bound by a shared identifier; mismatches are refused."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from nets.models import get_model
from nets.workflow import compute_eigenspectrum, load_spectrum
from nets.workflow.spectrum import SpectrumResult, lanczos_spectrum, pair_digest
from spectral.io import CorruptFileError, load_npz, save_npz


def _result(diagonal: list[float], seed: int = 0) -> SpectrumResult:
    """A spectrum with Ritz vectors of a small diagonal matrix (exact Lanczos, 4 steps)."""
    out = lanczos_spectrum(np.diag(diagonal), 4, seed=seed, keep_vectors=True)
    return SpectrumResult(
        values=out["values"],
        weights=out["weights"],
        residuals=out["residuals"],
        probe_nodes=out["probe_nodes"],
        probe_weights=out["probe_weights"],
        alpha=out["alpha"],
        beta=out["beta"],
        trace=out["trace"],
        trace_stderr=out["trace_stderr"],
        num_params=out["num_params"],
        lanczos_iters=4,
        num_probes=1,
        curvature="hessian",
        bn_mode="none",
        model_fingerprint="f" * 64,
        vectors=out["vectors"],
        vector_values=out["vector_values"],
        param_names=("w",),
        param_shapes_json='{"w": [4]}',
    )


def _vec(path: Path) -> Path:
    return path.with_name(path.stem + "-eigvec.npz")


def test_saved_pair_shares_an_identifier_and_loads(tmp_path: Path) -> None:
    result = _result([1.0, 2.0, 3.0, 4.0])
    path = result.save(tmp_path / "s")
    spectrum, vectors = load_npz(path), load_npz(_vec(path))
    assert str(spectrum["pair_id"]) == str(vectors["pair_id"]) == result.pair_id
    assert len(result.pair_id) == 64
    assert result.pair_id == pair_digest(spectrum, vectors)
    loaded = load_spectrum(tmp_path / "s")
    assert loaded.pair_id == result.pair_id and loaded.eigvec_path == _vec(path)
    np.testing.assert_array_equal(loaded.vectors, result.vectors)
    np.testing.assert_array_equal(loaded.values, result.values)
    np.testing.assert_allclose(loaded.values, [1.0, 2.0, 3.0, 4.0], rtol=1e-14)


def test_vector_file_of_another_run_is_refused(tmp_path: Path) -> None:
    """A kill between the two writes: the new spectrum beside the old run's vectors."""
    old = _result([1.0, 2.0, 3.0, 4.0])
    old.save(tmp_path / "old")
    new = _result([1.0, 2.0, 3.0, 5.0])
    new.save(tmp_path / "s")
    shutil.copy(tmp_path / "old-eigvec.npz", tmp_path / "s-eigvec.npz")
    with pytest.raises(CorruptFileError, match="different pair identifiers") as info:
        load_spectrum(tmp_path / "s")
    assert "s.npz" in str(info.value) and "s-eigvec.npz" in str(info.value)
    assert "with_vectors=False" in str(info.value)
    assert load_spectrum(tmp_path / "s", with_vectors=False).vectors is None
    # and the other way round: the old spectrum beside the new run's vectors
    shutil.copy(tmp_path / "old.npz", tmp_path / "s.npz")
    new.save(tmp_path / "other")
    shutil.copy(tmp_path / "other-eigvec.npz", tmp_path / "s-eigvec.npz")
    with pytest.raises(CorruptFileError, match="do not belong together"):
        load_spectrum(tmp_path / "s")


def test_edited_vector_file_is_refused(tmp_path: Path) -> None:
    path = _result([1.0, 2.0, 3.0, 4.0]).save(tmp_path / "s")
    vectors = dict(load_npz(_vec(path)))
    vectors["vectors"] = vectors["vectors"].copy()
    vectors["vectors"][0, 0] += np.float32(1e-6)
    save_npz(_vec(path), **vectors)  # pair_id kept, content changed
    with pytest.raises(CorruptFileError, match="do not hash"):
        load_spectrum(path)


def test_rerun_without_vectors_removes_the_old_vector_file(tmp_path: Path) -> None:
    first = _result([1.0, 2.0, 3.0, 4.0])
    path = first.save(tmp_path / "s")
    stale = tmp_path / "stale.npz"
    shutil.copy(_vec(path), stale)
    second = _result([1.0, 2.0, 3.0, 6.0])
    second.save(tmp_path / "s", save_eigvec=False)
    assert not _vec(path).exists() and second.eigvec_path is None
    assert str(load_npz(path)["pair_id"]) == ""
    assert load_spectrum(path).vectors is None
    # a kill between the spectrum's write and the removal leaves the old file: refused
    shutil.copy(stale, _vec(path))
    with pytest.raises(CorruptFileError, match="saved without Ritz vectors"):
        load_spectrum(path)
    np.testing.assert_array_equal(load_spectrum(path, with_vectors=False).values, second.values)


def test_missing_vector_file_loads_without_vectors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _result([1.0, 2.0, 3.0, 4.0]).save(tmp_path / "s")
    _vec(path).unlink()
    with caplog.at_level(logging.WARNING, logger="nets.workflow.spectrum"):
        loaded = load_spectrum(path)
    assert loaded.vectors is None and loaded.eigvec_path is None
    assert any("is gone" in r.getMessage() for r in caplog.records)


def test_spectrum_without_identifier_pairs_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files written before pair identifiers existed keep loading (the pairing is unchecked)."""
    result = _result([1.0, 2.0, 3.0, 4.0])
    path = result.save(tmp_path / "s")
    for target in (path, _vec(path)):
        arrays = {k: v for k, v in load_npz(target).items() if k != "pair_id"}
        save_npz(target, **arrays)
    with caplog.at_level(logging.WARNING, logger="nets.workflow.spectrum"):
        loaded = load_spectrum(path)
    np.testing.assert_array_equal(loaded.vectors, result.vectors)
    assert any("predates pair identifiers" in r.getMessage() for r in caplog.records)


def test_compute_eigenspectrum_rerun_without_vectors(tmp_path: Path) -> None:
    net = get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(3,), seed=0)
    kwargs = dict(model=net, lanczos_iters=5, subsample=32, batch_size=32, device="cpu")
    first = compute_eigenspectrum(
        "digits", save_spectrum_path=tmp_path / "s", save_eigvec=True, **kwargs
    )
    assert first.eigvec_path is not None and first.eigvec_path.is_file()
    assert load_spectrum(tmp_path / "s").pair_id == first.pair_id != ""
    second = compute_eigenspectrum(
        "digits", save_spectrum_path=tmp_path / "s", save_eigvec=False, **kwargs
    )
    assert second.eigvec_path is None and not first.eigvec_path.exists()
    assert load_spectrum(tmp_path / "s").vectors is None
