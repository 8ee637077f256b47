r"""One figure of every block's spectrum: the Hessian's block heterogeneity at a glance.

:func:`plot_block_spectra` draws the per-block spectra of
:func:`nets.compute_block_spectra` in two panels sharing one row per block:

* left, a ridge plot: each block's SLQ density smoothed with a Gaussian of width
  ``sigma`` in the symmetric logarithmic coordinate
  :math:`u = \operatorname{sign}(\lambda)\log_{10}(1 + |\lambda|/\tau)`
  (:func:`nets.workflow.block_spectra.symlog`; linear within :math:`\pm\tau`, one unit
  per decade beyond), each row scaled to its own peak, with a tick at its largest Ritz
  value; densities of blocks whose eigenvalues differ by orders of magnitude sit
  side by side on one axis;
* right, each block's largest Ritz value on a logarithmic axis, with its negative mass.

The title gives the heterogeneity statistics of
:meth:`nets.workflow.BlockSpectraResult.heterogeneity`: the decades between the
sharpest and the flattest block and the mean Jensen-Shannon distance between the
blocks' densities (Zhang et al. 2024).

>>> import numpy as np
>>> from nets.workflow.block_spectra import BlockSpectraResult, BlockSpectrum
>>> def block(label, top):
...     v = np.array([-0.1 * top, top]); w = np.array([0.2, 0.8])
...     return BlockSpectrum(label, 10, 2, 0, v, w, np.zeros(2), v[None], w[None], 10 * top, 0.0)
>>> res = BlockSpectraResult({b.label: b for b in (block("a", 1e-4), block("b", 3.0))},
...                          2, 1, "hessian", "train", "custom", "")
>>> fig = plot_block_spectra(res)
>>> [line.get_label() for line in fig.axes[0].lines if line.get_gid() == "density"]
['a', 'b']
>>> close_figure(fig)
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nets.plots._figure import PALETTE, close_figure, figure_style, new_subplots, save_figure
from nets.workflow.block_spectra import (
    BlockSpectraResult,
    load_block_spectra,
    symlog,
    symlog_scale,
)
from spectral.density import SpectralDensity
from spectral.errors import argument_error

__all__ = ["close_figure", "plot_block_spectra", "symlog_ticks"]

_CURVATURE_NAMES = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher"}


def _as_result(source: Any) -> BlockSpectraResult:
    if isinstance(source, BlockSpectraResult):
        return source
    if isinstance(source, str | os.PathLike):
        return load_block_spectra(source)
    raise argument_error(
        "source",
        "a per-block spectra file (compute_block_spectra's save_path) or a BlockSpectraResult",
        source,
        kind=TypeError,
    )


def symlog_ticks(
    lo: float, hi: float, scale: float, *, most: int = 9
) -> tuple[list[float], list[str]]:
    r"""Tick positions in the :func:`~nets.workflow.block_spectra.symlog` coordinate on
    ``[lo, hi]`` and their labels in eigenvalue units (0 and :math:`\pm 10^k`).

    Parameters
    ----------
    lo, hi : float
        The axis range in the symlog coordinate.
    scale : float
        :math:`\tau` of the coordinate.
    most : int
        At most this many ticks (every other decade, and so on, when there are more).

    Returns
    -------
    tuple
        ``(positions, labels)``.

    Examples
    --------
    >>> positions, labels = symlog_ticks(-1.5, 3.5, 1.0)
    >>> labels
    ['$-10^{1}$', '$0$', '$10^{1}$', '$10^{2}$', '$10^{3}$']
    """
    first = math.floor(math.log10(scale)) + 1
    last = first + int(max(abs(lo), abs(hi))) + 1
    decades = list(range(first, last + 1))
    values = [0.0] + [s * 10.0**k for k in decades for s in (-1.0, 1.0)]
    # 0 and the decades at least one unit from it (nearer ones would overprint 0's label)
    inside = sorted(
        v
        for v in values
        if lo <= float(symlog(v, scale)) <= hi and (v == 0 or abs(float(symlog(v, scale))) >= 1)
    )
    step = max(1, math.ceil(len(inside) / most))
    if step > 1:  # keep 0 and every step-th decade on each side
        inside = [v for v in inside if v == 0 or round(math.log10(abs(v)) - first) % step == 0]

    def label(v: float) -> str:
        if v == 0:
            return "$0$"
        return f"${'-' if v < 0 else ''}10^{{{round(math.log10(abs(v)))}}}$"

    return [float(symlog(v, scale)) for v in inside], [label(v) for v in inside]


def _role(label: str) -> str:
    """The role in a transformer block's label, ``'q'`` of ``'attn.q_proj (q, head 0)'``."""
    found = re.search(r"\(([^,)]*)[^)]*\)\s*$", label)
    return found.group(1) if found else ""


def _colours(labels: list[str]) -> list[str]:
    roles = [_role(label) for label in labels]
    if all(roles):  # a transformer partition: one colour per role
        order = list(dict.fromkeys(roles))
        return [PALETTE[order.index(r) % len(PALETTE)] for r in roles]
    return [PALETTE[i % len(PALETTE)] for i in range(len(labels))]


