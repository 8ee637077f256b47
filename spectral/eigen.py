r"""Extreme eigenpairs by thick-restart Lanczos (Wu and Simon, 2000), in the operator's namespace.

Each cycle extends an orthonormal basis ``V = [v_1 .. v_p]`` to ``ncv`` vectors
with Lanczos steps (full CGS2 reorthogonalisation, blocked products), forms the
Rayleigh quotient ``H = V^T A V`` (tridiagonal plus, after a restart, an arrow
row/column), and computes its eigenpairs ``H = S \Theta S^T`` on the host in
float64.  With ``r = A v_{ncv} - V h`` the residual of the last step,
``\|A y_i - \theta_i y_i\| = \|r\|\,|S_{ncv,i}|`` for the Ritz vector ``y_i = V s_i``.
A pair is converged when this residual is at most
``\max(tol \cdot \max(|\theta_i|, eps^{2/3}\|H\|),\ f\,\|H\|)`` (ARPACK's
criterion, with a floor ``f`` at the rounding level of the products, see
:func:`residual_floor`: ``100 eps`` for products in the vectors' own precision,
``2 eps`` of a 16-bit operator's dtype for its products around float64 vectors).  Until the
``k`` wanted pairs have converged, the basis is restarted with the
``p = k + (ncv - k) // 2`` most wanted Ritz vectors plus ``r / \|r\|``
("thick restart"), which keeps the Krylov information of the wanted end.

A single Krylov sequence sees only one copy of a repeated eigenvalue.  After
convergence the search is therefore repeated for one pair on the orthogonal
complement of all vectors found so far ("locking"); a more wanted value found
there (a further copy) replaces the least wanted pair, and the check repeats
(at most ``k`` times).  This costs one extra short run in the common case.

Vectors never leave the operator's namespace/device; only ``H`` (``ncv x ncv``)
and its eigenvectors cross to the host.

>>> import numpy as np
>>> vals, vecs = top_eigenpairs(np.diag(np.arange(1.0, 51.0)), 3, seed=0)
>>> vals.round(8).tolist(), vecs.shape
([48.0, 49.0, 50.0], (50, 3))
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from spectral import _backend
from spectral.errors import NumericalError, argument_error, check_real
from spectral.operator import SymmetricOperator, as_operator
from spectral.probes import as_generator, random_probe

__all__ = ["WHICH", "residual_floor", "top_eigenpairs"]

logger = logging.getLogger(__name__)

WHICH = ("LA", "SA", "LM")


def residual_floor(op: SymmetricOperator) -> float:
    r"""The smallest relative residual :math:`\|A y - \theta y\| / \|A\|` that counts as
    converged for the products of ``op`` (the floor of the convergence criterion).

    Two roundings limit a residual computed from products:

    * the arithmetic around the products, in the vectors' dtype (``eps_v``): dot products
      and updates of length ``n``; the floor keeps the long-standing ``100 eps_v``
      (for float64 and float32 operators nothing changes);
    * the products themselves, with relative error ``eps_p = op.eps``. A 16-bit operator
      (float16, bfloat16) runs with float64 vectors: each product rounds its input and its
      result to 16 bits (two roundings of ``u = eps_p / 2``, with the accumulation inside
      in at least float32, as numpy's and torch's 16-bit products do), so a residual is
      known only to about :math:`\epsilon_p\|A\|`; the floor is ``2 eps_p`` (measured
      residuals of converged pairs reach 0.2 to 0.8 ``eps_p``).

    The floor is :math:`\max(100\,\epsilon_v, 2\,\epsilon_p)`: ``1.6e-2`` for bfloat16
    and ``2e-3`` for float16, far below :math:`\|A\|` (``100 eps_p`` was 0.78
    :math:`\|A\|` in bfloat16, so that any first guess passed).

    >>> import numpy as np
    >>> from spectral.operator import as_operator
    >>> residual_floor(as_operator(np.eye(3))) == 100 * 2.0**-52
    True
    >>> residual_floor(as_operator(np.eye(3, dtype=np.float16))) == 2 * 2.0**-10
    True
    """
    eps_vectors = _backend.finfo_eps(op.xp, op.dtype)
    return max(100.0 * eps_vectors, 2.0 * op.eps)


def _breakdown_level(op: SymmetricOperator) -> float:
    r"""``beta <= level * ||A||_est`` is an exact breakdown in :func:`_extend`.

    The danger is orthogonality: CGS2 orthogonalises to the rounding of the vectors'
    dtype (``eps_v``, float64 for a 16-bit operator) relative to its input, so a residual
    at that rounding level is not orthogonal to ``V`` once normalised.  The level is
    :math:`\min(10\sqrt{n}\,\epsilon_v, \sqrt{\epsilon_v})`: ``10 sqrt(n) eps_v`` is the
    rounding of length-``n`` dot products with a margin; the cap :math:`\sqrt{\epsilon_v}`
    (reached only by float32 vectors beyond ``n = 84,000``) keeps it far below
    :math:`\|A\|` at any ``n``: a residual above :math:`\sqrt{\epsilon_v}\|A\|` keeps half
    the digits, and two CGS passes make it orthogonal to working precision.  The products'
    own rounding (``op.eps``) is irrelevant here: a residual that is product noise is a
    valid direction, orthogonal to ``V`` in the vectors' precision, and its norm an exact
    entry of ``H`` (the old ``10 sqrt(n) op.eps`` exceeded 1 for float16 at ``n = 10,500``
    and for bfloat16 at ``n = 164``, so every step was replaced by a random vector).

    >>> import numpy as np
    >>> from spectral.operator import as_operator
    >>> _breakdown_level(as_operator(np.eye(4))) == 20 * 2.0**-52
    True
    """
    eps_vectors = _backend.finfo_eps(op.xp, op.dtype)
    return min(10.0 * math.sqrt(op.n) * eps_vectors, math.sqrt(eps_vectors))


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` from most to least wanted."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _orthogonalise(Vb: Any, w: Any) -> tuple[Any, Any]:
    """CGS2 of ``w`` against the orthonormal rows of ``Vb``; returns ``(w, coefficients)``."""
    c1 = Vb @ w
    w = w - c1 @ Vb  # out of place: ``w`` may alias the operator's input
    c2 = Vb @ w
    w -= c2 @ Vb
    return w, c1 + c2


def _validate(op: SymmetricOperator, k: Any, which: Any, tol: Any, ncv: Any, max_iters: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k < op.n:
        raise argument_error("k", f"an integer with 1 <= k < n = {op.n}", k)
    if which not in WHICH:
        raise argument_error("which", f"one of {WHICH}", which)
    check_real("tol", tol, "a positive finite number", lambda t: 0 < t < math.inf)
    if ncv is None:
        ncv = min(op.n, max(2 * int(k) + 1, 20))
    if isinstance(ncv, bool) or not isinstance(ncv, int | np.integer) or not k < ncv <= op.n:
        raise argument_error("ncv", f"an integer with k = {k} < ncv <= n = {op.n}", ncv)
    if max_iters is not None and (
        isinstance(max_iters, bool) or not isinstance(max_iters, int | np.integer) or max_iters < 1
    ):
        raise argument_error("max_iters", "None or a positive integer", max_iters)
    return int(ncv)


def top_eigenpairs(
    A: Any,
    k: int,
    *,
    which: str = "LA",
    tol: float = 1e-8,
    max_iters: int | None = None,
    ncv: int | None = None,
    seed: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, Any]:
    """The ``k`` eigenpairs of the symmetric ``A`` at one end of its spectrum.

    Parameters
    ----------
    A:
        Anything :func:`spectral.operator.as_operator` accepts (``n x n``).
    k:
        Number of eigenpairs, ``1 <= k < n``.
    which:
        ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
    tol:
        Relative residual tolerance (see the module docstring).  It is raised to
        :func:`residual_floor` (``100 eps`` of a float32/float64 operator's dtype, ``2 eps``
        of a float16/bfloat16 operator's) if smaller.
    max_iters:
        Maximum number of restart cycles (default ``max(1000, 10 n)``, as ARPACK's ``maxiter``).
    ncv:
        Basis size per cycle, ``k < ncv <= n`` (default ``min(n, max(2k + 1, 20))``).
    seed:
        Integer or numpy ``Generator`` for the start vector.

    Returns
    -------
    values:
        float64 ``(k,)``, ascending (as ``scipy.sparse.linalg.eigsh``).
    vectors:
        ``(n, k)`` unit eigenvectors in the operator's namespace and device;
        column ``i`` belongs to ``values[i]``.

    Raises
    ------
    ValueError, TypeError
        Invalid arguments.
    spectral.errors.NumericalError
        NaN/Inf in a product, or no convergence within ``max_iters`` cycles.

    Examples
    --------
    >>> import numpy as np
    >>> vals, _ = top_eigenpairs(np.diag(np.linspace(-5.0, 1.0, 40)), 2, which="SA", seed=1)
    >>> vals.round(8).tolist()
    [-5.0, -4.84615385]
    """
    op = as_operator(A)
    ncv = _validate(op, k, which, tol, ncv, max_iters)
    k = int(k)
    n = op.n
    tol = max(float(tol), residual_floor(op))
    if max_iters is None:
        max_iters = max(1000, 10 * n)
    rng = as_generator(seed)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        values, Y, margin, anorm = _trlan(op, k, which, tol, ncv, int(max_iters), rng, None)
        locked = Y
        # Multiplicity check: one Krylov sequence sees a single copy of a repeated
        # eigenvalue.  Search the complement of everything found for a pair more
        # wanted than the k-th; merge it and repeat (at most k times).
        for _ in range(k):
            free = n - int(locked.shape[0])
            if free < 2:
                break
            extra, Z, _, _ = _trlan(
                op, 1, which, tol, min(ncv, free), int(max_iters), rng, locked, anorm
            )
            worst = _order(values, which)[-1]
            if not _more_wanted(float(extra[0]), float(values[worst]), which, margin):
                break
            logger.debug("top_eigenpairs: found a further copy near %.6g", float(extra[0]))
            values = np.r_[values, extra]
            Y = op.xp.concat([Y, Z], axis=0)
            best = _order(values, which)[:k]
            Y = _take_rows(op.xp, Y, best)
            values = values[best]
            locked = op.xp.concat([locked, Z], axis=0)
    ascending = np.argsort(values, kind="stable")
    Y = _take_rows(op.xp, Y, ascending)
    return values[ascending], Y.T


def _take_rows(xp: Any, Y: Any, rows: np.ndarray) -> Any:
    """``Y[rows, :]`` for an integer host array ``rows`` (stacking works in every namespace)."""
    return xp.stack([Y[int(i), :] for i in rows], axis=0)


def _more_wanted(candidate: float, current: float, which: str, margin: float) -> bool:
    """Whether ``candidate`` is more wanted than ``current`` by more than ``margin``."""
    if which == "LA":
        return candidate > current + margin
    if which == "SA":
        return candidate < current - margin
    return abs(candidate) > abs(current) + margin


def _trlan(
    op: SymmetricOperator,
    k: int,
    which: str,
    tol: float,
    ncv: int,
    max_iters: int,
    rng: np.random.Generator,
    locked: Any,
    anorm: float = 0.0,
) -> tuple[np.ndarray, Any, float, float]:
    r"""Thick-restart Lanczos for ``k`` wanted pairs of ``A`` restricted to ``locked^⊥``.

    Returns ``(values, Y, margin, anorm)``: values in wanted order, the ``k x n`` rows
    ``Y`` of unit Ritz vectors, the largest convergence threshold used (a resolution
    for comparing values) and the norm estimate :math:`\|A\|_{est}`.  ``anorm`` on
    entry is a known lower bound of :math:`\|A\|` (the unrestricted run's estimate
    for a search on ``locked^⊥``, whose products carry rounding errors of the size
    ``eps \|A\|`` of the whole operator, not of its restriction).
    """
    xp = op.xp
    n = op.n
    eps = op.eps
    floor = residual_floor(op)
    V = xp.zeros((ncv, n), dtype=op.dtype, device=op.device)
    H = np.zeros((ncv, ncv))
    v = random_probe(n, "sphere", rng, like=op.template)
    if locked is not None:
        v, _ = _orthogonalise(locked, v)
    V[0, :] = v * (1.0 / float(_backend.vector_norm(xp, v)))
    p = 0  # number of kept (restart) vectors already in V with their H block known
    keep = min(k + (ncv - k) // 2, ncv - 1)
    for cycle in range(max_iters):
        r, rnorm, anorm = _extend(op, V, H, p, rng, cycle, locked, anorm)
        anorm = max(anorm, float(np.max(np.abs(np.linalg.eigvalsh(H)))), rnorm)
        theta, S = np.linalg.eigh(H)
        order = _order(theta, which)
        resid = rnorm * np.abs(S[-1, :])
        threshold = np.maximum(
            tol * np.maximum(np.abs(theta), eps ** (2.0 / 3.0) * anorm), floor * anorm
        )
        wanted = order[:k]
        if np.all(resid[wanted] <= threshold[wanted]) or rnorm <= eps * anorm:
            Sw = _backend.from_host(np.ascontiguousarray(S[:, wanted].T), like=V)
            logger.debug("top_eigenpairs: converged after %d cycles", cycle + 1)
            return theta[wanted], Sw @ V, float(np.max(threshold[wanted])), anorm
        # thick restart: keep the `keep` most wanted Ritz vectors and the residual direction
        kept = order[:keep]
        Sk = _backend.from_host(np.ascontiguousarray(S[:, kept].T), like=V)
        Y = Sk @ V
        V[:keep, :] = Y
        V[keep, :] = _backend.divided(xp, r, rnorm)
        H[:] = 0.0
        H[np.arange(keep), np.arange(keep)] = theta[kept]
        arrow = rnorm * S[-1, kept]
        H[keep, :keep] = arrow
        H[:keep, keep] = arrow
        p = keep
    nconv = int(np.sum(resid[order[:k]] <= threshold[order[:k]]))
    raise NumericalError(
        f"top_eigenpairs: {nconv} of {k} eigenpairs converged to tol={tol:.1e} "
        f"after max_iters={max_iters} restart cycles (largest residual "
        f"{float(np.max(resid[order[:k]])):.3e}); increase max_iters or ncv"
    )


def _extend(
    op: SymmetricOperator,
    V: Any,
    H: np.ndarray,
    p: int,
    rng: np.random.Generator,
    cycle: int,
    locked: Any = None,
    anorm: float = 0.0,
) -> tuple[Any, float, float]:
    r"""Fill rows ``p..ncv-1`` of ``V`` and columns ``p..`` of ``H``; return the residual.

    On entry rows ``0..p`` of ``V`` are orthonormal and ``H[:p, :p]`` plus the
    arrow ``H[p, :p]`` are known.  Column ``j`` of ``H`` is ``V_{0..j}^T A v_j``
    (CGS2), and ``H[j+1, j] = ||r_j||``.  New vectors are also kept orthogonal to
    the rows of ``locked`` (converged eigenvectors), restricting ``A`` to their complement.

    Returns ``(r, ||r||, anorm)`` with ``anorm`` the running estimate
    :math:`\|A\|_{est} = \max(\text{anorm on entry}, \max_j \|A v_j\|)`.  A step
    is an exact breakdown (continued with a random vector orthogonal to ``V``) when
    :math:`\beta_j \le \ell \|A\|_{est}` with :math:`\ell` of :func:`_breakdown_level`
    (``10 sqrt(n) eps`` of the vectors' dtype, at most its ``sqrt(eps)``): the residual is
    then rounding noise, and normalising it would give a vector that is not orthogonal to
    ``V`` (CGS2 orthogonalises to ``eps`` *of its input's norm*).  The scale must be
    the operator's norm, not the current column's: a column of a null vector has
    entries of the size of the noise itself (a rank-3 operator once gave a residual
    of 5e-29 next to column entries of 1e-29, accepted as a Lanczos vector, and
    Ritz values of 7e4 for eigenvalues of 48 followed).
    """
    xp = op.xp
    ncv = H.shape[0]
    n = op.n
    level = _breakdown_level(op)
    r: Any = None
    rnorm = 0.0
    for j in range(p, ncv):
        w = op.matvec(V[j, :])
        Vb = V[: j + 1, :]
        w, h = _orthogonalise(Vb, w)
        if locked is not None:
            w, _ = _orthogonalise(locked, w)
        stats = _backend.to_host_float64(
            xp.concat([h, xp.reshape(_backend.vector_norm(xp, w), (1,))])
        )
        if not np.all(np.isfinite(stats)):
            raise NumericalError(
                f"top_eigenpairs: the product A @ v contains NaN or Inf (cycle {cycle + 1}, "
                f"step {j + 1})"
            )
        hcol, beta = stats[:-1], float(stats[-1])
        anorm = max(anorm, math.hypot(*(float(h) for h in hcol), beta))  # no overflow
        # the already-known part above the arrow is kept; the new column is symmetrised
        H[j, j] = hcol[j]
        if j > p:
            H[j - 1, j] = H[j, j - 1]
        r, rnorm = w, beta
        if j + 1 == ncv:
            break
        if beta <= level * anorm:
            # invariant subspace: continue with a random direction orthogonal to V
            v = random_probe(n, "gaussian", rng, like=op.template)
            if locked is not None:
                v, _ = _orthogonalise(locked, v)
            v, _ = _orthogonalise(Vb, v)
            v, _ = _orthogonalise(Vb, v)
            vnorm = float(_backend.vector_norm(xp, v))
            V[j + 1, :] = v * (1.0 / vnorm)
            H[j + 1, j] = H[j, j + 1] = 0.0
        else:
            V[j + 1, :] = _backend.divided(xp, w, beta)
            H[j + 1, j] = H[j, j + 1] = beta
    return r, rnorm, anorm
