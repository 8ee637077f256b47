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
al. 2021).  Parameter groups at different rates have no single such line: two lines
bound the edge, the threshold at the largest rate and at the smallest, naming their
groups.  The middle panel draws the Hutchinson trace with its standard error when the
rows have one; the right panel, when the rows name density snapshots
(``density_every``), the Gaussian-smoothed SLQ densities as a heat map over training,
each column centred on its snapshot's step.

>>> rows = [{"step": 5 * i, "top_eigenvalues": [3.0 + i, 1.0], "lr": 0.1, "trace": 9.0 + i,
...          "trace_stderr": 0.5} for i in range(1, 5)]
>>> fig = plot_curvature_tracking(rows)
>>> [ax.get_xlabel() for ax in fig.axes]
['optimiser step', 'optimiser step']
>>> close_figure(fig)
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

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
    "GD_LABEL",
    "UNRECORDED_LABEL",
    "close_figure",
    "edge_of_stability",
    "load_tracking_rows",
    "plot_curvature_tracking",
]

logger = logging.getLogger(__name__)

#: Legend label of the :math:`2/\eta` line drawn for rows without the run's configuration:
#: the threshold of plain gradient descent is assumed, at the rows' ``lr`` (the rate of
#: the optimiser's first parameter group).
EDGE_LABEL = (
    r"$2/\eta$, edge of stability if GD without momentum"
    "\n"
    r"(optimiser not recorded; $\eta$ of parameter group 0)"
)

#: Legend label of the :math:`2/\eta` line of a run known to use gradient descent without
#: momentum.
GD_LABEL = r"$2/\eta$ (edge of stability, GD without momentum)"

#: Legend label of the :math:`2/\eta` line of an SGD run whose configuration records no
#: settings (written before ``optimizer_param_groups`` were, of an optimiser object or
#: of SGD's defaults): the threshold of plain gradient descent is assumed.
UNRECORDED_LABEL = (
    r"$2/\eta$, edge of stability if GD without momentum" + "\n(SGD's settings not recorded)"
)

_NO_LINE = "no edge-of-stability line: "
_SGD_DEFAULTS: dict[str, Any] = {
    "momentum": 0.0, "dampening": 0.0, "nesterov": False, "maximize": False,
}  # fmt: skip


def edge_of_stability(config: Any) -> tuple[float, str] | None:
    r"""The stability threshold :math:`c/\eta` of the run's optimiser as ``(c, label)``.

    Gradient descent on a quadratic of curvature :math:`\lambda` is stable iff
    :math:`\lambda < 2/\eta`; SGD's heavy-ball momentum :math:`\beta` iff
    :math:`\lambda < (2 + 2\beta)/\eta`, with dampening :math:`\tau` iff
    :math:`\lambda < (2 + 2\beta)/((1-\tau)\eta)`, with Nesterov momentum iff
    :math:`\lambda < (2 + 2\beta)/((1+2\beta)\eta)`.  Other optimisers (Adam, curvature
    optimisers) have no such threshold on the Hessian's eigenvalues (Adam's concerns the
    preconditioned Hessian, not tracked): ``None``; so are settings that cannot be read
    and parameter groups of different momentum, or of different rates (two bounds, not
    a threshold: see :func:`plot_curvature_tracking`).  ``c`` multiplies the rows' rate,
    that of the first parameter group.  Without a configuration (rows alone) the
    threshold of plain gradient descent is assumed, and its label
    (:data:`EDGE_LABEL`) says so; likewise for SGD whose configuration records no
    settings (:data:`UNRECORDED_LABEL`: written before the parameter groups were, when
    an optimiser object's settings were not recorded).  Weight decay :math:`\delta`
    (absent from the tracked loss's Hessian) would lower each threshold by
    :math:`\delta`: not drawn.

    ``config`` is the run's configuration: ``optimizer`` (its name), and its settings
    in ``optimizer_param_groups`` (one mapping per parameter group, as
    :func:`nets.training.optimizer_param_groups` records them), else in
    ``optimizer_kwargs``; or the optimiser itself.

    >>> edge_of_stability({"optimizer": "SGD", "optimizer_kwargs": {"momentum": 0.9}})[0]
    3.8
    >>> edge_of_stability({"optimizer": "Adam", "optimizer_kwargs": {}}) is None
    True
    """
    lines, _ = _edge_lines(_as_config(config))
    return lines[0] if len(lines) == 1 else None


