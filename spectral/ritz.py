r"""Ritz pairs and Gauss quadrature weights of a Lanczos tridiagonal matrix.

After ``m`` Lanczos steps from a unit start vector ``q_1``,
``A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^T`` with ``T_m`` symmetric tridiagonal
(diagonal ``alpha``, off-diagonal ``beta``).  With ``T_m = S \Theta S^T``:

* Ritz values ``\theta_i`` (ascending) approximate eigenvalues of ``A``;
* weights ``w_i = S_{1i}^2`` (sum to 1) are the Gauss quadrature weights of the
  spectral measure of ``A`` seen from ``q_1``:
  ``\sum_i w_i f(\theta_i) \approx q_1^T f(A) q_1``, exact for polynomials of
  degree ``<= 2m - 1``;
* Ritz vectors ``y_i = Q_m s_i`` (when the basis is stored);
* residuals ``\|A y_i - \theta_i y_i\| = |\beta_m S_{mi}|`` (in exact arithmetic).

In floating point the basis satisfies ``A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^T + F``,
and since ``T_m s_i = \theta_i s_i`` the true residual is
``\|A y_i - \theta_i y_i\| = \|\beta_m S_{mi} q_{m+1} + F s_i\|
\le |\beta_m S_{mi}| + \|F\|``: the reported residual leaves ``F`` out.  With full
reorthogonalisation ``\|F\| = O(\epsilon\|A\|)``; with partial or selective
reorthogonalisation ``F`` also holds the components removed from the residuals to keep
the basis semi-orthogonal, up to a few ``\sqrt{\epsilon}\,\|A\|``, so there the
residuals (and the convergence flags built on them) are exact-arithmetic values that can
understate the true residual by that much.

The eigen-decomposition uses :func:`scipy.linalg.eigh_tridiagonal` in float64.

>>> import numpy as np
>>> pairs = ritz_pairs(np.array([2.0, 2.0]), np.array([1.0]), residual_norm=0.0)
>>> pairs.values.round(12).tolist(), pairs.weights.round(12).tolist()
([1.0, 3.0], [0.5, 0.5])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from spectral import _backend
from spectral.errors import NumericalError, argument_error, check_real

__all__ = ["RitzPairs", "ritz_pairs", "tridiagonal_eigh"]


@dataclass
class RitzPairs:
    """Ritz values, quadrature weights, optional vectors, residual norms and convergence flags.

    Attributes
    ----------
    values:
        float64 ``(m,)``, ascending Ritz values.
    weights:
        float64 ``(m,)``, squared first components of the eigenvectors of ``T``; sum 1.
    vectors:
        ``(n, m)`` Ritz vectors (column ``i`` for ``values[i]``) in the basis'
        namespace/device, or ``None`` when no basis was stored.
    residuals:
        float64 ``(m,)``, ``|beta_m S_{m i}|``: the residual norms in exact arithmetic; the
        true ``||A y_i - theta_i y_i||`` can be larger by ``||F||`` (module docstring), up
        to a few ``sqrt(eps) ||A||`` after partial or selective reorthogonalisation.
    converged:
        bool ``(m,)``, ``residuals <= tol * max(|values|)`` (as reliable as ``residuals``).

    Examples
    --------
    >>> p = ritz_pairs(np.array([1.0]), np.array([]), residual_norm=0.5)
    >>> p.residuals.tolist(), p.converged.tolist()
    ([0.5], [False])
    """

    values: np.ndarray
    weights: np.ndarray
    vectors: Any
    residuals: np.ndarray
    converged: np.ndarray

    def __len__(self) -> int:
        return int(self.values.shape[0])


def tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition ``T = S diag(theta) S^T`` of the symmetric tridiagonal ``T`` (float64).

    >>> theta, S = tridiagonal_eigh(np.array([0.0, 0.0]), np.array([1.0]))
    >>> theta.round(12).tolist()
    [-1.0, 1.0]
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    if alpha.ndim != 1 or alpha.size < 1:
        raise argument_error("alpha", "a non-empty 1-D array", alpha)
    if beta.shape != (alpha.size - 1,):
        raise argument_error("beta", f"a 1-D array of length {alpha.size - 1}", beta)
    if not (np.all(np.isfinite(alpha)) and np.all(np.isfinite(beta))):
        raise NumericalError("tridiagonal matrix has non-finite entries")
    if alpha.size == 1:
        return alpha.copy(), np.ones((1, 1))
    theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta)
    return np.asarray(theta, dtype=np.float64), np.asarray(S, dtype=np.float64)


def ritz_pairs(
    alpha: np.ndarray,
    beta: np.ndarray,
    residual_norm: float,
    basis: Any = None,
    tol: float = 1e-8,
) -> RitzPairs:
    """Ritz pairs of the Lanczos tridiagonal ``T`` (``alpha`` diagonal, ``beta`` off-diagonal).

    Parameters
    ----------
    alpha, beta:
        float64 arrays of lengths ``m`` and ``m - 1``.
    residual_norm:
        ``beta_m``, the norm of the final Lanczos residual.
    basis:
        Optional ``n x m`` Lanczos basis ``Q`` (any namespace); Ritz vectors are ``Q S``.
    tol:
        Relative convergence threshold, a finite number ``>= 0``: pair ``i`` is converged
        when ``|beta_m S_{mi}| <= tol * max_j |theta_j|``.  This is exact-arithmetic
        convergence: for a basis from partial or selective reorthogonalisation the true
        residual can exceed ``|beta_m S_{mi}|`` by a few ``sqrt(eps) ||A||`` (module
        docstring), so flags at ``tol`` below about ``10 sqrt(eps)`` are not guarantees.

    Returns
    -------
    RitzPairs
        Values (ascending), weights (squared first components, summing to 1), vectors (with
        ``basis``), residual norms and convergence flags.

    Examples
    --------
    >>> p = ritz_pairs(np.array([1.0, 1.0]), np.array([0.0]), 0.0)
    >>> p.converged.tolist()
    [True, True]
    """
    tol = check_real("tol", tol, "a finite number >= 0", lambda t: 0.0 <= t < math.inf)
    theta, S = tridiagonal_eigh(alpha, beta)
    weights = S[0, :] ** 2
    weights = weights / weights.sum()
    residuals = np.abs(float(residual_norm) * S[-1, :])
    scale = float(np.max(np.abs(theta))) if theta.size else 0.0
    converged = residuals <= tol * scale
    vectors = None
    if basis is not None:
        shape = tuple(getattr(basis, "shape", ()))
        if len(shape) != 2 or int(shape[1]) != theta.size:
            raise argument_error("basis", f"an n x {theta.size} array", basis)
        vectors = basis @ _backend.from_host(S, like=basis)
    return RitzPairs(theta, weights, vectors, residuals, converged)
