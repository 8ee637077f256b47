r"""Curvature during training: top eigenvalues and trace against steps, with the edge of stability.

The rows are those of :class:`nets.CurvatureTracker` (``curvature.jsonl`` of a run
directory, the ``curvature`` section of its ``stats.json``, or a list of dicts).
The left panel draws the top eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_k`
against the optimiser step together with :math:`2/\eta` of the learning rate
:math:`\eta` recorded in each row: gradient descent on a quadratic with curvature
:math:`\lambda` is stable iff :math:`\lambda < 2/\eta`, and full-batch training
tends to drive :math:`\lambda_1` up to that line (the *edge of stability*, Cohen et
al. 2021).  The middle panel draws the Hutchinson trace with its standard error
when the rows have one; the right panel, when the rows name density snapshots
(``density_every``), the Gaussian-smoothed SLQ densities as a heat map over training.

>>> rows = [{"step": 5 * i, "top_eigenvalues": [3.0 + i, 1.0], "lr": 0.1, "trace": 9.0 + i,
...          "trace_stderr": 0.5} for i in range(1, 5)]
>>> fig = plot_curvature_tracking(rows)
>>> [ax.get_xlabel() for ax in fig.axes]
['optimiser step', 'optimiser step']
>>> close_figure(fig)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nets.curvature_rows import STATS_CHECKSUMS, decode_rows, verified_rows
from nets.plots._figure import PALETTE, close_figure, figure_style, new_subplots, save_figure
from spectral.density import SpectralDensity
from spectral.errors import argument_error
from spectral.io import CorruptFileError

__all__ = ["EDGE_LABEL", "close_figure", "load_tracking_rows", "plot_curvature_tracking"]

#: Legend label of the :math:`2/\eta` line.
EDGE_LABEL = r"$2/\eta$ (edge of stability)"


def load_tracking_rows(source: Any) -> tuple[list[dict[str, Any]], Path | None]:
    """Tracker rows from a run directory, a ``.jsonl``/``stats.json`` file or a list of dicts.

    Returns the rows and the folder that density snapshot files are relative to
    (``None`` for in-memory rows).

    The rows of a file are verified against their CRC-32s (those of ``stats.json`` are
    in its ``curvature_crc32`` list; a ``stats.json`` written before it had one is read
    unverified, with a logged warning).

    Raises
    ------
    FileNotFoundError
        No rows file; ``ValueError`` when there are no rows.
    spectral.io.CorruptFileError
        A row that differs from its checksum, or a file that is not JSON.
    """
    folder: Path | None = None
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            jsonl = path / "curvature.jsonl"
            path = jsonl if jsonl.is_file() else path / "stats.json"
        if not path.is_file():
            raise FileNotFoundError(f"Argument 'source': no curvature rows file '{path}'.")
        folder = path.parent
        rows = _rows_of_file(path)
    elif isinstance(source, Sequence) and not isinstance(source, str | bytes):
        rows = list(source)
    else:
        raise argument_error(
            "source",
            "a run directory, a curvature.jsonl path or a list of rows",
            source,
            kind=TypeError,
        )
    rows = [r for r in rows if isinstance(r, Mapping) and "step" in r]
    if not rows:
        raise argument_error("source", "curvature rows (one per measurement)", "no rows")
    return [dict(r) for r in rows], folder


def _rows_of_file(path: Path) -> list[Any]:
    """The rows of a ``curvature.jsonl`` or of a ``stats.json``'s ``curvature`` list, each
    verified against its CRC-32 (:mod:`nets.curvature_rows`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"File '{path}': not UTF-8 text ({exc}).") from exc
    if path.suffix != ".json":
        return decode_rows(text, path)
    try:
        stats = json.loads(text)
    except ValueError as exc:
        raise CorruptFileError(f"File '{path}': not valid JSON ({exc}).") from exc
    if not isinstance(stats, dict) or stats.get("curvature") is None:
        return []
    return verified_rows(stats["curvature"], stats.get(STATS_CHECKSUMS), path)


