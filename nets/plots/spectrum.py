"""Stem plot of a Lanczos spectrum (Ritz values against their weights), as in the paper's Table 2.

The Ritz values :math:`\\theta_i` and weights :math:`w_i` (squared first
components of the Ritz vectors, :math:`\\sum_i w_i = 1`) form a discrete measure
whose moments match those of the spectral density :math:`\\frac1P\\sum_j
\\delta(\\lambda - \\lambda_j)` of the P x P curvature matrix. The text box
reports

* the top Ritz value :math:`\\theta_{\\max}` (a lower bound on :math:`\\lambda_{\\max}`),
* the trace estimate :math:`\\operatorname{Tr} \\approx P \\sum_i w_i \\theta_i`,
* the negative spectral mass :math:`\\sum_{\\theta_i < 0} w_i`,
* the condition number of the positive part,
  :math:`\\theta_{\\max} / \\min_{\\theta_i > 0} \\theta_i`.

>>> import numpy as np
>>> fig = plot_spectrum("lanczos", {"w": np.array([-0.1, 0.5, 3.0]),
...                                 "gammas": np.array([0.2, 0.7, 0.1]), "num_params": 100})
>>> spectrum_summary({"w": np.array([-0.1, 0.5, 3.0]), "gammas": np.array([0.2, 0.7, 0.1]),
...                   "num_params": 100})["trace"]
63.0
>>> close_figure(fig)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, cast

import numpy as np
from matplotlib.axes import Axes
from matplotlib.container import StemContainer
from matplotlib.figure import Figure

from nets.plots._figure import (
    PALETTE,
    close_figure,
    figure_style,
    new_figure,
    new_subplots,
    save_figure,
)
from nets.plots._sources import Spectrum, as_diagonal, as_spectrum, resolve_file
from spectral.density import SpectralDensity
from spectral.errors import argument_error
from spectral.io import load_npz
from spectral.plot import plot_ritz_stem

__all__ = [
    "close_figure",
    "curvature_name",
    "halfline_density",
    "is_psd",
    "plot_spectrum",
    "source_label",
    "spectrum_summary",
    "stem_spectrum",
]

_KINDS = ("lanczos", "diag")
_CURVATURE_NAMES = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher"}


def spectrum_summary(source: Any) -> dict[str, Any]:
    """The numbers the spectrum plot reports, as a dict (also used by the CLI's summary table).

    Keys: ``top`` (largest Ritz value), ``bottom`` (smallest), ``trace`` (P * sum(w theta),
    ``None`` if P is unknown), ``normalised_trace`` (sum(w theta)), ``negative_mass``,
    ``positive_condition``, ``num_params``, ``num_ritz``, ``curvature``, ``config`` (the file's
    ``config_json``: BatchNorm mode, subsample, checkpoint...).
    """
    s = as_spectrum(source)
    return {
        "curvature": s.curvature,
        "num_params": s.num_params,
        "num_ritz": int(s.values.size),
        "top": s.top,
        "bottom": float(np.min(s.values)),
        "trace": s.trace,
        "normalised_trace": s.normalised_trace,
        "negative_mass": s.negative_mass,
        "positive_condition": s.positive_condition,
        "config": dict(s.config),
    }


def _fmt(x: float | None) -> str:
    """A number for mathtext: ``3.142``, ``1.39 \\times 10^{5}``, ``n/a``."""
    if x is None or not np.isfinite(x):
        return r"\mathrm{n/a}"
    text = f"{x:.4g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return rf"{mantissa} \times 10^{{{int(exponent)}}}"


def _stats_text(s: Spectrum) -> str:
    trace_line = (
        rf"$\mathrm{{Tr}} \approx P\,\sum w_i\theta_i = {_fmt(s.trace)}$"
        if s.trace is not None
        else rf"$\sum w_i\theta_i = \mathrm{{Tr}}/P = {_fmt(s.normalised_trace)}$"
    )
    negatives = int(np.sum(s.values < 0))
    return "\n".join(
        [
            rf"$\theta_{{\max}} = {_fmt(s.top)}$",
            trace_line,
            f"negative mass = {s.negative_mass:.3g} ({negatives} of {s.values.size} Ritz values)",
            rf"$\kappa_+ = \theta_{{\max}} / \theta^+_{{\min}} = {_fmt(s.positive_condition)}$",
        ]
    )


def _density(s: Spectrum) -> SpectralDensity:
    return SpectralDensity(s.values, s.weights)


def stem_spectrum(
    ax: Axes,
    spectrum: Any,
    *,
    log_weights: bool = False,
    color: str = PALETTE[0],
    label: str | None = None,
    marker: str = "o",
    bottom: float | None = None,
) -> StemContainer:
    """Draw the stems of ``spectrum`` on ``ax`` and return the ``StemContainer``.

    Drawn by :func:`spectral.plot.plot_ritz_stem` (zero weights are dropped on a log
    axis), then styled for print: small markers, thin stems, the given colour and marker.
    ``bottom`` moves the foot of every stem (e.g. to a log axis' lower limit shared with
    other artists).
    """
    plot_ritz_stem(_density(as_spectrum(spectrum)), ax, log_weights=log_weights, label=label)
    stems = cast(StemContainer, ax.containers[-1])
    stems.markerline.set(color=color, marker=marker, markersize=4.0, zorder=3)
    stems.stemlines.set(color=color, linewidth=1.2, alpha=0.9)
    if bottom is not None:
        stems.stemlines.set_segments(
            [
                [(seg[0][0], bottom), (seg[-1][0], seg[-1][1])]
                for seg in stems.stemlines.get_segments()
            ]
        )
    return stems


def is_psd(curvature: str | None) -> bool:
    """Whether a curvature kind is positive semi-definite (GGN, Fisher), so has no mass below 0.

    The kind's words (split at ``-``, ``_``, spaces) are matched, not substrings: a label
    such as ``"hessian-before"`` is not the empirical Fisher ``"ef"``.

    >>> is_psd("ggn"), is_psd("fisher"), is_psd("hessian"), is_psd(None)
    (True, True, False, False)
    >>> is_psd("ggn-lanczos"), is_psd("ef"), is_psd("hessian-before"), is_psd("default")
    (True, True, False, False)
    """
    words = re.split(r"[-_\s]+", (curvature or "").lower())
    return any(
        w in ("ggn", "gauss", "gauss-newton", "fisher", "ef", "kfac", "ekfac") for w in words
    )


def halfline_density(
    values: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float
) -> np.ndarray:
    r"""The smoothed density of a measure on :math:`[0, \infty)`, by a Gaussian reflected at 0.

    .. math::

        \rho_\sigma(x) = \sum_i w_i \bigl[\varphi_\sigma(x - \theta_i^+)
        + \varphi_\sigma(x + \theta_i^+)\bigr] \quad (x \ge 0), \qquad
        \rho_\sigma(x) = 0 \quad (x < 0),

    with :math:`\theta_i^+ = \max(\theta_i, 0)` (a PSD operator's Ritz values are
    non-negative up to rounding) and :math:`\varphi_\sigma` the centred normal
    density. Reflection keeps the total mass :math:`\sum_i w_i` on the half-line, puts
    none below 0 (where a plain Gaussian kernel would spread the mass of the Ritz
    values near 0), and equals the plain Gaussian smoothing at distances of a few
    :math:`\sigma` from 0.

    >>> grid = np.linspace(0.0, 30.0, 30001)
    >>> rho = halfline_density(np.array([0.0, 2.0]), np.array([0.5, 0.5]), grid, 0.5)
    >>> round(float(np.trapezoid(rho, grid)), 6)
    1.0
    >>> float(halfline_density(np.array([0.0]), np.array([1.0]), np.array([-0.1]), 0.5)[0])
    0.0
    """
    theta = np.maximum(np.asarray(values, dtype=np.float64), 0.0)[:, None]
    x = np.asarray(grid, dtype=np.float64)[None, :]
    norm = 1.0 / (sigma * np.sqrt(2.0 * np.pi))
    kernel = np.exp(-0.5 * ((x - theta) / sigma) ** 2) + np.exp(-0.5 * ((x + theta) / sigma) ** 2)
    rho = norm * np.asarray(weights, dtype=np.float64) @ kernel
    return np.where(x[0] >= 0.0, rho, 0.0)


def _smoothed(s: Spectrum, sigma: float) -> tuple[np.ndarray, np.ndarray, str]:
    """Grid, smoothed density and the kernel's description for the spectrum panel."""
    low, high = float(s.values.min()), float(s.values.max())
    if is_psd(s.curvature):
        grid = np.linspace(0.0, max(high, 0.0) + 5.0 * sigma, 800)
        return grid, halfline_density(s.values, s.weights, grid, sigma), "Gaussian reflected at 0"
    grid = np.linspace(low - 5.0 * sigma, high + 5.0 * sigma, 800)
    return grid, _density(s).smooth(grid, sigma, "gaussian"), "Gaussian"


def _smooth_sigma(s: Spectrum, smooth: float | bool) -> float:
    span = float(s.values.max() - s.values.min())
    scale = max(span, abs(s.top), 1e-12)
    sigma = float(smooth) if not isinstance(smooth, bool) else 0.02 * scale
    if not (np.isfinite(sigma) and sigma > 0):
        raise argument_error("smooth", "True or a positive kernel width sigma", smooth)
    return sigma


def curvature_name(s: Spectrum) -> str:
    """``'Hessian'``, ``'GGN'``, ``'Fisher'`` or the stored kind."""
    return _CURVATURE_NAMES.get((s.curvature or "").lower(), s.curvature or "Curvature")


def source_label(config: dict[str, Any]) -> str | None:
    """``'SmallCNN, checkpoint-00010.pt (epoch 10)'`` from a file's config, if it says."""
    parts = []
    if config.get("model"):
        parts.append(str(config["model"]))
    if config.get("checkpoint"):
        checkpoint = os.path.basename(str(config["checkpoint"]))
        epoch = config.get("epoch")
        parts.append(checkpoint + (f" (epoch {epoch})" if epoch is not None else ""))
    return ", ".join(parts) or None


def _title(s: Spectrum) -> str:
    m = s.values.size if s.lanczos_iters is None else s.lanczos_iters
    parts = [f"Lanczos, m = {m}"]
    if s.num_probes is not None and s.num_probes > 1:
        parts.append(f"{s.num_probes} probes")
    if s.num_params is not None:
        parts.append(f"P = {s.num_params:,}")
    head = f"{curvature_name(s)} spectrum ({', '.join(parts)})"
    where = source_label(s.config)
    return head if where is None else f"{head}\n{where}"


def _plot_diag(source: Any, ax: Axes, *, log_weights: bool, color: str) -> None:
    diagonal = as_diagonal(source, name="path")
    ax.hist(
        diagonal,
        bins=min(60, max(10, int(np.sqrt(diagonal.size)))),
        density=True,
        color=color,
        alpha=0.6,
        edgecolor="white",
        linewidth=0.4,
        label=f"diagonal ({diagonal.size:,} entries)",
    )
    if log_weights:
        ax.set_yscale("log")
    ax.set_xlabel(r"diagonal entry")
    ax.set_ylabel("density (histogram area = 1)")
    ax.set_title(_diag_title(source))
    ax.legend(loc="upper right")


def _diag_title(source: Any) -> str:
    """``'Histogram of the GGN diagonal (MC)'`` plus the model and checkpoint a file records."""
    config: dict[str, Any] = {}
    if isinstance(source, str | os.PathLike):
        arrays = load_npz(resolve_file(source, name="path"))
        if "config_json" in arrays:
            loaded = json.loads(str(arrays["config_json"]))
            config = loaded if isinstance(loaded, dict) else {}
    method = {"mc": "MC", "exact": "exact"}.get(str(config.get("method", "")).lower())
    head = "Histogram of the GGN diagonal" if config else "Histogram of the curvature diagonal"
    head += f" ({method})" if method else ""
    where = source_label(config)
    return head if where is None else f"{head}\n{where}"


def plot_spectrum(
    kind_or_path: Any,
    path: Any = None,
    *,
    log_weights: bool = True,
    smooth: float | bool | None = None,
    ax: Axes | None = None,
    save_path: str | os.PathLike[str] | None = None,
    show_stats: bool = True,
    title: str | None = None,
    color: str = PALETTE[0],
    label: str | None = None,
) -> Figure:
    """Stem plot of Ritz values against their weights, with the spectrum's key numbers.

    Parameters
    ----------
    kind_or_path:
        ``"lanczos"`` (the paper's form ``plot_spectrum('lanczos', path=...)``), ``"diag"``
        (histogram of a curvature diagonal given by ``path``), or directly the spectrum: a
        ``.npz`` path (suffix optional), a mapping with ``w``/``gammas``, a
        ``SpectralDensity`` or a ``(values, weights)`` pair.
    path:
        The spectrum (or diagonal) when ``kind_or_path`` names the kind.
    log_weights:
        Logarithmic weight axis (default): outlier Ritz values carry weights around 1/P,
        which a linear axis hides next to the bulk's weight near 0. ``False``: linear.
    smooth:
        ``True`` or a kernel width sigma: also draw the smoothed density in a second
        panel under the stems (its unit is a density, not a weight): the Gaussian
        :math:`\\sum_i w_i\\,\\mathcal N(\\lambda; \\theta_i, \\sigma^2)` for the Hessian,
        and for a positive semi-definite kind (GGN, Fisher) the Gaussian reflected at 0
        (:func:`halfline_density`), which puts no mass below 0. Not with ``ax``.
    ax:
        Draw into this Axes instead of a new figure.
    save_path:
        Write the figure there (PNG/PDF/SVG by suffix) atomically.
    show_stats:
        Draw the text box (top value, trace, negative mass, positive condition number).

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the plot (never shown; call ``plt.show()`` yourself).

    Raises
    ------
    ValueError, TypeError
        For an unknown kind or an unreadable spectrum; ``FileNotFoundError`` for a missing file.

    Examples
    --------
    >>> import os, tempfile
    >>> from nets import build_loss_landscape, compute_eigenspectrum, get_model
    >>> out = tempfile.mkdtemp()
    >>> model = get_model("MLP", 10, 1, 8, hidden=(16,), seed=0)   # any nn.Module, or a name
    >>> _ = compute_eigenspectrum("digits", model=model, lanczos_iters=5,
    ...                           save_spectrum_path=os.path.join(out, "spectrum"))
    >>> fig = plot_spectrum("lanczos", path=os.path.join(out, "spectrum.npz"), log_weights=True)
    >>> type(fig).__name__
    'Figure'
    """
    kind, source = _kind_and_source(kind_or_path, path)
    smoothing = smooth is not None and smooth is not False
    with figure_style():
        fig, ax, density_ax = _spectrum_axes(ax, kind, smoothing, smooth)
        if kind == "diag":
            _plot_diag(source, ax, log_weights=log_weights, color=color)
        else:
            s = as_spectrum(source, name="path")
            ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle="--", zorder=0)
            stem_spectrum(
                ax,
                s,
                log_weights=log_weights,
                color=color,
                label=label or "Ritz values",
            )
            ax.set_xlabel(r"eigenvalue $\lambda$ (Ritz value $\theta_i$)")
            ax.set_ylabel(r"weight $w_i$ ($\Sigma_i\, w_i = 1$)")
            ax.set_title(title if title is not None else _title(s))
            if density_ax is not None:
                ax.set_xlabel("")
                _draw_smoothed(density_ax, s, True if smooth is None else smooth)
            if show_stats:
                _draw_stats_box(ax, s)
            if label is not None:
                ax.legend(loc="center right" if show_stats else "best")
            _weight_limits(ax, s, log_weights)
    if save_path is not None:
        save_figure(fig, save_path)
    return fig


