"""Loss landscapes: loss and accuracy along directions (curves) and over planes (contours).

A landscape file (written by ``nets.build_loss_landscape``) holds the
perturbation sizes ``t`` in ``[-dist, dist]``, one row per direction in
``train_loss``/``test_loss``/``train_acc``/``test_acc`` (shape ``[d, n_points]``),
the directions' names and Ritz values, and optionally 2-D planes
``plane_train_loss[q, i, j]`` = loss at ``t[i]`` along the plane's first
direction and ``t[j]`` along its second.

>>> import numpy as np
>>> t = np.linspace(-1, 1, 5)
>>> fig = plot_loss_landscape({"t": t, "train_loss": np.array([t**2 + 0.1]),
...                            "test_loss": np.array([t**2 + 0.2]),
...                            "direction_names": np.array(["ritz-top-1"]),
...                            "direction_values": np.array([2.0])})
>>> len(fig.axes)
2
>>> close_figure(fig)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from nets.plots._figure import PALETTE, close_figure, figure_style, new_subplots, save_figure
from nets.plots._sources import load_landscape
from spectral.errors import argument_error

__all__ = ["close_figure", "direction_label", "plot_loss_landscape"]

_METRICS = ("loss", "acc", "both")
_STYLES = ("-", "--", "-.", ":")


def direction_label(name: str, value: float | None = None) -> str:
    """A legend label: ``'ritz-top-1'`` with Ritz value 2.5 -> ``'ritz-top-1 (θ = 2.5)'``.

    >>> direction_label("ritz-top-1", 2.5)
    'ritz-top-1 ($\\\\theta$ = 2.5)'
    >>> direction_label("random-1", float("nan"))
    'random-1'
    """
    if value is None or not np.isfinite(value):
        return name
    return f"{name} ($\\theta$ = {value:.3g})"


def _names(arrays: dict[str, np.ndarray], key: str, count: int, prefix: str) -> list[str]:
    if key in arrays:
        names = [str(n) for n in np.atleast_1d(arrays[key])]
        if len(names) == count:
            return names
    return [f"{prefix}-{i + 1}" for i in range(count)]


def _draw_curves(
    ax: Axes,
    t: np.ndarray,
    curves: np.ndarray,
    labels: list[str],
    checkpoint: float | None,
    xlabel: str,
) -> None:
    for i, (row, label) in enumerate(zip(curves, labels)):
        color = PALETTE[i % len(PALETTE)]
        style = _STYLES[(i // len(PALETTE)) % len(_STYLES)]
        ax.plot(
            t,
            row,
            color=color,
            linestyle=style,
            marker="o" if t.size <= 41 else None,
            markersize=2.5,
            label=label,
        )
    ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle="--", zorder=0)
    if checkpoint is not None and np.isfinite(checkpoint):
        ax.plot(
            [0.0],
            [checkpoint],
            marker="*",
            color="black",
            markersize=7,
            linestyle="none",
            zorder=4,
            label="checkpoint (t = 0)",
        )
    ax.set_xlabel(xlabel)


def _plane_scale(panels: list[np.ndarray]) -> tuple[bool, np.ndarray]:
    """Whether to show log10 of the losses, and contour levels shared by every panel of a plane."""
    finite = np.concatenate([z[np.isfinite(z)] for z in panels])
    if finite.size == 0:
        return False, np.linspace(0.0, 1.0, 15)
    use_log = bool(finite.min() > 0 and finite.max() / finite.min() > 50.0)
    shown = np.log10(finite) if use_log else finite
    low, high = float(shown.min()), float(shown.max())
    if high <= low:
        high = low + 1.0
    return use_log, np.linspace(low, high, 15)


def _log_ticks(bar: Any, levels: np.ndarray) -> None:
    """Label a colour bar of log10 values with the values themselves (0.03, 0.1, 0.3, 1...)."""
    low, high = float(levels[0]), float(levels[-1])
    decades = np.arange(np.floor(low), np.ceil(high) + 1)
    candidates = np.concatenate([decades, decades + np.log10(3.0)])
    ticks = np.sort(candidates[(candidates >= low) & (candidates <= high)])
    if ticks.size < 2:
        return
    bar.set_ticks(ticks)
    bar.set_ticklabels([f"{10.0**x:.2g}" for x in ticks])


def _draw_plane(
    ax: Axes,
    t: np.ndarray,
    z: np.ndarray,
    names: tuple[str, str],
    use_log: bool,
    levels: np.ndarray,
) -> Any:
    shown = np.log10(np.where(z > 0, z, np.nan)) if use_log else z
    # z[i, j] is at (t[i], t[j]): the first direction runs along x, so transpose for contourf.
    filled = ax.contourf(t, t, shown.T, levels=levels, cmap="viridis", extend="both")
    ax.contour(
        t,
        t,
        shown.T,
        levels=levels,
        colors="white",
        linewidths=0.4,
        alpha=0.6,
        negative_linestyles="solid",
    )
    ax.plot(
        [0.0],
        [0.0],
        marker="*",
        color="white",
        markeredgecolor="black",
        markersize=9,
        linestyle="none",
    )
    ax.set_xlabel(f"$t_1$ along {names[0]}")
    ax.set_ylabel(f"$t_2$ along {names[1]}")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.set_aspect("equal")
    ax.grid(False)
    return filled


def _config(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    if "config_json" not in arrays:
        return {}
    try:
        loaded = json.loads(str(np.asarray(arrays["config_json"])))
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _default_title(config: dict[str, Any]) -> str:
    """``Loss landscape of SmallCNN at checkpoint-00010.pt (epoch 10); eval mode ...``."""
    head = "Loss landscape"
    if config.get("model"):
        head += f" of {config['model']}"
    if config.get("checkpoint"):
        head += f" at {os.path.basename(str(config['checkpoint']))}"
        if config.get("epoch") is not None:
            head += f" (epoch {config['epoch']})"
    mode = "eval mode, BatchNorm statistics " + (
        "recomputed at each point" if config.get("refresh_bn") else "of the checkpoint"
    )
    if not config:
        return head
    subsample = config.get("subsample")
    over = "full passes" if subsample is None else f"passes over {subsample} samples per split"
    return f"{head}\n{over}, {mode}"


def plot_loss_landscape(
    path: Any,
    *,
    metric: str = "loss",
    directions: Sequence[int] | None = None,
    planes: bool = True,
    curves: bool = True,
    save_path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Plot train and test loss (and/or accuracy) along each direction, and contours for planes.

    Parameters
    ----------
    path:
        A landscape ``.npz`` (suffix optional) or the loaded mapping of its arrays.
    metric:
        ``"loss"`` (default), ``"acc"`` or ``"both"`` (two rows: loss, then accuracy).
    directions:
        Indices of the directions to draw (all by default).
    curves:
        Draw the curves (``False``: only the planes' contours).
    planes:
        Also draw each stored plane as train/test filled contours (one row per plane);
        losses spanning more than a factor 50 are shown as log10.
    save_path:
        Write the figure there (PNG/PDF by suffix) atomically.

    title:
        The figure's title (default: the model, checkpoint, epoch and evaluation mode that
        the file's ``config_json`` records).

    Returns
    -------
    matplotlib.figure.Figure
        Curves in the first row(s): train on the left, test on the right; the checkpoint
        (t = 0) is marked with a star in every panel, and each x label states how the
        directions are normalised (the unit of t).

    Raises
    ------
    ValueError
        For an unknown metric, out-of-range direction indices, or a malformed file.

    Examples
    --------
    >>> import os, tempfile
    >>> from nets import build_loss_landscape, compute_eigenspectrum, get_model
    >>> out = tempfile.mkdtemp()
    >>> model = get_model("MLP", 10, 1, 8, hidden=(16,), seed=0)   # any nn.Module, or a name
    >>> _ = compute_eigenspectrum("digits", model=model, lanczos_iters=5, save_eigvec=True,
    ...                           save_spectrum_path=os.path.join(out, "spectrum"))
    >>> _ = build_loss_landscape("digits", model=model, dist=0.5, n_points=3,
    ...                          spectrum_path=os.path.join(out, "spectrum"),
    ...                          save_path=os.path.join(out, "land.npz"))
    >>> png = os.path.join(out, "land.png")
    >>> fig = plot_loss_landscape(os.path.join(out, "land.npz"), save_path=png)
    >>> type(fig).__name__, os.path.exists(png)
    ('Figure', True)
    """
    if metric not in _METRICS:
        raise argument_error("metric", f"one of {_METRICS}", metric)
    arrays = load_landscape(path)
    panels = _panels(arrays, metric, directions, planes, curves)
    config = _config(arrays)
    norms = sorted(set((config.get("direction_normalisation") or {}).values()))
    units = f"directions: {'; '.join(norms)}" if norms else "direction normalisation not recorded"
    xlabel = f"perturbation $t$ ({units})"
    if title is None:
        title = _default_title(config)
    rows, plane_names = panels.rows, panels.plane_names
    nrows = len(rows) + len(plane_names)
    with figure_style():
        fig, axes = new_subplots(nrows, 2, (8.0, 3.0 * len(rows) + 3.4 * len(plane_names)))
        _draw_curve_rows(fig, axes, arrays, panels, xlabel)
        for p, plane in enumerate(plane_names):
            _draw_plane_row(fig, axes[len(rows) + p], arrays, panels, p, plane)
        fig.suptitle(title, fontsize=10)
    if save_path is not None:
        save_figure(fig, save_path)
    return fig


