"""The landscape's Ritz directions check that the vector file belongs to its spectrum.

:func:`nets.workflow.load_spectrum` refused a ``-eigvec.npz`` of another run (left by a
kill between the two writes of ``SpectrumResult.save``), but ``build_loss_landscape``
read the vector file directly: a GGN spectrum's landscape walked along the Hessian's
Ritz vectors, its ``direction_values`` the Hessian's, its config naming the GGN file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nets import build_loss_landscape, compute_eigenspectrum
from spectral.io import CorruptFileError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(24, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (24,), generator=g),
    )


def _spectrum(path: Path, curvature: str, save_eigvec: bool, net: nn.Module) -> None:
    compute_eigenspectrum(
        _dataset(), model=net, lanczos_iters=8, curvature_matrix=curvature,
        save_eigvec=save_eigvec, save_spectrum_path=path, batch_size=8, device="cpu",
    )  # fmt: skip


def _landscape(path: Path, net: nn.Module) -> object:
    return build_loss_landscape(
        _dataset(), model=net, spectrum_path=path, n_points=3, batch_size=8, device="cpu"
    )


@pytest.mark.parametrize("second_with_vectors", [True, False], ids=["vectors", "no vectors"])
def test_a_vector_file_of_another_run_is_refused(tmp_path: Path, second_with_vectors: bool) -> None:
    net = _model()
    spectrum = tmp_path / "spectrum.npz"
    vectors = tmp_path / "spectrum-eigvec.npz"
    _spectrum(spectrum, "hessian", True, net)
    shutil.copy(vectors, tmp_path / "hessian-eigvec.npz")
    _spectrum(spectrum, "ggn", second_with_vectors, net)
    shutil.copy(tmp_path / "hessian-eigvec.npz", vectors)  # as a kill between the writes left it
    for given in (spectrum, vectors):
        with pytest.raises(CorruptFileError, match="do not belong together"):
            _landscape(given, net)


def test_a_matching_pair_is_used(tmp_path: Path) -> None:
    net = _model()
    spectrum = tmp_path / "spectrum.npz"
    _spectrum(spectrum, "ggn", True, net)
    first = _landscape(spectrum, net)
    second = _landscape(tmp_path / "spectrum-eigvec.npz", net)
    assert (first.direction_values == second.direction_values).all()  # type: ignore[attr-defined]
