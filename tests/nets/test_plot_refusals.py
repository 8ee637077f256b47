"""The comparison and landscape figures refuse what they cannot draw truthfully.

An adversarial sweep found: the Lanczos-vs-diagonal figure dropped non-finite diagonal
entries silently while its legend counted them ("Diag-GGN (100 entries)" with 50 NaN, the
histogram normalised over the 50 left); a landscape whose plane had another size than
``t`` failed inside matplotlib ("Length of x (5) must match number of columns in z (3)").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest

from nets.plots.comparison import plot_spectrum_comparison
from nets.plots.landscape import plot_loss_landscape

HESSIAN = (np.array([-0.5, 0.2, 4.0]), np.array([0.3, 0.6, 0.1]))
GGN = (np.array([0.0, 0.3, 3.5]), np.array([0.5, 0.4, 0.1]))
T = np.linspace(-1.0, 1.0, 5)


@pytest.fixture(autouse=True)
def _close_figures() -> Any:
    yield
    plt.close("all")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_diagonal_with_non_finite_entries_is_refused(bad: float) -> None:
    diagonal = np.linspace(0.0, 1.0, 100)
    diagonal[[3, 10, 50]] = bad
    with pytest.raises(ValueError, match=r"'ggn_diagonal'.*3 non-finite of 100.*index 3"):
        plot_spectrum_comparison(HESSIAN, GGN, diagonal, log_scale=False)
    labelled = {"exact": np.linspace(0.0, 1.0, 10), "mc": diagonal}
    with pytest.raises(ValueError, match=r"'ggn_diagonal'.*Diag-GGN MC.*index 3"):
        plot_spectrum_comparison(HESSIAN, GGN, labelled, log_scale=False)


def test_a_finite_diagonal_is_counted_and_normalised_over_every_entry() -> None:
    diagonal = np.linspace(0.0, 1.0, 100)
    fig = plot_spectrum_comparison(HESSIAN, GGN, diagonal, log_scale=False, bins=10)
    hist_ax = fig.axes[1]
    assert hist_ax.get_legend_handles_labels()[1] == ["Diag-GGN (100 entries)"]
    (patch,) = hist_ax.patches
    xy = np.asarray(patch.get_path().vertices)  # the step outline: area one over 10 bins
    widths, heights = np.diff(xy[1:-1:2, 0]), xy[1:-1:2, 1][:-1]
    assert np.sum(widths * heights) == pytest.approx(1.0)


def _landscape(**planes: Any) -> dict[str, Any]:
    return {"t": T, "train_loss": np.array([T**2 + 0.1]), **planes}


@pytest.mark.parametrize(
    ("planes", "match"),
    [
        ({"plane_train_loss": np.ones((1, 3, 3))}, r"'plane_train_loss' of shape \[q, 5, 5\]"),
        ({"plane_train_loss": np.ones((1, 5, 3))}, r"'plane_train_loss'.*shape \(1, 5, 3\)"),
        ({"plane_train_loss": np.ones((5, 5))}, r"'plane_train_loss'.*shape \(5, 5\)"),
        (
            {"plane_train_loss": np.ones((1, 5, 5)), "plane_test_loss": np.ones((2, 5, 5))},
            r"'plane_test_loss' with as many planes as 'plane_train_loss' \(1\)",
        ),
    ],
)
def test_a_plane_not_matching_t_is_refused_naming_the_key(
    planes: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=r"Argument 'path'.*" + match):
        plot_loss_landscape(_landscape(plane_names=np.array(["a|b"]), **planes), curves=False)


def test_a_plane_file_of_another_size_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "land.npz"
    np.savez(path, **_landscape(plane_train_loss=np.ones((1, 3, 3))))
    with pytest.raises(ValueError, match=r"'plane_train_loss'.*land\.npz"):
        plot_loss_landscape(path, curves=False)


def test_a_matching_plane_is_drawn_over_t() -> None:
    z = np.add.outer(10.0 * T**2, T**2) + 0.1  # z[i, j]: t[i] along the first direction
    fig = plot_loss_landscape(
        _landscape(plane_names=np.array(["a|b"]), plane_train_loss=z[None]), curves=False
    )
    filled = next(c for c in fig.axes[0].collections if hasattr(c, "levels"))
    # losses over a factor 50 apart: log10 levels from the plane's least to its largest
    np.testing.assert_allclose(filled.levels[[0, -1]], np.log10([z.min(), z.max()]))
    np.testing.assert_allclose(fig.axes[0].get_xlim(), [-1.0, 1.0])