def _kind_and_source(kind_or_path: Any, path: Any) -> tuple[str, Any]:
    """``(kind, spectrum source)`` from :func:`plot_spectrum`'s first two arguments."""
    if isinstance(kind_or_path, str) and kind_or_path.lower() in _KINDS:
        kind = kind_or_path.lower()
        if path is None:
            raise argument_error(
                "path", f"the spectrum to plot when the kind is given ({kind!r})", None
            )
        return kind, path
    if path is not None:
        raise argument_error("kind_or_path", f"one of {_KINDS} when 'path' is given", kind_or_path)
    return "lanczos", kind_or_path


def _spectrum_axes(
    ax: Axes | None, kind: str, smoothing: bool, smooth: Any
) -> tuple[Figure, Axes, Axes | None]:
    """``(figure, stem axes, density axes or None)``: new panels, or the caller's ``ax``.

    A smoothed Lanczos spectrum gets a second panel under the stems; with a given
    ``ax`` there is no room for it, so ``smooth`` is refused there.
    """
    if ax is None and kind == "lanczos" and smoothing:
        fig, axes = new_subplots(2, 1, (5.2, 5.2), sharex=True)
        return fig, axes[0, 0], axes[1, 0]
    if ax is None:
        fig, ax = new_figure((5.2, 3.3))
        return fig, ax, None
    if smoothing and kind == "lanczos":
        raise argument_error(
            "smooth",
            "None when 'ax' is given (the smoothed density is drawn in a panel "
            "of its own, under the stems)",
            smooth,
        )
    return ax.get_figure(), ax, None  # type: ignore[return-value]