def _as_config(config: Any) -> Mapping[str, Any] | None:
    """``config`` as a mapping: an optimiser's name and parameter groups, or as given."""
    if config is None or isinstance(config, Mapping):
        return config
    if hasattr(config, "param_groups"):  # an optimiser: read like the configuration of a run
        from nets.training import optimizer_param_groups

        return {
            "optimizer": type(config).__name__,
            "optimizer_param_groups": optimizer_param_groups(config),
        }
    raise argument_error(
        "config", "the run's configuration (a mapping) or its optimiser", config, kind=TypeError
    )


def _group_settings(config: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """Each parameter group's settings: ``optimizer_param_groups``, else ``optimizer_kwargs``
    (one group: what a configuration recorded before the groups were holds; a name's
    keywords, the others at the optimiser's defaults); ``None`` when neither records any
    (such a configuration's optimiser may have been given as an object, its settings
    unknown)."""
    groups = config.get("optimizer_param_groups")
    if isinstance(groups, list) and groups and all(isinstance(g, Mapping) for g in groups):
        return [dict(g) for g in groups]
    kwargs = config.get("optimizer_kwargs")
    return [dict(kwargs)] if isinstance(kwargs, Mapping) and kwargs else None


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def _sgd_rule(settings: Mapping[str, Any]) -> tuple[float, str] | str:
    r"""``(c, formula)`` of one SGD parameter group (stable iff :math:`\lambda < c/\eta`),
    or why it has none."""
    beta, tau, nesterov, maximize = (settings.get(k, d) for k, d in _SGD_DEFAULTS.items())
    beta = 0.0 if beta is None else beta
    if not (_real(beta) and _real(tau) and isinstance(nesterov, bool) and maximize in (0, 1)):
        return "SGD's recorded momentum settings cannot be read"
    if maximize:
        return "SGD maximises"
    if not 0 <= beta < 1 or (beta and not 0 <= tau < 1):
        return f"SGD with momentum {beta!r} and dampening {tau!r} has no such threshold"
    if beta == 0:
        return 2.0, r"$2/\eta$"
    if nesterov:
        formula = rf"$(2+2\beta)/((1+2\beta)\eta)$, Nesterov $\beta={beta:g}$"
        return (2 + 2 * beta) / (1 + 2 * beta), formula
    if tau:
        formula = rf"$(2+2\beta)/((1-\tau)\eta)$, $\beta={beta:g}$, $\tau={tau:g}$"
        return (2 + 2 * beta) / (1 - tau), formula
    return 2 + 2 * beta, rf"$(2+2\beta)/\eta$, $\beta={beta:g}$"


def _edge_lines(config: Mapping[str, Any] | None) -> tuple[list[tuple[float, str]], str | None]:
    r"""The lines :math:`m/\eta` to draw, ``(m, label)`` with :math:`\eta` the rows' rate
    (the first parameter group's), and a note for the panel (why there is no line, or
    how to read two)."""
    if config is None:
        return [(2.0, EDGE_LABEL)], None
    name = str(config.get("optimizer") or "the optimiser")
    if name.lower() != "sgd":
        return [], (
            f"{_NO_LINE}{name} has no threshold on these eigenvalues (preconditioned "
            "sharpness not tracked)"
        )
    groups = _group_settings(config)
    if groups is None:
        return [(2.0, UNRECORDED_LABEL)], None
    recorded: list[Any] = [g.get("lr", 1.0 if len(groups) == 1 else None) for g in groups]
    if not all(_real(lr) and lr >= 0 for lr in recorded):
        return [], f"{_NO_LINE}the parameter groups' recorded rates cannot be read"
    rates = [float(lr) for lr in recorded]
    if rates[0] == 0:
        return [], f"{_NO_LINE}parameter group 0 (the rows' lr) has rate 0"
    active = [i for i, lr in enumerate(rates) if lr > 0]  # a group at rate 0 does not move
    rules = {i: _sgd_rule(groups[i]) for i in active}
    reason = next((r for r in rules.values() if isinstance(r, str)), None)
    if reason is not None:
        return [], _NO_LINE + reason
    if len(set(rules.values())) > 1:
        return [], f"{_NO_LINE}parameter groups of different momentum have no single threshold"
    c, formula = cast(tuple[float, str], rules[0])
    ratios = {i: rates[i] / rates[0] for i in active}
    if max(ratios.values()) == min(ratios.values()):
        label = GD_LABEL if formula == r"$2/\eta$" else f"{formula} (edge of stability)"
        return [(c, label)], None
    lines = []
    bounds = ((max, "largest", "stable below"), (min, "smallest", "unstable above"))
    for pick, word, side in bounds:
        ratio = pick(ratios.values())
        named = ", ".join(str(i) for i in active if ratios[i] == ratio)
        lines.append((c / ratio, f"{formula} at the {word} rate\n(group {named}): {side}"))
    note = (
        "parameter groups of different rates: the edge of stability (of the rate-"
        "preconditioned Hessian) lies between the two lines"
    )
    return lines, note


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
        No rows file.
    ValueError
        No rows; a row whose ``step`` is not a finite number or whose
        ``top_eigenvalues`` is not a list of numbers (naming the row's index).
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
    where = "the rows given" if folder is None else f"'{source}'"
    kept = [(i, r) for i, r in enumerate(rows) if isinstance(r, Mapping) and "step" in r]
    for i, row in kept:
        _check_row(i, row, where)
    rows = [r for _, r in kept]
    if not rows:
        raise ValueError(  # the message of argument_error, without quoting the sentence
            "Argument 'source': expected curvature rows (one per measurement; a run records "
            f"them only when it is trained with track=...); received {where}, which holds none."
        )
    return [dict(r) for r in rows], folder


#: A non-finite eigenvalue as ``stats.json`` writes it (:func:`nets.checkpoint.json_safe`).
_NON_FINITE = ("nan", "inf", "-inf")


def _eigenvalue(value: Any) -> float | None:
    """A row's eigenvalue as a float (NaN for JSON null), or ``None`` when it is none."""
    if value is None:
        return math.nan
    if _number(value):
        return float(value)
    return float(value) if isinstance(value, str) and value in _NON_FINITE else None


def _check_row(index: int, row: Mapping[str, Any], where: str) -> None:
    """Refuse a row whose ``step`` is not a finite number or whose ``top_eigenvalues`` is not
    a list of numbers, naming the row (the figure would fail on it with a bare
    ``TypeError``, or sort and place it wrongly)."""
    step = row["step"]
    if not _real(step):
        raise argument_error(
            "source", f"rows whose 'step' is a finite number (row {index} of {where})", step
        )
    top = row.get("top_eigenvalues")
    if not isinstance(top, list | tuple) or any(_eigenvalue(v) is None for v in top):
        raise argument_error(
            "source",
            f"rows whose 'top_eigenvalues' is a list of numbers (row {index}, step {step}, "
            f"of {where})",
            top,
        )


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
    return np.array([float(r[key]) if _number(r.get(key)) else np.nan for r in rows])


def _draw_eigenvalues(
    ax: Axes, rows: list[dict[str, Any]], steps: np.ndarray, config: Mapping[str, Any] | None
) -> None:
    k = max(len(r["top_eigenvalues"]) for r in rows)
    values = np.full((len(rows), k), np.nan)
    for i, row in enumerate(rows):
        top = [_eigenvalue(v) for v in row["top_eigenvalues"]]
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
    _draw_edges(ax, rows, steps, config)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Top eigenvalues")
    ax.legend(fontsize=6)  # the edge-of-stability labels are long


def _draw_edges(
    ax: Axes, rows: list[dict[str, Any]], steps: np.ndarray, config: Mapping[str, Any] | None
) -> None:
    """The edge-of-stability line(s) of the rows' rates (:func:`_edge_lines`), or a note."""
    lr = _column(rows, "lr")
    lines, note = _edge_lines(config)
    if np.isfinite(lr).any():
        for (multiplier, label), style in zip(lines, ("--", ":")):
            with np.errstate(divide="ignore", invalid="ignore"):
                edge = np.where(lr > 0, multiplier / lr, np.nan)
            # a row's lr is that of the step it follows: it holds from the previous row on
            ax.step(steps, edge, where="pre", color=PALETTE[7], linestyle=style, label=label)
    if note is not None:  # wrapped to the panel, which the layout need not make room for
        text = ax.text(0.02, 0.02, textwrap.fill(note, 55), transform=ax.transAxes, fontsize=6)
        text.set_in_layout(False)


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


_Snapshots = list[tuple[float, SpectralDensity | None]]


def _snapshots(rows: list[dict[str, Any]], folder: Path | None) -> _Snapshots:
    """``(step, density)`` of each row naming a density file, sorted by step; ``None`` for a
    file that is missing (logged: its column is drawn blank); no snapshots at all when
    none of the files is there."""
    named = [r for r in rows if isinstance(r.get("density"), str)]
    if named and folder is None:
        logger.warning(
            "%d curvature rows name density snapshot files, but the rows were given in "
            "memory: pass the run directory to draw the densities",
            len(named),
        )
        return []
    found: dict[float, SpectralDensity | None] = {}
    for row in named:
        path = cast(Path, folder) / row["density"]
        step = float(row["step"])
        if step in found:
            logger.warning("two density snapshots of step %g: drawing the later, '%s'", step, path)
        if path.is_file():
            found[step] = SpectralDensity.load(path)
        else:
            logger.warning(
                "density snapshot file '%s' (step %g) is missing: its column is left blank",
                path,
                step,
            )
            found[step] = None
    if all(density is None for density in found.values()):
        return []
    return sorted(found.items(), key=lambda item: item[0])


def _column_edges(centres: np.ndarray) -> np.ndarray:
    """Edges of cells centred on increasing ``centres``: the midpoints between them, and
    the outer cells as wide on each side as their inner half (width 1 for one centre).

    >>> _column_edges(np.array([10.0, 20.0, 100.0])).tolist()
    [5.0, 15.0, 60.0, 140.0]
    """
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mids = 0.5 * (centres[1:] + centres[:-1])
    return np.concatenate([[2 * centres[0] - mids[0]], mids, [2 * centres[-1] - mids[-1]]])


def _draw_densities(ax: Axes, fig: Figure, snapshots: _Snapshots, bins: int) -> None:
    """The smoothed densities as a heat map, column ``j`` centred on snapshot ``j``'s step
    (edges at the midpoints between steps: the steps need not be evenly spaced); a
    missing snapshot's column is blank."""
    present = [d for _, d in snapshots if d is not None]
    lo = min(float(d.nodes.min()) for d in present)
    hi = max(float(d.nodes.max()) for d in present)
    span = max(hi - lo, 1e-12)
    grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, bins)
    sigma = span / 50.0
    image = np.stack(
        [np.full(bins, np.nan) if d is None else d.smooth(grid, sigma) for _, d in snapshots],
        axis=1,
    )
    shown = np.ma.masked_invalid(np.log10(image + 1e-12 * np.nanmax(image)))
    steps = np.array([s for s, _ in snapshots])
    mesh = ax.pcolorfast(_column_edges(steps), _column_edges(grid), shown, cmap="viridis")
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
    config: Any = None,
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
        The run's configuration (``optimizer`` and ``optimizer_param_groups``, else
        ``optimizer_kwargs``) or its optimiser (for rows in memory), which sets the
        stability threshold (:func:`edge_of_stability`); default: the ``config`` of the
        run's ``stats.json`` beside the rows, else the threshold of gradient descent at
        the rows' ``lr`` (the first parameter group's), labelled as an assumption
        (:data:`EDGE_LABEL`).  Parameter groups at different rates have no single
        threshold on the Hessian's eigenvalues (the stability of gradient descent
        concerns the rate-preconditioned Hessian): two lines bound it, the threshold
        at the largest rate (stable below) and at the smallest (unstable above), each
        naming its groups.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per quantity present: eigenvalues, trace (rows with ``trace``),
        densities (rows naming a ``density`` file next to the rows file; each column is
        centred on its snapshot's step, and a missing file is logged and its column left
        blank).

    Raises
    ------
    ValueError
        A row whose ``step`` is not a finite number or whose ``top_eigenvalues`` is not a
        list of numbers (the error names the row), or ``bins`` below 2.

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
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise argument_error("bins", "an integer >= 2", bins)
    rows, folder = load_tracking_rows(path_or_rows)
    rows.sort(key=lambda r: float(r["step"]))
    steps = np.array([float(r["step"]) for r in rows])
    has_trace = bool(np.isfinite(_column(rows, "trace")).any())
    snapshots = _snapshots(rows, folder)
    panels = 1 + has_trace + bool(snapshots)
    with figure_style():
        fig, grid = new_subplots(1, panels, (3.3 * panels, 2.9))
        axes = list(grid[0])
        run_config = _as_config(config) or _run_config(folder)
        _draw_eigenvalues(axes.pop(0), rows, steps, run_config)
        if has_trace:
            _draw_trace(axes.pop(0), rows, steps)
        if snapshots:
            _draw_densities(axes.pop(0), fig, snapshots, bins)
        if title:
            fig.suptitle(title)
    if save_path is not None:
        save_figure(fig, save_path)
    return fig
