"""Random probe vectors, drawn on the host and transferred once to the operator's namespace.

Probes are generated with a numpy :class:`numpy.random.Generator` in float64,
so the same ``seed`` gives bitwise the same probe whatever the backend (numpy,
torch on any device, ``array_api_strict``...), up to the final cast to the
target dtype.  Kinds:

* ``"rademacher"``: i.i.d. entries ``±1`` (``E[v vᵀ] = I``);
* ``"gaussian"``: i.i.d. standard normal entries (``E[v vᵀ] = I``);
* ``"sphere"``: uniform on the unit sphere ``S^{n-1}`` (a normalised Gaussian;
  ``E[v vᵀ] = I / n``).

:func:`random_probes` draws ``k`` probes as the columns of an ``n x k`` array;
its first column equals :func:`random_probe` with the same seed.

>>> v = random_probe(4, "rademacher", seed=0)
>>> sorted(set(v.tolist())) in ([-1.0, 1.0], [-1.0], [1.0])
True
>>> import numpy as np
>>> V = random_probes(5, 3, "sphere", seed=1)
>>> V.shape, np.allclose(np.linalg.norm(V, axis=0), 1.0)
((5, 3), True)
>>> bool(np.all(V[:, 0] == random_probe(5, "sphere", seed=1)))
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spectral import _backend
from spectral.errors import argument_error

__all__ = ["PROBE_KINDS", "as_generator", "random_probe", "random_probes"]

PROBE_KINDS = ("rademacher", "gaussian", "sphere")


def as_generator(seed: int | np.random.Generator | None) -> np.random.Generator:
    """Return a numpy ``Generator``: ``seed`` itself if it is one, else ``default_rng(seed)``.

    ``seed`` is ``None`` (fresh entropy), a non-negative integer or a ``Generator``.

    >>> bool(as_generator(3).integers(10) == as_generator(3).integers(10))
    True
    """
    if isinstance(seed, np.random.Generator):
        return seed
    expected = "None, a non-negative integer or a numpy.random.Generator"
    if seed is None or (isinstance(seed, int | np.integer) and not isinstance(seed, bool)):
        if seed is not None and seed < 0:  # numpy's own message names no argument
            raise argument_error("seed", expected, seed)
        return np.random.default_rng(seed)
    raise argument_error("seed", expected, seed, kind=TypeError)


def _host_probes(n: int, k: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Draw ``k`` probes of length ``n`` as the rows of a float64 ``k x n`` array."""
    if kind == "rademacher":
        return rng.integers(0, 2, size=(k, n)).astype(np.float64) * 2.0 - 1.0
    draws = rng.standard_normal((k, n))
    if kind == "sphere":
        draws /= np.linalg.norm(draws, axis=1, keepdims=True)
    return draws


def _check(n: int, k: int, kind: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise argument_error("n", "a positive integer", n)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise argument_error("k", "a positive integer", k)
    if kind not in PROBE_KINDS:
        raise argument_error("kind", f"one of {PROBE_KINDS}", kind)


def random_probes(
    n: int,
    k: int,
    kind: str = "rademacher",
    seed: int | np.random.Generator | None = None,
    like: Any = None,
    *,
    rng: np.random.Generator | None = None,
) -> Any:
    """Draw ``k`` random probes of length ``n`` as the columns of an ``n x k`` array.

    Parameters
    ----------
    n, k:
        Length and number of probes.
    kind:
        ``"rademacher"``, ``"gaussian"`` or ``"sphere"`` (see the module docstring).
    seed:
        An integer, a numpy ``Generator`` (advanced in place) or ``None``.
    like:
        Template array: the result takes its namespace, device and dtype
        (numpy float64 when ``None``).
    rng:
        Keyword alias of ``seed`` for a ``Generator``.

    Returns
    -------
    array
        The probes as the columns of an ``(n, k)`` array.

    Examples
    --------
    >>> random_probes(3, 2, "gaussian", seed=0).shape
    (3, 2)
    """
    _check(n, k, kind)
    if rng is not None:
        seed = rng
    host = _host_probes(int(n), int(k), kind, as_generator(seed)).T
    if like is None:
        return np.ascontiguousarray(host)
    return _backend.from_host(host, like=like)


def random_probe(
    n: int,
    kind: str = "rademacher",
    seed: int | np.random.Generator | None = None,
    like: Any = None,
    *,
    rng: np.random.Generator | None = None,
) -> Any:
    """Draw one random probe of length ``n`` (same conventions as :func:`random_probes`).

    Parameters
    ----------
    n : int
        Length of the probe.
    kind : str
        ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
    seed : int, numpy.random.Generator or None
        Source of the randomness.
    like : array, optional
        Template array: the probe takes its namespace, device and dtype.
    rng : numpy.random.Generator, optional
        Keyword alias of ``seed``.

    Returns
    -------
    array
        The probe, shape ``(n,)``.

    Examples
    --------
    >>> random_probe(3, "gaussian", seed=0).shape
    (3,)
    """
    _check(n, 1, kind)
    if rng is not None:
        seed = rng
    host = _host_probes(int(n), 1, kind, as_generator(seed))[0]
    if like is None:
        return host
    return _backend.from_host(host, like=like)
