"""``spectral.io``: every archive carries a content checksum, verified on reading."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

import spectral
from spectral.io import CHECKSUM_KEY, CorruptFileError, load_npz, npz_checksum, save_npz


def _density_file(tmp_path: Path) -> Path:
    A = np.diag(np.linspace(0.0, 1.0, 50))
    path = tmp_path / "density.npz"
    spectral.slq(A, 10, num_probes=2, seed=0).save(path)
    return path


def test_round_trip_hides_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    save_npz(path, x=np.arange(4.0), name=np.asarray("hessian"))
    assert zipfile.ZipFile(path).namelist()[0] == CHECKSUM_KEY + ".npy"  # the first member
    loaded = load_npz(path)
    assert sorted(loaded) == ["name", "x"] and loaded["x"].tolist() == [0.0, 1.0, 2.0, 3.0]
    save_npz(path, **{**loaded, CHECKSUM_KEY: np.asarray("stale")})  # re-saved: replaced
    assert sorted(load_npz(path)) == ["name", "x"]


def test_a_lost_member_is_refused(tmp_path: Path) -> None:
    """A damaged zip directory can hide the last members without any zip error (a
    flipped bit at byte 2233 of a density file did): a reader took them for absent
    optional keys, and the density lost its probe tolerance."""
    path = _density_file(tmp_path)
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:  # the same archive without its last member
        for info, data in members[:-1]:
            archive.writestr(info, data)
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        spectral.SpectralDensity.load(path)


def test_random_bit_flips_of_a_density_are_never_silent(tmp_path: Path) -> None:
    path = _density_file(tmp_path)
    reference = spectral.SpectralDensity.load(path).to_arrays()
    raw = path.read_bytes()
    rng = np.random.default_rng(0)
    for trial in range(300):
        flipped = bytearray(raw)
        flipped[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
        target = tmp_path / f"flip-{trial}.npz"
        target.write_bytes(bytes(flipped))
        try:
            got = spectral.SpectralDensity.load(target).to_arrays()
        except (CorruptFileError, ValueError):
            continue
        assert got.keys() == reference.keys()
        for key, value in reference.items():
            np.testing.assert_array_equal(got[key], value)


def test_files_written_before_the_checksums_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.npz"
    np.savez_compressed(path, x=np.arange(3.0))
    assert load_npz(path)["x"].tolist() == [0.0, 1.0, 2.0]


def test_checksum_sees_keys_dtypes_shapes_and_bytes() -> None:
    base = {"x": np.arange(6.0)}
    variants = [
        {"y": np.arange(6.0)},
        {"x": np.arange(6.0).astype(np.float32)},
        {"x": np.arange(6.0).reshape(2, 3)},
        {"x": np.nextafter(np.arange(6.0), 7.0)},  # one ulp
    ]
    for other in variants:
        assert npz_checksum(other) != npz_checksum(base)