def _draw_ridges(
    ax: Axes, res: BlockSpectraResult, colours: list[str], sigma: float, scale: float
) -> None:
    """One smoothed density per row (row 0 at the top), each scaled to its own peak."""
    nodes = [symlog(b.values, scale) for b in res.blocks.values()]
    lo = min(float(u.min()) for u in nodes) - 4 * sigma
    hi = max(float(u.max()) for u in nodes) + 4 * sigma
    grid = np.linspace(lo, hi, 800)
    ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle="--", zorder=0)
    for row, (u, b, colour) in enumerate(zip(nodes, res.blocks.values(), colours)):
        rho = SpectralDensity(u, b.weights).smooth(grid, sigma)
        height = 0.85 * rho / max(float(rho.max()), 1e-300)
        base = -float(row)
        ax.fill_between(grid, base, base + height, color=colour, alpha=0.25, linewidth=0)
        ax.plot(grid, base + height, color=colour, linewidth=1.0, label=b.label, gid="density")
        ax.plot([float(symlog(b.top, scale))] * 2, [base, base + 0.85], color=colour,
                linewidth=1.6, gid="top")  # fmt: skip
    positions, labels = symlog_ticks(lo, hi, scale)
    ax.set_xticks(positions, labels)
    ax.set_xlim(lo, hi)
    ax.set_yticks([-float(i) for i in range(len(res.blocks))], list(res.blocks), fontsize=7)
    ax.set_ylim(-len(res.blocks) + 0.7, 1.0)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(rf"eigenvalue (symmetric log scale, linear within $\pm${scale:.2g})")


def _draw_tops(ax: Axes, res: BlockSpectraResult, colours: list[str]) -> None:
    """The largest Ritz value of each block (log axis) with the block's negative mass."""
    tops = np.array([b.top for b in res.blocks.values()])
    floor = float(tops[tops > 0].min()) * 0.1 if np.any(tops > 0) else 1e-12
    rows = -np.arange(len(tops), dtype=float)
    ax.barh(rows, np.maximum(tops, floor), height=0.6, color=colours, alpha=0.8)
    ax.set_xscale("log")
    for y, top, b in zip(rows, tops, res.blocks.values()):
        text = f"{top:.2g}" + (f", {b.negative_mass:.0%} < 0" if b.negative_mass > 0 else "")
        ax.text(max(top, floor), y, " " + text, va="center", fontsize=6.5)
    ax.set_xlim(floor, float(np.max(np.maximum(tops, floor))) * 300)
    ax.grid(axis="y", visible=False)
    ax.tick_params(axis="y", left=False, labelleft=False)
    ax.set_xlabel(r"largest Ritz value $\theta_{\max}$")


def _title(res: BlockSpectraResult, stats: dict[str, Any]) -> str:
    name = _CURVATURE_NAMES.get(res.curvature, res.curvature)
    model = res.config.get("model")
    what = f"{name} blocks ({res.partition})" + (f" of {model}" if model else "")
    spread = stats["top_spread"]
    parts = [f"top eigenvalues span {spread:.1f} decades"] if np.isfinite(spread) else []
    if len(res.blocks) > 1:
        parts.append(f"mean JS distance {stats['mean_js_distance']:.2f}")
    return what + ("\n" + "; ".join(parts) if parts else "")


def plot_block_spectra(
    source: Any,
    *,
    sigma: float = 0.1,
    scale: float | None = None,
    save_path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Every block's spectral density and top eigenvalue in one figure (module docstring).

    Parameters
    ----------
    source:
        A per-block spectra file (``compute_block_spectra(save_path=...)``, suffix
        optional) or a :class:`nets.workflow.BlockSpectraResult`.
    sigma:
        Width of the Gaussian smoothing, in decades of the symmetric log axis.
    scale:
        :math:`\\tau` of the axis, where it turns from linear to logarithmic (default:
        :func:`nets.workflow.block_spectra.symlog_scale` of the Ritz values).
    save_path:
        Write the figure there (PNG/PDF/SVG by suffix) atomically.
    title:
        Replaces the default title (curvature, partition, heterogeneity statistics).

    Returns
    -------
    matplotlib.figure.Figure
        Axes 0: the ridge plot (one line per block, labelled and ``gid="density"``);
        axes 1: one bar per block.

    Raises
    ------
    ValueError, TypeError
        An unreadable source or a non-positive ``sigma``/``scale``;
        ``FileNotFoundError`` for a missing file.

    Examples
    --------
    >>> from nets import compute_block_spectra, get_model
    >>> model = get_model("MLP", 10, 1, 8, hidden=(8,), seed=0)
    >>> res = compute_block_spectra("digits", model=model, lanczos_iters=4, subsample=32)
    >>> fig = plot_block_spectra(res)
    >>> len(fig.axes[1].patches)
    2
    >>> close_figure(fig)
    """
    res = _as_result(source)
    for name, value in (("sigma", sigma), ("scale", scale)):
        if value is not None and not (isinstance(value, int | float) and 0 < value < math.inf):
            raise argument_error(name, "a positive finite number", value)
    tau = symlog_scale([b.values for b in res.blocks.values()]) if scale is None else float(scale)
    stats = res.heterogeneity(sigma=sigma, scale=tau)
    colours = _colours(list(res.blocks))
    with figure_style():
        height = 0.3 * len(res.blocks) + 1.6
        fig, axes = new_subplots(1, 2, (10.0, height), width_ratios=(3.0, 1.3), sharey=True)
        _draw_ridges(axes[0, 0], res, colours, sigma, tau)
        _draw_tops(axes[0, 1], res, colours)
        fig.suptitle(title if title is not None else _title(res, stats))
    if save_path is not None:
        save_figure(fig, save_path)
    return fig
