r"""A curvature spectrum read as "bulk plus outliers": the certified density and its bulk fit.

:func:`spectrum_density` turns a spectrum file (or :class:`~nets.workflow.spectrum.SpectrumResult`)
into a :class:`spectral.SpectralDensity` that knows it is a Gauss quadrature of ``K``
Rademacher probes of a ``P x P`` operator, so that :meth:`~spectral.SpectralDensity.cdf_bounds`
and :meth:`~spectral.SpectralDensity.cdf_band` apply. The file does not record the model's
dtype nor which probes stopped early, so the node accuracy is taken for float32
(:math:`\delta_k = 8(m_k + \sqrt P)\,\varepsilon_{32}\max|\theta|`, conservative for float64)
and every probe is treated as not invariant (valid, only less tight).

:func:`bulk_summary` fits a random-matrix law to that density (:mod:`spectral.rmt`: moments
of the quadrature, exact per probe) and lists the Ritz values beyond its edges by more than
four Tracy–Widom scales plus the probe fluctuation of the fitted edges, with their Ritz
residuals. The arrays it returns are stored in the spectrum file:

=======================  ==============================================================
key                      content
=======================  ==============================================================
``bulk_law``             str ``'marchenko-pastur'`` or ``'semicircle'``
``bulk_parameters``      float64[2] ``(ratio, variance)`` or ``(radius, center)``
``bulk_support``         float64[2] the bulk edges
``bulk_wasserstein``     float64 W1 distance between the kept density and the law
``bulk_kolmogorov``      float64 Kolmogorov distance
``bulk_mass``            float64 mass of the density kept in the bulk
``outlier_values``       float64[k] Ritz values beyond the edges
``outlier_residuals``    float64[k] their Ritz residual norms
``outlier_scales``       float64[k] their distance to the edge in Tracy–Widom scales
=======================  ==============================================================

>>> import numpy as np
>>> from spectral import synthetic
>>> lam = np.linalg.eigvalsh(synthetic.spiked_wigner(400, [5.0], seed=0))
>>> arrays = {"w": lam, "gammas": np.full(400, 1 / 400), "num_params": 400}
>>> summary = bulk_summary(arrays, "semicircle")
>>> str(summary["bulk_law"]), summary["outlier_values"].round(1).tolist()
('semicircle', [5.2])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from spectral import rmt
from spectral.density import SpectralDensity
from spectral.errors import argument_error

__all__ = [
    "DENSITY_KEYS",
    "LAWS",
    "bulk_fit",
    "bulk_rows",
    "bulk_summary",
    "missing_density_keys",
    "spectrum_density",
]

#: Accepted names of the bulk laws, and the canonical name stored in the file.
LAWS = {
    "mp": "marchenko-pastur",
    "marchenko-pastur": "marchenko-pastur",
    "marchenko_pastur": "marchenko-pastur",
    "semicircle": "semicircle",
    "wigner": "semicircle",
}
_EPS32 = float(np.finfo(np.float32).eps)


def _arrays(source: Any) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    if hasattr(source, "to_arrays"):
        arrays: Mapping[str, Any] = source.to_arrays()
        return arrays
    raise argument_error(
        "source", "a spectrum file's arrays or a SpectrumResult", source, kind=TypeError
    )


#: The keys of a spectrum file that :func:`spectrum_density` reads.
DENSITY_KEYS = ("w", "gammas", "num_params")


def missing_density_keys(arrays: Mapping[str, Any]) -> list[str]:
    """The :data:`DENSITY_KEYS` that ``arrays`` lacks.

    >>> missing_density_keys({"w": 1, "gammas": 2})
    ['num_params']
    """
    return [key for key in DENSITY_KEYS if key not in arrays]


def spectrum_density(source: Any) -> SpectralDensity:
    """The quadrature density of a spectrum (file arrays or a ``SpectrumResult``).

    >>> import numpy as np
    >>> d = spectrum_density({"w": np.array([0.0, 1.0]), "gammas": np.array([0.5, 0.5]),
    ...                       "num_params": 10})
    >>> d.source, d.dimension, d.probe_kind
    ('quadrature', 10, 'rademacher')
    """
    arrays = _arrays(source)
    missing = missing_density_keys(arrays)
    if missing:
        raise argument_error(
            "source",
            f"a spectrum's arrays with {', '.join(map(repr, DENSITY_KEYS))}",
            f"arrays without {', '.join(map(repr, missing))}",
        )
    values = np.asarray(arrays["w"], dtype=np.float64)
    weights = np.asarray(arrays["gammas"], dtype=np.float64)
    n = int(np.asarray(arrays["num_params"]).item())
    nodes = np.asarray(arrays.get("probe_nodes", values[None]), dtype=np.float64)
    probe_weights = np.asarray(arrays.get("probe_weights", weights[None]), dtype=np.float64)
    counts = np.sum(~np.isnan(nodes), axis=1)
    scale = np.nanmax(np.abs(nodes), axis=1)
    tolerance = 8.0 * (counts + np.sqrt(n)) * _EPS32 * scale
    return SpectralDensity(
        values,
        weights,
        nodes,
        probe_weights,
        source="quadrature",
        dimension=n,
        probe_kind="rademacher",
        probe_tolerance=tolerance,
    )


def bulk_summary(source: Any, law: str, *, num_scales: float = 4.0) -> dict[str, Any]:
    """Fit ``law`` (``'mp'``/``'marchenko-pastur'`` or ``'semicircle'``) and find the outliers.

    Returns the ``bulk_*``/``outlier_*`` arrays of the module docstring.

    Raises
    ------
    ValueError
        Unknown ``law``, or a spectrum no such law fits (e.g. a Marchenko–Pastur fit of a
        spectrum with non-positive mean).
    """
    if law not in LAWS:
        raise argument_error("law", f"one of {tuple(LAWS)}", law)
    name = LAWS[law]
    arrays = _arrays(source)
    density = spectrum_density(arrays)
    fit: rmt.MarchenkoPasturFit | rmt.SemicircleFit
    if name == "marchenko-pastur":
        fit = rmt.fit_marchenko_pastur(density, num_scales=num_scales)
        parameters = [fit.ratio, fit.variance]
    else:
        fit = rmt.fit_semicircle(density, num_scales=num_scales)
        parameters = [fit.radius, fit.center]
    values = np.asarray(arrays["w"], dtype=np.float64)
    residuals = np.asarray(arrays.get("residuals", np.full(values.shape, np.nan)), np.float64)
    assert density.dimension is not None
    found = rmt.outliers(
        values,
        fit,
        num_scales=num_scales,
        residuals=residuals,
        margin=rmt.probe_margin(fit, density.dimension, density.num_probes),
    )
    keep = one_per_eigenvalue(found, residuals, probe_of_values(values, arrays), density)
    return {
        "bulk_law": np.str_(name),
        "bulk_parameters": np.asarray(parameters, dtype=np.float64),
        "bulk_support": np.asarray(fit.support, dtype=np.float64),
        "bulk_wasserstein": np.float64(fit.wasserstein),
        "bulk_kolmogorov": np.float64(fit.kolmogorov),
        "bulk_mass": np.float64(fit.bulk_mass),
        "outlier_values": found.values[keep],
        "outlier_residuals": residuals[found.indices[keep]],
        "outlier_scales": found.scales[keep],
    }


def probe_of_values(values: np.ndarray, arrays: Mapping[str, Any]) -> np.ndarray:
    """The probe of each pooled Ritz value ``values[i]`` (a spectrum's ``w``), found by
    matching it to ``probe_nodes`` (the same float64 numbers, one row per probe); all 0
    (one probe) when the arrays have no ``probe_nodes`` or they do not match ``w``.

    >>> probe_of_values(np.array([1.0, 2.0, 1.0]), {"probe_nodes": np.array([[1.0, 2.0],
    ...                                                                         [1.0, np.nan]])})
    array([0, 0, 1])
    """
    probes = np.zeros(values.size, dtype=np.int64)
    if "probe_nodes" not in arrays:
        return probes
    free: dict[float, list[int]] = {}
    for i, v in enumerate(values.tolist()):
        free.setdefault(v, []).append(i)
    for row, nodes in enumerate(np.asarray(arrays["probe_nodes"], dtype=np.float64)):
        for v in nodes[~np.isnan(nodes)].tolist():
            if not free.get(v):
                return np.zeros(values.size, dtype=np.int64)
            probes[free[v].pop(0)] = row
    return probes


def one_per_eigenvalue(
    found: rmt.Outliers, residuals: np.ndarray, probes: np.ndarray, density: SpectralDensity
) -> np.ndarray:
    r"""Positions in ``found`` of the outliers to report: one per eigenvalue.

    Every probe's Lanczos run finds the same outlying eigenvalues, so the pooled Ritz values
    of ``P`` probes list each ``P`` times.  Ritz values of *different* probes are taken for
    the same eigenvalue when their intervals overlap: :math:`|	heta_a - 	heta_b| \le r_a
    + r_b + \delta` (each :math:`[	heta - r, 	heta + r]` holds an eigenvalue; ``r`` the
    Ritz residual, 0 when unknown, :math:`\delta` the node accuracy of ``density``); of
    those the one with the smallest residual is kept.  Values of one probe are distinct
    Ritz values and are all kept.  Returned in ascending order of value.
    """
    idx = found.indices
    res = np.nan_to_num(residuals[idx], nan=0.0)
    tol = density.probe_tolerance
    delta = float(np.max(tol)) if tol is not None and tol.size else 0.0
    kept: list[int] = []
    for j in np.argsort(res, kind="stable").tolist():
        same = any(
            probes[idx[k]] != probes[idx[j]]
            and abs(found.values[k] - found.values[j]) <= res[k] + res[j] + delta
            for k in kept
        )
        if not same:
            kept.append(j)
    return np.sort(np.asarray(kept, dtype=np.int64))


def bulk_fit(arrays: Mapping[str, Any]) -> rmt.MarchenkoPasturFit | rmt.SemicircleFit | None:
    """The fitted law stored in a spectrum file's arrays, or ``None`` when there is none."""
    if "bulk_law" not in arrays:
        return None
    law = str(np.asarray(arrays["bulk_law"]).item())
    a, b = (float(v) for v in np.asarray(arrays["bulk_parameters"]))
    n = int(np.asarray(arrays["num_params"]).item()) if "num_params" in arrays else None
    if law == "marchenko-pastur":
        fit: Any = rmt.MarchenkoPasturFit.from_parameters(a, b, n)
    else:
        fit = rmt.SemicircleFit.from_parameters(a, b, n)
    out: rmt.MarchenkoPasturFit | rmt.SemicircleFit = replace(
        fit, wasserstein=float(np.asarray(arrays["bulk_wasserstein"]).item())
    )
    return out


def bulk_rows(arrays: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Summary-table rows of a stored bulk fit (empty when the file has none).

    >>> import numpy as np
    >>> rows = bulk_rows({"bulk_law": np.str_("semicircle"), "bulk_parameters": [2.0, 0.0],
    ...     "bulk_support": [-2.0, 2.0], "bulk_wasserstein": 0.01, "bulk_kolmogorov": 0.02,
    ...     "bulk_mass": 1.0, "outlier_values": [5.2], "outlier_residuals": [1e-9],
    ...     "outlier_scales": [300.0]})
    >>> rows[0], rows[-1]
    (('bulk law', 'semicircle (radius 2, center 0)'), ('outliers', '5.2 (res 1e-09)'))
    """
    if "bulk_law" not in arrays:
        return []
    law = str(np.asarray(arrays["bulk_law"]).item())
    p0, p1 = (float(v) for v in np.asarray(arrays["bulk_parameters"]))
    names = ("ratio", "variance") if law == "marchenko-pastur" else ("radius", "center")
    lo, hi = (float(v) for v in np.asarray(arrays["bulk_support"]))
    values = np.asarray(arrays["outlier_values"], dtype=np.float64).reshape(-1)
    residuals = np.asarray(arrays["outlier_residuals"], dtype=np.float64).reshape(-1)
    listed = ", ".join(f"{v:.4g} (res {r:.2g})" for v, r in zip(values[::-1], residuals[::-1]))
    return [
        ("bulk law", f"{law} ({names[0]} {p0:.4g}, {names[1]} {p1:.4g})"),
        ("bulk edges", f"[{lo:.4g}, {hi:.4g}]"),
        (
            "bulk W1 / Kolmogorov",
            f"{float(np.asarray(arrays['bulk_wasserstein'])):.3g} / "
            f"{float(np.asarray(arrays['bulk_kolmogorov'])):.3g}",
        ),
        ("bulk mass", f"{float(np.asarray(arrays['bulk_mass'])):.4g}"),
        ("outliers", listed if values.size else "none"),
    ]
