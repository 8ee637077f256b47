"""SpectralDensity inputs and files (sweep 6, findings 6 to 8).

* ``wasserstein`` read complex eigenvalues with their imaginary parts dropped (a number
  for ``[1 + 5j, 2]``, that of ``[1, 2]``) and gave numpy's bare "could not convert string
  to float" for a string: ``other`` is now validated, naming it;
* ``from_arrays``/``load`` truncated a stored ``dimension`` of 2.7 to 2 (the constructor
  refuses 2.7): the stored value now goes through the constructor's check;
* ``save`` onto an existing directory raised ``IsADirectoryError`` naming an internal
  temporary file: :func:`spectral.io.atomic_write` now names the ``path`` argument.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spectral import SpectralDensity
from spectral.io import CorruptFileError, atomic_write, save_npz

DENSITY = SpectralDensity([0.0, 1.0], [0.5, 0.5])


@pytest.mark.parametrize(
    "other",
    [np.array([1 + 5j, 2.0]), [1 + 0j], "abc", None, [1.0, None], [[1.0, 2.0], [3.0]]],
    ids=["complex", "complex zero imaginary", "str", "None", "None inside", "ragged"],
)
def test_wasserstein_refuses_what_is_not_real_numbers(other: Any) -> None:
    with pytest.raises(TypeError, match=r"Argument 'other': expected a SpectralDensity or"):
        DENSITY.wasserstein(other)


def test_wasserstein_of_real_numbers_is_unchanged() -> None:
    assert DENSITY.wasserstein([1.0, 2.0]) == 1.0
    assert DENSITY.wasserstein(np.array([[0.0], [1.0]], dtype=np.float32)) == 0.0
    assert DENSITY.wasserstein([0, 1]) == 0.0
    with pytest.raises(ValueError, match="'other'"):
        DENSITY.wasserstein([np.nan])


def test_a_stored_non_integer_dimension_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, nodes=[0.0, 1.0], weights=[0.5, 0.5], dimension=np.array(2.7))
    with pytest.raises(CorruptFileError, match=r"d\.npz.*'dimension'.*2\.7"):
        SpectralDensity.load(path)
    arrays = {"nodes": [0.0, 1.0], "weights": [0.5, 0.5], "dimension": 2.7}
    with pytest.raises(CorruptFileError, match=r"'dimension'.*2\.7"):
        SpectralDensity.from_arrays(arrays)
    for bad in (np.array(True), np.array([3, 4]), np.array("3")):
        with pytest.raises(CorruptFileError, match=r"'dimension'|invalid"):
            SpectralDensity.from_arrays({**arrays, "dimension": bad})
    save_npz(path, **SpectralDensity([0.0], [1.0], dimension=7).to_arrays())
    assert SpectralDensity.load(path).dimension == 7
    assert SpectralDensity.from_arrays({**arrays, "dimension": np.int32(5)}).dimension == 5


def test_saving_onto_a_directory_names_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"Argument 'path'.*directory") as info:
        DENSITY.save(folder)
    assert str(folder) in str(info.value) and ".tmp" not in str(info.value)
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())
    with pytest.raises(IsADirectoryError, match=re.escape(str(folder))):
        with atomic_write(folder, "w") as handle:
            handle.write("never")
