"""Shared figure plumbing for :mod:`nets.plots`: one style, figure creation, atomic saving.

Figures are created through :mod:`matplotlib.pyplot` so that ``plt.show()``
after a plotting call (the paper's usage) displays them; nothing here ever
calls ``plt.show()``. Saving goes through :func:`spectral.io.atomic_write`, so a
crash never leaves a truncated image behind.

>>> import tempfile, os
>>> fig, ax = new_figure((3, 2))
>>> _ = ax.plot([0, 1], [0, 1])
>>> path = os.path.join(tempfile.mkdtemp(), "line.png")
>>> save_figure(fig, path)
>>> os.path.getsize(path) > 0
True
>>> close_figure(fig)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from spectral.errors import argument_error
from spectral.io import atomic_write

__all__ = [
    "PALETTE",
    "STYLE",
    "close_figure",
    "figure_style",
    "new_figure",
    "new_subplots",
    "save_figure",
]

#: A colour-blind-safe palette (Okabe & Ito), in the order the plots use it.
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)

#: rcParams applied while a figure is built: sizes suited to a paper column.
STYLE: dict[str, Any] = {
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "legend.fontsize": 8.0,
    "legend.frameon": False,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.5,
    "axes.linewidth": 0.8,
    "figure.dpi": 100.0,
    "savefig.dpi": 200.0,
    "mathtext.fontset": "dejavusans",
    "axes.prop_cycle": plt.cycler(color=list(PALETTE)),
}

_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".eps": "eps", ".jpg": "jpg"}


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """Apply :data:`STYLE` for the duration of the block (fonts are fixed when artists are made)."""
    with plt.rc_context(cast(Any, STYLE)):
        yield


def new_figure(figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """A pyplot figure with one Axes, in :data:`STYLE` and a constrained layout."""
    with figure_style():
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def new_subplots(
    nrows: int, ncols: int, figsize: tuple[float, float], **kwargs: Any
) -> tuple[Figure, Any]:
    """A pyplot figure with an ``nrows x ncols`` array of Axes (always a 2-D array)."""
    with figure_style():
        fig, axes = plt.subplots(
            nrows, ncols, figsize=figsize, layout="constrained", squeeze=False, **kwargs
        )
    return fig, axes


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: float | None = None) -> None:
    """Write ``fig`` to ``path`` atomically; the suffix picks the format (png, pdf, svg, eps, jpg).

    Raises
    ------
    ValueError
        If the suffix is not one of the supported formats.
    """
    target = Path(path)
    fmt = _FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise argument_error(
            "save_path", f"a file name ending in one of {sorted(_FORMATS)}", str(path)
        )
    with figure_style(), atomic_write(target, "wb") as handle:
        fig.savefig(handle, format=fmt, dpi=dpi if dpi is not None else STYLE["savefig.dpi"])


def close_figure(fig: Figure) -> None:
    """Release ``fig`` from pyplot's registry (figures made here are registered there)."""
    plt.close(fig)
