"""What the plots draw: spectrum, diagonal, landscape and training files or in-memory objects.

The file formats are those of ``nets.workflow`` (see the team's API document):
a spectrum ``.npz`` holds ``w``/``eigvals`` (Ritz values), ``gammas`` (their
weights, summing to one) and ``num_params``; a landscape ``.npz`` holds ``t``,
``direction_names`` and ``train_loss``/``test_loss``/... of shape
``[d, n_points]``; training statistics are ``<dir>/stats.json``.

>>> import numpy as np
>>> s = as_spectrum({"w": np.array([-1.0, 2.0]), "gammas": np.array([0.25, 0.75]),
...                  "num_params": 10})
>>> s.values.tolist(), s.weights.tolist(), s.num_params
([-1.0, 2.0], [0.25, 0.75], 10)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectral.errors import argument_error
from spectral.io import CorruptFileError, load_npz

__all__ = [
    "Spectrum",
    "as_array",
    "as_diagonal",
    "as_spectrum",
    "load_landscape",
    "load_training_stats",
    "resolve_file",
]

PathLike = str | os.PathLike[str]


def resolve_file(path: PathLike, suffix: str = ".npz", *, name: str = "path") -> Path:
    """Return ``path`` if it is a file, else ``path`` + ``suffix`` if that is one.

    Raises ``FileNotFoundError`` naming both candidates otherwise.
    """
    p = Path(path)
    if p.is_file():
        return p
    alt = p.with_name(p.name + suffix)
    if alt.is_file():
        return alt
    raise FileNotFoundError(f"Argument '{name}': no file '{p}' (nor '{alt}').")


def _scalar(arrays: Mapping[str, Any], key: str) -> Any:
    if key not in arrays:
        return None
    value = np.asarray(arrays[key])
    return value.item() if value.size == 1 else None


def as_array(x: Any) -> np.ndarray:
    """A float64 host copy of a numpy array, torch tensor (any device) or sequence."""
    if hasattr(x, "detach"):  # torch tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass(frozen=True)
class Spectrum:
    """A discrete spectral measure: Ritz ``values`` (ascending) with ``weights`` summing to one.

    ``num_params`` (P) scales the normalised trace ``sum(w * theta)`` to the
    trace estimate ``P * sum(w * theta)``; ``None`` when unknown.
    """

    values: np.ndarray
    weights: np.ndarray
    num_params: int | None = None
    curvature: str | None = None
    lanczos_iters: int | None = None
    num_probes: int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def normalised_trace(self) -> float:
        """``sum(w * theta)``: the spectral mean, i.e. the trace divided by P."""
        return float(np.sum(self.weights * self.values))

    @property
    def trace(self) -> float | None:
        """``P * sum(w * theta)``, or ``None`` when P is unknown."""
        if self.num_params is None:
            return None
        return float(self.num_params) * self.normalised_trace

    @property
    def top(self) -> float:
        """The largest Ritz value."""
        return float(np.max(self.values))

    @property
    def negative_mass(self) -> float:
        """The spectral mass on the negative axis, ``sum(w[theta < 0])``."""
        return float(np.sum(self.weights[self.values < 0]))

    @property
    def positive_condition(self) -> float:
        """``theta_max / theta_min^+``, the condition number of the positive part (NaN if none)."""
        positive = self.values[self.values > 0]
        if positive.size == 0:
            return float("nan")
        return float(positive.max() / positive.min())


def _spectrum_from_mapping(arrays: Mapping[str, Any], where: str) -> Spectrum:
    values_key = next((k for k in ("w", "eigvals", "nodes") if k in arrays), None)
    weights_key = "gammas" if "gammas" in arrays else "weights" if "weights" in arrays else None
    if values_key is None or weights_key is None:
        raise argument_error(
            where,
            "a spectrum with Ritz values 'w' (or 'eigvals') and weights 'gammas'",
            f"keys {sorted(arrays)}",
        )
    values = as_array(arrays[values_key]).ravel()
    weights = as_array(arrays[weights_key]).ravel()
    if values.shape != weights.shape or values.size == 0:
        raise argument_error(
            where,
            "Ritz values and weights of the same non-zero length",
            f"shapes {values.shape} and {weights.shape}",
        )
    bad = ~(np.isfinite(values) & np.isfinite(weights))
    if bad.any():  # dropping them would report the trace and top of what is left, silently
        raise argument_error(
            where,
            "finite Ritz values and weights",
            f"{int(bad.sum())} non-finite of {bad.size}, the first at index {int(np.argmax(bad))}",
        )
    order = np.argsort(values, kind="stable")
    config: dict[str, Any] = {}
    raw_config = _scalar(arrays, "config_json")
    if isinstance(raw_config, str) and raw_config:
        try:
            loaded = json.loads(raw_config)
        except json.JSONDecodeError:
            loaded = {}
        config = loaded if isinstance(loaded, dict) else {}
    num_params = _scalar(arrays, "num_params")
    curvature = _scalar(arrays, "curvature")
    iters = _scalar(arrays, "lanczos_iters")
    probes = _scalar(arrays, "num_probes")
    return Spectrum(
        values=values[order],
        weights=weights[order],
        num_params=int(num_params) if num_params is not None else None,
        curvature=str(curvature) if curvature is not None else None,
        lanczos_iters=int(iters) if iters is not None else None,
        num_probes=int(probes) if probes is not None else None,
        config=config,
    )


def as_spectrum(source: Any, *, name: str = "spectrum") -> Spectrum:
    """Normalise ``source`` to a :class:`Spectrum`.

    ``source`` may be a path to a spectrum ``.npz`` (the suffix may be
    omitted), a mapping with ``w``/``gammas`` keys, an object with
    ``nodes``/``weights`` (``spectral.SpectralDensity``) or ``values``/``weights``
    (``spectral.RitzPairs``), a ``(values, weights)`` pair, or a
    :class:`Spectrum`.
    """
    if isinstance(source, Spectrum):
        return source
    if isinstance(source, str | os.PathLike):
        return _spectrum_from_mapping(load_npz(resolve_file(source, name=name)), name)
    if isinstance(source, Mapping):
        return _spectrum_from_mapping(source, name)
    to_arrays = getattr(source, "to_arrays", None)
    if callable(to_arrays):  # nets.workflow.SpectrumResult
        arrays = to_arrays()
        if isinstance(arrays, Mapping):
            return _spectrum_from_mapping(arrays, name)
    for values_attr in ("nodes", "values"):
        if hasattr(source, values_attr) and hasattr(source, "weights"):
            return _spectrum_from_mapping(
                {"w": getattr(source, values_attr), "gammas": source.weights}, name
            )
    if isinstance(source, tuple | list) and len(source) == 2:
        return _spectrum_from_mapping({"w": source[0], "gammas": source[1]}, name)
    raise argument_error(
        name,
        "a spectrum .npz path, a mapping with 'w' and 'gammas', a SpectralDensity, "
        "RitzPairs or a (values, weights) pair",
        source,
        kind=TypeError,
    )


def as_diagonal(source: Any, *, name: str = "ggn_diagonal") -> np.ndarray:
    """A flat float64 array of diagonal entries from an array, a tensor or an ``.npz`` file.

    An ``.npz`` file is read from its ``diagonal`` (or ``diag``) key, or its only array.
    """
    if isinstance(source, str | os.PathLike):
        arrays = load_npz(resolve_file(source, name=name))
        for key in ("diagonal", "diag", "ggn_diagonal"):
            if key in arrays:
                return as_array(arrays[key]).ravel()
        if len(arrays) == 1:
            return as_array(next(iter(arrays.values()))).ravel()
        raise argument_error(name, "an .npz file with a 'diagonal' array", f"keys {sorted(arrays)}")
    values = as_array(source).ravel()
    if values.size == 0:
        raise argument_error(name, "a non-empty diagonal", source)
    return values


def load_landscape(source: Any, *, name: str = "path") -> dict[str, np.ndarray]:
    """The arrays of a landscape file (path or mapping), checked for ``t`` (1-D, ``n >= 2``
    values), the loss curves (``[d, n]``, the same ``d >= 1`` in each) and the planes
    (``[q, n, n]``); a malformed one is a ``ValueError`` naming the file and the array.

    >>> t = np.linspace(-1.0, 1.0, 5)
    >>> load_landscape({"t": t, "train_loss": [t**2], "plane_train_loss": np.ones((1, 5, 3))})
    Traceback (most recent call last):
    ...
    ValueError: Argument 'path': expected 'plane_train_loss' of shape [q, 5, 5] (loss at t[i] ...
    """
    where = ""
    if isinstance(source, str | os.PathLike):
        file = resolve_file(source, name=name)
        arrays = dict(load_npz(file))
        where = f" in '{file}'"
    elif isinstance(source, Mapping):
        arrays = {key: np.asarray(value) for key, value in source.items()}
    else:
        raise argument_error(name, "a landscape .npz path or a mapping", source, kind=TypeError)
    missing = [k for k in ("t", "train_loss") if k not in arrays]
    if missing:
        raise argument_error(
            name, "a landscape with keys 't' and 'train_loss'", f"keys {sorted(arrays)}{where}"
        )
    raw_t = np.asarray(arrays["t"], dtype=np.float64)
    if raw_t.ndim > 1 or raw_t.size < 2:  # one value draws a point, none an empty figure
        raise argument_error(
            name,
            "'t' a 1-D array of at least 2 perturbation sizes (n_points >= 2)",
            f"shape {raw_t.shape}{where}",
        )
    t = raw_t.ravel()
    _check_curves(arrays, t.size, name, where)
    arrays["t"] = t
    _check_planes(arrays, t.size, name, where)
    return arrays


def _check_curves(arrays: dict[str, np.ndarray], n: int, name: str, where: str) -> None:
    """Curves ``train_loss``/``test_loss``/``train_acc``/``test_acc`` of shape ``[d, n]``
    (a 1-D array is one direction), ``d >= 1`` the same in each: the plot indexes every
    one by the directions of ``train_loss`` (a 3-D array failed inside matplotlib)."""
    rows = None
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        if key not in arrays:
            continue
        curves = np.atleast_2d(np.asarray(arrays[key], dtype=np.float64))
        if curves.ndim != 2 or curves.shape[0] < 1 or curves.shape[1] != n:
            raise argument_error(
                name,
                f"'{key}' a 2-D array of shape [d, {n}] (one row per direction, d >= 1, "
                f"a value at each of the {n} values of 't')",
                f"shape {curves.shape}{where}",
            )
        if rows is not None and curves.shape[0] != rows[1]:
            raise argument_error(
                name,
                f"'{key}' with as many directions as '{rows[0]}' ({rows[1]})",
                f"shape {curves.shape}{where}",
            )
        rows = rows or (key, curves.shape[0])
        arrays[key] = curves


def _check_planes(arrays: dict[str, np.ndarray], n: int, name: str, where: str) -> None:
    """Planes ``plane_<split>_<metric>[q, i, j]`` (the value at ``t[i]`` along the plane's
    first direction and ``t[j]`` along its second): both axes the size of ``t``, and the
    same number of planes in each (contour plotting failed on others with an error about
    its own arguments)."""
    count = None
    keys = [f"plane_{s}_{m}" for s in ("train", "test") for m in ("loss", "acc")]
    for key in (k for k in keys if k in arrays):
        plane = np.asarray(arrays[key], dtype=np.float64)
        if plane.ndim != 3 or plane.shape[0] < 1 or plane.shape[1:] != (n, n):
            raise argument_error(
                name,
                f"'{key}' of shape [q, {n}, {n}] (loss at t[i] along the plane's first "
                f"direction and t[j] along its second, {n} values of 't' each, q >= 1)",
                f"shape {plane.shape}{where}",
            )
        if count is not None and plane.shape[0] != count[1]:
            raise argument_error(
                name,
                f"'{key}' with as many planes as '{count[0]}' ({count[1]})",
                f"{plane.shape[0]}{where}",
            )
        count = count or (key, plane.shape[0])
        arrays[key] = plane


def load_training_stats(source: Any, *, name: str = "path") -> dict[str, Any]:
    """Training statistics from ``<dir>/stats.json``, the file itself, or an already-loaded dict."""
    if isinstance(source, Mapping):
        stats = dict(source)
    elif isinstance(source, str | os.PathLike):
        p = Path(source)
        if p.is_dir():
            p = p / "stats.json"
        if not p.is_file():
            raise FileNotFoundError(f"Argument '{name}': no training statistics file '{p}'.")
        try:
            stats = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as exc:  # not JSON, or not UTF-8 text
            raise CorruptFileError(
                f"File '{p}': not valid JSON ({exc}); training statistics (stats.json) expected."
            ) from exc
    else:
        raise argument_error(
            name, "a run directory, a stats.json path or a dict", source, kind=TypeError
        )
    epochs = stats.get("epochs") if isinstance(stats, dict) else None
    if not isinstance(epochs, list) or not epochs:
        raise argument_error(
            name, "training statistics with a non-empty 'epochs' list", "no epochs recorded"
        )
    return stats