@dataclass
class _Panels:
    """What :func:`plot_loss_landscape` draws: the chosen directions, metric rows and planes.

    ``idx`` are the chosen directions, ``names``/``values`` those of every direction in
    the file (values NaN when not recorded), ``labels`` the chosen ones' legend labels,
    ``rows`` the metrics with a row of curves (``"loss"``, ``"acc"``) and
    ``plane_names`` the planes with a row of contours.
    """

    idx: list[int]
    names: list[str]
    values: np.ndarray
    labels: list[str]
    rows: list[str]
    plane_names: list[str]

    def value_label(self, name: str) -> str:
        """A direction's axis label with its value when it is one of the file's directions."""
        if name in self.names:
            return direction_label(name, float(self.values[self.names.index(name)]))
        return name


def _panels(
    arrays: dict[str, np.ndarray],
    metric: str,
    directions: Sequence[int] | None,
    planes: bool,
    curves: bool,
) -> _Panels:
    """Check the selection against the file and return the :class:`_Panels` to draw."""
    d = arrays["train_loss"].shape[0]
    idx = list(range(d)) if directions is None else [int(i) for i in directions]
    if not idx or any(i < 0 or i >= d for i in idx):
        raise argument_error("directions", f"indices in [0, {d})", directions)
    names = _names(arrays, "direction_names", d, "direction")
    values = np.full(d, np.nan)
    if "direction_values" in arrays and np.atleast_1d(arrays["direction_values"]).size == d:
        values = np.atleast_1d(arrays["direction_values"]).astype(np.float64)
    labels = [direction_label(names[i], float(values[i])) for i in idx]
    rows = [m for m in ("loss", "acc") if metric in (m, "both")]
    rows = [m for m in rows if f"train_{m}" in arrays]
    if not rows:
        raise argument_error("metric", "a metric stored in the file", metric)
    plane_names: list[str] = []
    if planes and "plane_train_loss" in arrays:
        q = np.asarray(arrays["plane_train_loss"]).shape[0]
        plane_names = _names(arrays, "plane_names", q, "plane")
    if not curves:
        if not plane_names:
            raise argument_error("curves", "True when the file holds no plane", curves)
        rows = []
    return _Panels(idx, names, values, labels, rows, plane_names)