def _draw_smoothed(density_ax: Axes, s: Spectrum, smooth: float | bool) -> None:
    """The smoothed density of ``s`` (kernel width from ``smooth``) in ``density_ax``."""
    sigma = _smooth_sigma(s, smooth)
    grid, density, kernel = _smoothed(s, sigma)
    density_ax.plot(
        grid,
        density,
        color=PALETTE[1],
        linewidth=1.3,
        label=rf"smoothed density ({kernel}, $\sigma$ = {sigma:.2g})",
    )
    density_ax.fill_between(grid, density, color=PALETTE[1], alpha=0.12, linewidth=0)
    density_ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle="--", zorder=0)
    density_ax.set_ylabel("density (area = 1)")
    density_ax.set_xlabel(r"eigenvalue $\lambda$")
    density_ax.set_ylim(bottom=0.0, top=float(density.max()) * 1.2)
    density_ax.legend(loc="upper right")


def _draw_stats_box(ax: Axes, s: Spectrum) -> None:
    """The text box of the spectrum's key numbers, top right of ``ax``."""
    ax.text(
        0.98,
        0.97,
        _stats_text(s),
        transform=ax.transAxes,
        ha="right",
        va="top",
        multialignment="left",
        fontsize=7.5,
        zorder=5,
        bbox={
            "boxstyle": "round,pad=0.4",
            "facecolor": "white",
            "edgecolor": "0.7",
            "alpha": 0.92,
        },
    )


def _weight_limits(ax: Axes, s: Spectrum, log_weights: bool) -> None:
    """Weight-axis limits: from half the smallest positive weight (log) or 0 to above the peak."""
    peak = max(float(s.weights.max()), 1e-300)
    if log_weights:
        positive = s.weights[s.weights > 0]
        floor = float(positive.min()) / 2.0 if positive.size else 1e-16
        ax.set_ylim(bottom=floor, top=peak * 4.0)
    else:
        ax.set_ylim(bottom=0.0, top=peak * 1.35)