def _column(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array(
        [float(r[key]) if isinstance(r.get(key), int | float) else np.nan for r in rows]
    )


def _draw_eigenvalues(ax: Axes, rows: list[dict[str, Any]], steps: np.ndarray) -> None:
    k = max(len(r.get("top_eigenvalues", ())) for r in rows)
    values = np.full((len(rows), k), np.nan)
    for i, row in enumerate(rows):
        top = row.get("top_eigenvalues", ())
        values[i, : len(top)] = top
    for j in range(k):
        ax.plot(
            steps,
            values[:, j],
            marker="o",
            markersize=2.5,
            color=PALETTE[j % 6],
            label=rf"$\lambda_{{{j + 1}}}$",
        )
    lr = _column(rows, "lr")
    if np.isfinite(lr).any():
        with np.errstate(divide="ignore"):
            edge = np.where(lr > 0, 2.0 / lr, np.nan)
        ax.step(steps, edge, where="post", color=PALETTE[7], linestyle="--", label=EDGE_LABEL)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Top eigenvalues")
    ax.legend()


def _draw_trace(ax: Axes, rows: list[dict[str, Any]], steps: np.ndarray) -> None:
    trace, err = _column(rows, "trace"), _column(rows, "trace_stderr")
    ax.errorbar(
        steps,
        trace,
        yerr=np.where(np.isfinite(err), err, 0.0),
        marker="o",
        markersize=2.5,
        color=PALETTE[2],
        capsize=2.0,
        label="Hutchinson trace ± s.e.",
    )
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("trace")
    ax.set_title("Trace")
    ax.legend()


def _draw_densities(
    ax: Axes, fig: Figure, snapshots: list[tuple[float, SpectralDensity]], bins: int
) -> None:
    lo = min(float(d.nodes.min()) for _, d in snapshots)
    hi = max(float(d.nodes.max()) for _, d in snapshots)
    span = max(hi - lo, 1e-12)
    grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, bins)
    sigma = span / 50.0
    image = np.stack([d.smooth(grid, sigma) for _, d in snapshots], axis=1)
    steps = np.array([s for s, _ in snapshots])
    half = 0.5 * (np.diff(steps).min() if steps.size > 1 else 1.0)
    mesh = ax.imshow(
        np.log10(image + 1e-12 * image.max()),
        origin="lower",
        aspect="auto",
        extent=(steps[0] - half, steps[-1] + half, grid[0], grid[-1]),
        cmap="viridis",
    )
    fig.colorbar(mesh, ax=ax, label=r"$\log_{10}$ smoothed density")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Spectral density (SLQ)")
    ax.grid(False)


def plot_curvature_tracking(
    path_or_rows: Any,
    *,
    bins: int = 200,
    save_path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Plot tracked top eigenvalues (with the :math:`2/\\eta` line), trace and densities.

    Parameters
    ----------
    path_or_rows:
        A run directory (``curvature.jsonl``, else ``stats.json``'s ``curvature``
        section), one of those files, or a list of tracker rows.
    bins:
        Eigenvalue grid size of the density heat map.
    save_path:
        Write the figure there (PNG/PDF by suffix) atomically.
    title:
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per quantity present: eigenvalues, trace (rows with ``trace``),
        densities (rows naming a readable ``density`` file next to the rows file).

    Examples
    --------
    >>> import torch
    >>> from nets import CurvatureTracker
    >>> net = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> tracker = CurvatureTracker(net, torch.nn.CrossEntropyLoss(), (x, torch.tensor([0, 1] * 4)),
    ...                            every=1, top_k=1)
    >>> rows = [tracker.step(lr=0.1) for _ in range(3)]
    >>> fig = plot_curvature_tracking(tracker.rows)
    >>> type(fig).__name__
    'Figure'
    """
    rows, folder = load_tracking_rows(path_or_rows)
    rows.sort(key=lambda r: int(r["step"]))
    steps = np.array([float(r["step"]) for r in rows])
    has_trace = bool(np.isfinite(_column(rows, "trace")).any())
    snapshots = [
        (float(r["step"]), SpectralDensity.load(folder / r["density"]))
        for r in rows
        if folder is not None
        and isinstance(r.get("density"), str)
        and (folder / r["density"]).is_file()
    ]
    panels = 1 + has_trace + bool(snapshots)
    with figure_style():
        fig, grid = new_subplots(1, panels, (3.3 * panels, 2.9))
        axes = list(grid[0])
        _draw_eigenvalues(axes.pop(0), rows, steps)
        if has_trace:
            _draw_trace(axes.pop(0), rows, steps)
        if snapshots:
            _draw_densities(axes.pop(0), fig, snapshots, bins)
        if title:
            fig.suptitle(title)
    if save_path is not None:
        save_figure(fig, save_path)
    return fig
