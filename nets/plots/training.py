"""Training curves from a run's ``stats.json``: loss, accuracy and learning rate against epoch.

>>> stats = {"epochs": [{"epoch": 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 60.0,
...                      "test_loss": 1.1, "test_acc": 55.0},
...                     {"epoch": 2, "lr": 0.05, "train_loss": 0.5, "train_acc": 80.0,
...                      "test_loss": None, "test_acc": None}]}
>>> fig = plot_training(stats)
>>> len(fig.axes)
3
>>> close_figure(fig)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nets.plots._figure import PALETTE, close_figure, figure_style, new_subplots, save_figure
from nets.plots._sources import load_training_stats
from spectral.errors import argument_error

__all__ = ["close_figure", "plot_training"]


def _column(epochs: list[dict[str, Any]], key: str) -> np.ndarray:
    """Per-epoch values of ``key`` as float64, NaN where missing or null."""
    out = np.full(len(epochs), np.nan)
    for i, record in enumerate(epochs):
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[i] = float(value)
    return out


def _accuracy_in_percent(values: np.ndarray, percent: bool) -> np.ndarray:
    """Accuracies in percent: as recorded when the file says so (``train_network`` writes
    percent, and its ``definitions`` say "(%)"); otherwise, for files without definitions,
    fractions (every value <= 1) are scaled.  Guessing from the values alone drew a run at
    chance level on CIFAR-100 (accuracies <= 1 %) at 95-100 %."""
    finite = values[np.isfinite(values)]
    if not percent and finite.size and float(finite.max()) <= 1.0:
        return 100.0 * values
    return values


def _curve(ax: Axes, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> None:
    keep = np.isfinite(y)
    if keep.any():
        ax.plot(
            x[keep], y[keep], marker="o" if keep.sum() <= 30 else None, markersize=3.0, **kwargs
        )


#: Legend names that say what the numbers are (the definitions in ``stats.json``).
TRAIN_LABEL = "train (running mean over the epoch, train mode)"
TEST_LABEL = "test (full pass after the epoch, eval mode)"


def plot_training(
    path_or_dir: Any,
    *,
    show_top5: bool = False,
    axes: Sequence[Axes] | None = None,
    save_path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Plot train/test loss, accuracy (top-1, optionally top-5) and the learning rate per epoch.

    Parameters
    ----------
    path_or_dir:
        A run directory holding ``stats.json``, the file itself, or the loaded dict
        ``{"config": {...}, "epochs": [{"epoch", "lr", "train_loss", "train_acc", ...}]}``.
        ``test_*`` entries may be ``null`` on epochs without evaluation.
    show_top5:
        Also draw ``train_top5``/``test_top5``.
    axes:
        Three Axes (loss, accuracy, learning rate) to draw into; a new 1 x 3 figure otherwise.
    save_path:
        Write the figure there (PNG/PDF by suffix) atomically.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    FileNotFoundError
        If there is no ``stats.json``; ``ValueError`` if it holds no epochs.
    spectral.io.CorruptFileError
        If the file is not JSON (e.g. truncated); the message names it.

    Examples
    --------
    >>> import tempfile
    >>> from nets import train_network
    >>> run = tempfile.mkdtemp()
    >>> _ = train_network(run, "digits", model="MLP", epochs=2, progress=False, device="cpu",
    ...                   model_kwargs={"hidden": (8,)},
    ...                   optimizer_kwargs={"lr": 0.1, "batch_size": 512})
    >>> fig = plot_training(run)
    >>> type(fig).__name__
    'Figure'
    """
    stats = load_training_stats(path_or_dir, name="path_or_dir")
    epochs: list[dict[str, Any]] = [e for e in stats["epochs"] if isinstance(e, dict)]
    x = _column(epochs, "epoch")
    if not np.isfinite(x).all():
        x = np.arange(1, len(epochs) + 1, dtype=np.float64)
    with figure_style():
        if axes is None:
            fig, grid = new_subplots(1, 3, (9.0, 2.9))
            ax_loss, ax_acc, ax_lr = grid[0]
        else:
            if len(axes) != 3:
                raise argument_error("axes", "three Axes (loss, accuracy, learning rate)", axes)
            ax_loss, ax_acc, ax_lr = axes
            fig = ax_loss.get_figure()  # type: ignore[assignment]
        _curve(ax_loss, x, _column(epochs, "train_loss"), color=PALETTE[0], label=TRAIN_LABEL)
        _curve(ax_loss, x, _column(epochs, "test_loss"), color=PALETTE[1], label=TEST_LABEL)
        ax_loss.set_ylabel("loss")
        ax_loss.set_title("Loss")
        keys = [
            ("train_acc", TRAIN_LABEL, PALETTE[0], "-"),
            ("test_acc", TEST_LABEL, PALETTE[1], "-"),
        ]
        if show_top5:
            keys += [
                ("train_top5", "train top-5", PALETTE[0], "--"),
                ("test_top5", "test top-5", PALETTE[1], "--"),
            ]
        definitions = stats.get("definitions")
        for key, label, color, style in keys:
            stated = definitions.get(key) if isinstance(definitions, dict) else None
            _curve(
                ax_acc,
                x,
                _accuracy_in_percent(_column(epochs, key), "(%)" in str(stated or "")),
                color=color,
                linestyle=style,
                label=label,
            )
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_title("Top-1 accuracy" + (" and top-5" if show_top5 else ""))
        _curve(ax_lr, x, _column(epochs, "lr"), color=PALETTE[2], label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_title("Learning rate")
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.set_xlabel("epoch")
            if len(x) <= 12:
                ax.set_xticks(x)
        for ax in (ax_loss, ax_acc):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
        config = stats.get("config") if isinstance(stats.get("config"), dict) else {}
        if title is None and config:
            pieces = [
                config[k]
                for k in ("model", "dataset", "optimizer")
                if isinstance(config.get(k), str)
            ]
            title = " / ".join(pieces) if pieces else None
            definition = (stats.get("definitions") or {}).get("train_loss", "")
            if title and "augmented" in definition:
                title += " (training inputs augmented)"
        if title and axes is None:
            fig.suptitle(title, fontsize=10)
    if save_path is not None:
        save_figure(fig, save_path)
    return fig
