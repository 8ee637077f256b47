"""Resume state files carry a content checksum (an adversarial sweep found one flipped
bit in the zip directory of a finished Lanczos state that dropped its last members: the
same call then returned ``residual_vector=None`` without an error)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from spectral import lanczos
from spectral.io import CHECKSUM_KEY, CorruptFileError, load_npz


def _matrix() -> np.ndarray:
    A = np.diag(np.arange(1.0, 13.0))
    A[0, 1] = A[1, 0] = 0.5
    return A


def _central_entries(data: bytes) -> list[int]:
    """Offsets of the zip central-directory headers."""
    out, at = [], data.find(b"PK\x01\x02")
    while at != -1:
        out.append(at)
        at = data.find(b"PK\x01\x02", at + 4)
    return out


def test_a_flipped_bit_in_the_zip_directory_never_loses_members_silently(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    reference = lanczos(_matrix(), 8, seed=0, checkpoint=path)
    assert reference.residual_vector is not None
    original = path.read_bytes()
    entries = _central_entries(original)
    assert len(entries) >= 8
    for entry in entries:
        for field in (30, 32):  # extra-field and comment lengths: shift the later entries
            data = bytearray(original)
            data[entry + field] ^= 0x40
            path.write_bytes(bytes(data))
            try:
                again = lanczos(_matrix(), 8, seed=0, checkpoint=path)
            except CorruptFileError:
                continue
            np.testing.assert_array_equal(again.alpha, reference.alpha)
            np.testing.assert_array_equal(again.residual_vector, reference.residual_vector)


def test_state_files_written_before_the_checksum_still_resume(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    reference = lanczos(_matrix(), 8, seed=0, checkpoint=path)
    arrays = dict(load_npz(path))
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist()[0] == CHECKSUM_KEY + ".npy"  # written first
    arrays["format"] = np.asarray("spectral-resume/1")
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # the old writer: no checksum
    again = lanczos(_matrix(), 8, seed=0, checkpoint=path)
    np.testing.assert_array_equal(again.alpha, reference.alpha)
    arrays["format"] = np.asarray("spectral-resume/2")
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # the new format without its checksum: damaged
    with pytest.raises(CorruptFileError, match="lost its checksum"):
        lanczos(_matrix(), 8, seed=0, checkpoint=path)
