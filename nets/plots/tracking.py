r"""Curvature during training: top eigenvalues and trace against steps, with the edge of stability.

The rows are those of :class:`nets.CurvatureTracker` (``curvature.jsonl`` of a run
directory, the ``curvature`` section of its ``stats.json``, or a list of dicts).
The left panel draws the top eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_k`
against the optimiser step together with :math:`2/\eta` of the learning rate
:math:`\eta` recorded in each row (:math:`(2+2\beta)/\eta` for SGD with momentum
:math:`\beta`, no line for Adam and other optimisers: :func:`edge_of_stability`; a
row's rate is that of the step it follows, so a change is drawn right after the last
row at the old rate): gradient descent on a quadratic with curvature
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

__all__ = [
    "EDGE_LABEL",
    "close_figure",
    "edge_of_stability",
    "load_tracking_rows",
    "plot_curvature_tracking",
]

#: Legend label of the :math:`2/\eta` line (gradient descent without momentum, or rows
#: without the run's configuration).
EDGE_LABEL = r"$2/\eta$ (edge of stability, GD without momentum)"


def edge_of_stability(config: Mapping[str, Any] | None) -> tuple[float, str] | None:
    r"""The stability threshold :math:`c/\eta` of the run's optimiser as ``(c, label)``.

    Gradient descent on a quadratic of curvature :math:`\lambda` is stable iff
    :math:`\lambda < 2/\eta`; heavy-ball momentum :math:`\beta` (SGD's ``momentum``,
    no dampening, no Nesterov) iff :math:`\lambda < (2 + 2\beta)/\eta`.  Other optimisers
    (Adam, Nesterov, dampening, curvature optimisers) have no such threshold on the
    Hessian's eigenvalues (Adam's concerns the preconditioned Hessian, not tracked):
    ``None``.  Without a configuration (rows alone) the threshold of plain gradient
    descent is assumed, and its label says so.

    >>> edge_of_stability({"optimizer": "SGD", "optimizer_kwargs": {"momentum": 0.9}})[0]
    3.8
    >>> edge_of_stability({"optimizer": "Adam", "optimizer_kwargs": {}}) is None
    True
    """
    if config is None:
        return 2.0, EDGE_LABEL
    kwargs = dict(config.get("optimizer_kwargs") or {})
    if str(config.get("optimizer", "")).lower() != "sgd":
        return None
    beta = float(kwargs.get("momentum", 0) or 0)
    if kwargs.get("nesterov") or float(kwargs.get("dampening", 0) or 0) != 0:
        return None
    if beta == 0:
        return 2.0, EDGE_LABEL
    return 2.0 + 2.0 * beta, rf"$(2+2\beta)/\eta$, $\beta={beta:g}$ (edge of stability)"


def _run_config(folder: Path | None) -> dict[str, Any] | None:
    """The ``config`` of the run's ``stats.json`` in ``folder`` (``None`` without one)."""
    if folder is None or not (folder / "stats.json").is_file():
        return None
    try:
        config = json.loads((folder / "stats.json").read_text(encoding="utf-8")).get("config")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return dict(config) if isinstance(config, Mapping) else None


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
        where = "the rows given" if folder is None else f"'{source}'"
        raise ValueError(  # the message of argument_error, without quoting the sentence
            "Argument 'source': expected curvature rows (one per measurement; a run records "
            f"them only when it is trained with track=...); received {where}, which holds none."
        )
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


def _draw_eigenvalues(
    ax: Axes, rows: list[dict[str, Any]], steps: np.ndarray, config: Mapping[str, Any] | None
) -> None:
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
    threshold = edge_of_stability(config)
    if np.isfinite(lr).any() and threshold is not None:
        with np.errstate(divide="ignore"):
            edge = np.where(lr > 0, threshold[0] / lr, np.nan)
        # a row's lr is that of the step it follows: it holds from the previous row on
        ax.step(steps, edge, where="pre", color=PALETTE[7], linestyle="--", label=threshold[1])
    elif threshold is None:
        name = (config or {}).get("optimizer")
        ax.text(
            0.02, 0.02, f"no edge-of-stability line: {name} has no threshold on these "
            "eigenvalues (preconditioned sharpness not tracked)",
            transform=ax.transAxes, fontsize=6, va="bottom",
        )  # fmt: skip
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
    config: Mapping[str, Any] | None = None,
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
    config:
        The run's configuration (``optimizer``, ``optimizer_kwargs``), which sets the
        stability threshold (:func:`edge_of_stability`); default: the ``config`` of the
        run's ``stats.json`` beside the rows, else the threshold of gradient descent.

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
        _draw_eigenvalues(axes.pop(0), rows, steps, config or _run_config(folder))
        if has_trace:
            _draw_trace(axes.pop(0), rows, steps)
        if snapshots:
            _draw_densities(axes.pop(0), fig, snapshots, bins)
        if title:
            fig.suptitle(title)
    if save_path is not None:
        save_figure(fig, save_path)
    return fig
