"""The tracking figure's density heat map and its refusal of malformed rows.

An adversarial sweep found: snapshots at steps [10, 20, 100] were drawn with ``imshow``
spread evenly over the steps' range, centred at 21.7, 55 and 88.3 (the column over step 20
was that of step 10); a missing snapshot file was skipped silently, and the remaining
columns shifted; a row with ``top_eigenvalues=None`` or a NaN step failed with a bare
``TypeError``/``ValueError`` naming no row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.backend_bases import MouseEvent

from nets.curvature_rows import write_rows
from nets.plots.tracking import plot_curvature_tracking
from spectral import SpectralDensity


@pytest.fixture(autouse=True)
def _close_figures() -> Any:
    yield
    plt.close("all")


def _run(folder: Path, steps: list[int], missing: tuple[int, ...] = ()) -> Path:
    """Rows at ``steps``, each naming a density snapshot with mass at 0 and at its step."""
    rows = []
    for s in steps:
        name = f"curvature.density-{s:08d}.npz"
        if s not in missing:
            SpectralDensity(np.array([0.0, float(s)]), np.array([0.5, 0.5])).save(folder / name)
        rows.append({"step": s, "top_eigenvalues": [float(s)], "lr": 0.1, "density": name})
    write_rows(folder / "curvature.jsonl", rows)
    return folder


def _heat_map(fig: Any) -> Any:
    (ax,) = [a for a in fig.axes if a.get_title() == "Spectral density (SLQ)"]
    (image,) = ax.get_images()
    return image


def _at(image: Any, x: float, y: float) -> Any:
    """The value the heat map shows at data point ``(x, y)`` (what the cursor reads)."""
    pixel_x, pixel_y = image.axes.transData.transform((x, y))  # what AxesImage reads
    event = MouseEvent("motion_notify_event", image.figure.canvas, pixel_x, pixel_y)
    event.xdata, event.ydata = x, y  # what PcolorImage (unevenly spaced columns) reads
    return image.get_cursor_data(event)


def _column_of(image: Any, x: float) -> int:
    """Which column of the heat map's data is drawn over step ``x``: the one that holds
    every value the cursor reads going up the eigenvalue axis at ``x``."""
    data = np.ma.getdata(image.get_array())
    y0, y1 = image.get_extent()[2:]
    seen = [_at(image, x, y) for y in np.linspace(y0, y1, 60)[1:-1]]
    seen = [v for v in seen if v is not None and v is not np.ma.masked]
    matches = [j for j in range(data.shape[1]) if np.isin(seen, data[:, j]).all()]
    assert len(matches) == 1, matches
    return matches[0]


def test_each_column_is_centred_on_its_step(tmp_path: Path) -> None:
    image = _heat_map(plot_curvature_tracking(_run(tmp_path, [10, 20, 100])))
    assert image.get_array().shape[1] == 3
    np.testing.assert_allclose(image.get_extent()[:2], [5.0, 140.0])  # edges: 5 15 60 140
    for x, column in [(6, 0), (14.9, 0), (15.1, 1), (20, 1), (59.9, 1), (60.1, 2), (139, 2)]:
        assert _column_of(image, x) == column, x
    # the snapshot at step 100 has its mode at eigenvalue 100: bright over step 100 only
    assert _at(image, 100.0, 100.0) > _at(image, 20.0, 100.0) + 1.0


def test_a_missing_snapshot_is_logged_and_left_blank(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nets.plots.tracking"):
        fig = plot_curvature_tracking(_run(tmp_path, [2, 4, 6, 8], missing=(6,)))
    assert any("curvature.density-00000006.npz" in r.getMessage() for r in caplog.records)
    image = _heat_map(fig)
    assert image.get_array().shape[1] == 4
    np.testing.assert_allclose(image.get_extent()[:2], [1.0, 9.0])
    # step 6's column is blank (masked: the cursor reads nothing), not its neighbours'
    np.testing.assert_array_equal(np.ma.getmaskarray(image.get_array()).all(axis=0), [0, 0, 1, 0])
    assert _at(image, 6.0, 4.0) in (None, np.ma.masked)
    assert _column_of(image, 4.9) == 1 and _column_of(image, 7.1) == 3


def test_one_snapshot_draws_one_column_on_its_step(tmp_path: Path) -> None:
    image = _heat_map(plot_curvature_tracking(_run(tmp_path, [7])))
    np.testing.assert_allclose(image.get_extent()[:2], [6.5, 7.5])


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"step": 2, "top_eigenvalues": None}, r"'top_eigenvalues'.*row 1, step 2"),
        ({"step": 2}, r"'top_eigenvalues'.*row 1, step 2"),
        ({"step": float("nan"), "top_eigenvalues": [1.0]}, r"'step'.*row 1.*received nan"),
        ({"step": "2", "top_eigenvalues": [1.0]}, r"'step'.*row 1"),
        ({"step": 2, "top_eigenvalues": ["1.5"]}, r"'top_eigenvalues'.*row 1"),
    ],
)
def test_a_malformed_row_is_refused_naming_it(row: dict[str, Any], match: str) -> None:
    rows = [{"step": 1, "top_eigenvalues": [1.0], "lr": 0.1}, row]
    with pytest.raises(ValueError, match=match):
        plot_curvature_tracking(rows)


def test_non_finite_eigenvalues_as_stats_json_writes_them_are_drawn_as_gaps() -> None:
    rows = [
        {"step": 2, "top_eigenvalues": ["nan", 1.0], "lr": 0.1},
        {"step": 1, "top_eigenvalues": [3.0, None], "lr": 0.1},
        {"step": 1.5, "top_eigenvalues": [2.0, 1.0], "lr": 0.1},
    ]
    lines = {ln.get_label(): ln for ln in plot_curvature_tracking(rows).axes[0].get_lines()}
    drawn = {label: np.asarray(line.get_data(), dtype=float) for label, line in lines.items()}
    np.testing.assert_allclose(drawn[r"$\lambda_{1}$"][0], [1.0, 1.5, 2.0])
    np.testing.assert_allclose(drawn[r"$\lambda_{1}$"][1], [3.0, 2.0, np.nan])
    np.testing.assert_allclose(drawn[r"$\lambda_{2}$"][1], [np.nan, 1.0, 1.0])


def test_bins_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="'bins'"):
        plot_curvature_tracking([{"step": 1, "top_eigenvalues": [1.0]}], bins=1)