def _draw_curve_rows(
    fig: Figure, axes: np.ndarray, arrays: dict[str, np.ndarray], panels: _Panels, xlabel: str
) -> None:
    """One row per metric: train and test curves along the chosen directions, one legend."""
    t = arrays["t"]
    origin = np.flatnonzero(t == 0.0)
    for r, m in enumerate(panels.rows):
        for c, split in enumerate(("train", "test")):
            ax = axes[r, c]
            key = f"{split}_{m}"
            if key not in arrays:
                ax.set_axis_off()
                continue
            selected = arrays[key][panels.idx]
            at_zero = None  # every curve passes through the checkpoint at t = 0
            if origin.size:
                at_zero = float(np.asarray(arrays[key], dtype=np.float64)[0, origin[0]])
            _draw_curves(ax, t, selected, panels.labels, at_zero, xlabel)
            ax.set_ylabel("loss" if m == "loss" else "accuracy (%)")
            ax.set_title(f"{split.capitalize()} {'loss' if m == 'loss' else 'accuracy'}")
    handles, legend_labels = axes[0, 0].get_legend_handles_labels()
    if handles and panels.rows:
        fig.legend(
            handles,
            legend_labels,
            loc="outside lower center",
            ncols=min(len(handles), 3),
        )


def _draw_plane_row(
    fig: Figure, row: Any, arrays: dict[str, np.ndarray], panels: _Panels, p: int, plane: str
) -> None:
    """Plane ``p``'s train and test loss contours in ``row``, with one shared colour bar."""
    t = arrays["t"]
    pair = tuple(plane.split("|", 1)) if "|" in plane else (plane, plane)
    splits = [s for s in ("train", "test") if f"plane_{s}_loss" in arrays]
    surfaces = [np.asarray(arrays[f"plane_{s}_loss"], dtype=np.float64)[p] for s in splits]
    use_log, levels = _plane_scale(surfaces)
    filled = None
    for c, split in enumerate(("train", "test")):
        if split not in splits:
            row[c].set_axis_off()
            continue
        axis_names = (panels.value_label(pair[0]), panels.value_label(pair[-1]))
        filled = _draw_plane(row[c], t, surfaces[splits.index(split)], axis_names, use_log, levels)
        row[c].set_title(f"{split.capitalize()} loss over the plane (star: checkpoint)")
    if filled is not None:
        bar = fig.colorbar(filled, ax=list(row), shrink=0.9)
        if use_log:
            _log_ticks(bar, levels)
        bar.set_label("loss (log scale)" if use_log else "loss")
