r"""Random symmetric matrices with known spectra: the test currency of ``spectral``.

Every generator takes an explicit ``seed`` (an integer or a
:class:`numpy.random.Generator`) and returns float64 numpy arrays.

Families
--------
* **Prescribed spectrum under a Haar rotation**: :math:`A = Q\,\mathrm{diag}(\lambda)\,Q^\top`
  with :math:`Q` Haar-distributed on :math:`O(n)` (:func:`haar_orthogonal`,
  :func:`prescribed_spectrum`, :func:`low_rank`, :func:`low_effective_rank`).
* **Wigner** (GOE) matrices, whose spectrum follows the semicircle law
  (:func:`wigner`, :func:`semicircle_pdf`), and **spiked Wigner** matrices
  :math:`W + \sum_k \theta_k u_k u_k^\top` (:func:`spiked_wigner`).
* **Wishart** matrices :math:`X^\top X / p`, whose spectrum follows the
  Marchenko–Pastur law (:func:`wishart`, :func:`wishart_operator`, :class:`GramOperator`,
  :func:`marchenko_pastur_pdf`, :func:`marchenko_pastur_support`), and the **spiked covariance**
  model (:func:`spiked_covariance`).
* **Diagonal-approximation counterexamples** (the paper's Appendix C): matrices whose
  diagonal, read as a histogram, is arbitrarily far from the spectrum
  (:func:`constant_diagonal`, :func:`two_point`, :func:`flat_rank_one`).

>>> A = prescribed_spectrum([1.0, 2.0, 3.0], seed=0)
>>> np.round(np.linalg.eigvalsh(A), 12)
array([1., 2., 3.])
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray
from scipy.sparse.linalg import LinearOperator

from spectral.errors import argument_error

__all__ = [
    "GramOperator",
    "constant_diagonal",
    "flat_rank_one",
    "haar_orthogonal",
    "low_effective_rank",
    "low_rank",
    "marchenko_pastur_atom",
    "marchenko_pastur_pdf",
    "marchenko_pastur_support",
    "orthonormal_columns",
    "prescribed_spectrum",
    "semicircle_pdf",
    "spiked_covariance",
    "spiked_wigner",
    "two_point",
    "wigner",
    "wishart",
    "wishart_operator",
]

Seed = int | np.random.Generator
FloatArray = NDArray[np.float64]


def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
        return np.random.default_rng(int(seed))
    raise argument_error(
        "seed", "a non-negative integer or a numpy.random.Generator", seed, kind=TypeError
    )


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise argument_error(name, f"an integer >= {minimum}", value)
    return int(value)


def _spectrum(eigenvalues: ArrayLike) -> FloatArray:
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0 or not np.all(np.isfinite(lam)):
        raise argument_error("eigenvalues", "a non-empty 1-D array of finite reals", eigenvalues)
    return lam


def _symmetrise(a: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (a + a.T)
    return out


def _rotate(basis: FloatArray, eigenvalues: FloatArray) -> FloatArray:
    """Return ``basis @ diag(eigenvalues) @ basis.T``, exactly symmetric."""
    return _symmetrise((basis * eigenvalues) @ basis.T)


def orthonormal_columns(n: int, k: int, *, seed: Seed) -> FloatArray:
    r"""Return ``k`` Haar-distributed orthonormal columns in :math:`\mathbb{R}^n`, shape ``(n, k)``.

    QR of an ``n × k`` standard Gaussian matrix with the sign fix
    :math:`Q \leftarrow Q\,\mathrm{diag}(\mathrm{sign}\,R_{ii})`, which makes the
    distribution exactly uniform on the Stiefel manifold (Mezzadri, 2007).

    Parameters
    ----------
    n : int
        Dimension of the space.
    k : int
        Number of columns, ``1 <= k <= n``.
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).

    Returns
    -------
    numpy.ndarray
        float64 ``(n, k)`` with orthonormal columns, Haar-distributed on the Stiefel manifold.

    Examples
    --------
    >>> Q = orthonormal_columns(5, 2, seed=0)
    >>> np.allclose(Q.T @ Q, np.eye(2))
    True
    """
    n = _positive_int("n", n)
    k = _positive_int("k", k)
    if k > n:
        raise argument_error("k", f"an integer with 1 <= k <= n = {n}", k)
    gauss = _rng(seed).standard_normal((n, k))
    q, r = np.linalg.qr(gauss)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    out: FloatArray = q * signs
    return out


def haar_orthogonal(n: int, *, seed: Seed) -> FloatArray:
    r"""Return an ``n × n`` orthogonal matrix drawn from the Haar measure on :math:`O(n)`.

    Parameters
    ----------
    n : int
        Dimension.
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` orthogonal matrix.

    Examples
    --------
    >>> Q = haar_orthogonal(4, seed=1)
    >>> np.allclose(Q @ Q.T, np.eye(4))
    True
    """
    return orthonormal_columns(n, n, seed=seed)


def prescribed_spectrum(eigenvalues: ArrayLike, *, seed: Seed) -> FloatArray:
    r"""Return :math:`Q\,\mathrm{diag}(\lambda)\,Q^\top` with :math:`Q` Haar on :math:`O(n)`.

    The result is exactly symmetric; its eigenvalues are ``eigenvalues`` up to a few
    units of :math:`n\,\varepsilon\,\max|\lambda|`.

    Parameters
    ----------
    eigenvalues : array_like
        The spectrum :math:`\lambda` (length ``n``).
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` symmetric matrix with eigenvalues ``eigenvalues``.

    Examples
    --------
    >>> A = prescribed_spectrum([-1.0, 5.0], seed=3)
    >>> np.round(np.linalg.eigvalsh(A), 12)
    array([-1.,  5.])
    """
    lam = _spectrum(eigenvalues)
    return _rotate(haar_orthogonal(lam.size, seed=seed), lam)


def low_rank(n: int, rank: int, *, seed: Seed, eigenvalues: ArrayLike | None = None) -> FloatArray:
    r"""Return the ``n × n`` rank-``rank`` matrix :math:`U\,\mathrm{diag}(\lambda)\,U^\top`.

    :math:`U` has ``rank`` Haar orthonormal columns; ``eigenvalues`` (length ``rank``)
    default to i.i.d. :math:`U[1, 2]` draws.

    Parameters
    ----------
    n : int
        Dimension.
    rank : int
        Rank, ``0 <= rank <= n`` (0 gives the zero matrix).
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).
    eigenvalues : array_like, optional
        The ``rank`` non-zero eigenvalues; default i.i.d. :math:`U[1, 2]`.

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` symmetric matrix of rank ``rank``.

    Examples
    --------
    >>> A = low_rank(6, 2, seed=0)
    >>> int(np.linalg.matrix_rank(A))
    2
    """
    n = _positive_int("n", n)
    rank = _positive_int("rank", rank, minimum=0)
    if rank > n:
        raise argument_error("rank", f"an integer with 0 <= rank <= n = {n}", rank)
    rng = _rng(seed)
    if rank == 0:
        return np.zeros((n, n))
    lam = rng.uniform(1.0, 2.0, size=rank) if eigenvalues is None else _spectrum(eigenvalues)
    if lam.size != rank:
        raise argument_error("eigenvalues", f"{rank} values (one per rank)", eigenvalues)
    return _rotate(orthonormal_columns(n, rank, seed=rng), lam)


def low_effective_rank(
    n: int, effective_rank: float, *, seed: Seed, tail_strength: float = 0.5
) -> FloatArray:
    r"""Return a PSD matrix with a smoothly decaying spectrum of the given effective rank.

    The eigenvalues follow the profile of :func:`sklearn.datasets.make_low_rank_matrix`,

    .. math:: \lambda_i = (1 - t)\,e^{-(i/r)^2} + t\,e^{-0.1\,i/r},\qquad i = 0,\dots,n-1,

    with :math:`r` = ``effective_rank`` and :math:`t` = ``tail_strength``, rotated by a
    Haar matrix. The bell-shaped head carries most of the trace; the exponential tail is
    the "fat" low-magnitude bulk typical of neural-network curvature.

    Parameters
    ----------
    n : int
        Dimension.
    effective_rank : float
        The scale :math:`r` of the bell-shaped head (> 0).
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).
    tail_strength : float
        Weight :math:`t \in [0, 1]` of the exponential tail.

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` positive definite matrix, largest eigenvalue 1.

    Examples
    --------
    >>> A = low_effective_rank(50, 5, seed=0)
    >>> lam = np.linalg.eigvalsh(A)
    >>> bool(lam.min() > 0) and bool(np.isclose(lam.max(), 1.0))
    True
    """
    n = _positive_int("n", n)
    if not (np.isfinite(effective_rank) and effective_rank > 0):
        raise argument_error("effective_rank", "a positive number", effective_rank)
    if not 0.0 <= tail_strength <= 1.0:
        raise argument_error("tail_strength", "a number in [0, 1]", tail_strength)
    i = np.arange(n, dtype=np.float64) / effective_rank
    lam = (1.0 - tail_strength) * np.exp(-(i**2)) + tail_strength * np.exp(-0.1 * i)
    return prescribed_spectrum(lam, seed=seed)


def wigner(n: int, *, seed: Seed, radius: float = 2.0) -> FloatArray:
    r"""Return an ``n × n`` GOE matrix; its spectrum tends to the semicircle on ``[-r, r]``.

    :math:`W = \tfrac{r}{2}(G + G^\top)/\sqrt{2n}` with :math:`G` standard Gaussian, so for
    ``radius`` :math:`r = 2` the off-diagonal entries have variance :math:`1/n` and the
    diagonal :math:`2/n`. See :func:`semicircle_pdf`.

    Parameters
    ----------
    n : int
        Dimension.
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).
    radius : float
        Radius :math:`r` of the limiting semicircle (> 0).

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` symmetric GOE matrix.

    Examples
    --------
    >>> W = wigner(400, seed=0)
    >>> bool(abs(np.linalg.eigvalsh(W).max() - 2.0) < 0.3)
    True
    """
    n = _positive_int("n", n)
    if not (np.isfinite(radius) and radius > 0):
        raise argument_error("radius", "a positive number", radius)
    g = _rng(seed).standard_normal((n, n))
    out: FloatArray = (g + g.T) * (radius / 2.0 / np.sqrt(2.0 * n))
    return out


def semicircle_pdf(x: ArrayLike, radius: float = 2.0) -> FloatArray:
    r"""Wigner's semicircle density :math:`\frac{2}{\pi r^2}\sqrt{r^2 - x^2}` on :math:`|x| \le r`.

    Its variance is :math:`r^2/4`; it integrates to 1.

    Parameters
    ----------
    x : array_like
        Points at which to evaluate the density.
    radius : float
        Radius :math:`r` of the support :math:`[-r, r]`.

    Returns
    -------
    numpy.ndarray
        float64 array of the shape of ``x`` (0 outside the support).

    Examples
    --------
    >>> float(semicircle_pdf(0.0))  # 1 / pi for r = 2
    0.3183...
    """
    if not (np.isfinite(radius) and radius > 0):
        raise argument_error("radius", "a positive number", radius)
    x = np.asarray(x, dtype=np.float64)
    out: FloatArray = 2.0 / (np.pi * radius**2) * np.sqrt(np.clip(radius**2 - x**2, 0.0, None))
    return out


def spiked_wigner(n: int, spikes: ArrayLike, *, seed: Seed) -> FloatArray:
    r"""Return :math:`W + \sum_k \theta_k u_k u_k^\top` with :math:`W` = :func:`wigner` (radius 2).

    The :math:`u_k` are Haar orthonormal. By the BBP transition, a spike :math:`\theta > 1`
    produces an outlier eigenvalue near :math:`\theta + 1/\theta` while spikes
    :math:`\theta \le 1` stay invisible in the bulk :math:`[-2, 2]`.

    Parameters
    ----------
    n : int
        Dimension.
    spikes : array_like
        The spike strengths :math:`\theta_k` (at most ``n``).
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` symmetric matrix.

    Examples
    --------
    >>> A = spiked_wigner(300, [4.0], seed=0)
    >>> bool(abs(np.linalg.eigvalsh(A)[-1] - 4.25) < 0.3)
    True
    """
    theta = _spectrum(spikes)
    n = _positive_int("n", n)
    if theta.size > n:
        raise argument_error("spikes", f"at most n = {n} values", spikes)
    rng = _rng(seed)
    w = wigner(n, seed=rng)
    return _symmetrise(w + _rotate(orthonormal_columns(n, theta.size, seed=rng), theta))


def wishart(n: int, num_samples: int, *, seed: Seed, variance: float = 1.0) -> FloatArray:
    r"""Return the ``n × n`` sample covariance :math:`X^\top X / p` of ``p`` Gaussian rows.

    Entries of :math:`X \in \mathbb{R}^{p \times n}` are i.i.d. :math:`N(0, \sigma^2)`. As
    :math:`n, p \to \infty` with :math:`n/p \to q` the spectrum follows the Marchenko–Pastur
    law (:func:`marchenko_pastur_pdf`). For large ``n`` prefer the matrix-free
    :func:`wishart_operator`.

    Parameters
    ----------
    n : int
        Dimension (number of variables).
    num_samples : int
        Number :math:`p` of Gaussian rows of :math:`X`.
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).
    variance : float
        Entry variance :math:`\sigma^2` (> 0).

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` symmetric positive semi-definite matrix.

    Examples
    --------
    >>> W = wishart(3, 10, seed=0)
    >>> W.shape, bool(np.all(np.linalg.eigvalsh(W) > 0))
    ((3, 3), True)
    """
    return wishart_operator(n, num_samples, seed=seed, variance=variance).to_dense()


def wishart_operator(
    n: int, num_samples: int, *, seed: Seed, variance: float = 1.0
) -> GramOperator:
    r"""Matrix-free :func:`wishart`: a :class:`GramOperator` for :math:`X^\top X / p`.

    A product costs :math:`4np` flops instead of :math:`2n^2`, and nothing of size
    :math:`n \times n` is formed; :meth:`GramOperator.eigenvalues` is exact and cheap when
    :math:`p \ll n`.

    Parameters
    ----------
    n : int
        Dimension (number of variables).
    num_samples : int
        Number :math:`p` of Gaussian rows of :math:`X`.
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).
    variance : float
        Entry variance :math:`\sigma^2` (> 0).

    Returns
    -------
    GramOperator
        The ``n x n`` operator :math:`X^\top X / p` with factor :math:`X/\sqrt p`.

    Examples
    --------
    >>> op = wishart_operator(6, 3, seed=0)
    >>> op.shape, int(np.sum(op.eigenvalues() > 1e-12))
    ((6, 6), 3)
    """
    n = _positive_int("n", n)
    p = _positive_int("num_samples", num_samples)
    if not (np.isfinite(variance) and variance > 0):
        raise argument_error("variance", "a positive number", variance)
    x = _rng(seed).standard_normal((p, n)) * np.sqrt(variance / p)
    return GramOperator(x)


class GramOperator(LinearOperator):
    r"""The symmetric PSD operator :math:`F^\top F` of a factor :math:`F` of shape ``(p, n)``.

    Products :math:`v \mapsto F^\top (F v)` cost :math:`4np` flops. The exact spectrum comes
    from the smaller of the Gram matrices :math:`F^\top F` and :math:`F F^\top` (they share
    their non-zero eigenvalues).

    Parameters
    ----------
    factor : array_like
        The non-empty, finite ``(p, n)`` factor :math:`F`; the operator is ``n x n``.

    Examples
    --------
    >>> op = GramOperator(np.array([[1.0, 0.0], [0.0, 2.0]]))
    >>> op.matvec(np.ones(2))
    array([1., 4.])
    >>> op.eigenvalues()
    array([1., 4.])
    """

    def __init__(self, factor: ArrayLike) -> None:
        f = np.asarray(factor, dtype=np.float64)
        if f.ndim != 2 or f.size == 0 or not np.all(np.isfinite(f)):
            raise argument_error("factor", "a non-empty finite 2-D array", factor)
        self.factor: FloatArray = f
        n = f.shape[1]
        super().__init__(dtype=np.dtype(np.float64), shape=(n, n))

    def _matvec(self, x: FloatArray) -> FloatArray:
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        out: FloatArray = self.factor.T @ (self.factor @ v)
        return out

    def _matmat(self, x: FloatArray) -> FloatArray:
        out: FloatArray = self.factor.T @ (self.factor @ np.asarray(x, dtype=np.float64))
        return out

    def _adjoint(self) -> GramOperator:
        return self

    def to_dense(self) -> FloatArray:
        """Return the dense ``n × n`` matrix :math:`F^\\top F` (exactly symmetric)."""
        return _symmetrise(self.factor.T @ self.factor)

    def eigenvalues(self) -> FloatArray:
        """Return all ``n`` eigenvalues in ascending order (float64).

        Zero eigenvalues (``n - p`` of them when ``p < n``) are returned as exact zeros.
        """
        p, n = self.factor.shape
        if p < n:
            small = scipy.linalg.eigvalsh(self.factor @ self.factor.T)
            lam = np.concatenate([np.zeros(n - p), np.clip(small, 0.0, None)])
        else:
            lam = np.clip(scipy.linalg.eigvalsh(self.to_dense()), 0.0, None)
        out: FloatArray = np.sort(lam)
        return out


def marchenko_pastur_support(ratio: float, variance: float = 1.0) -> tuple[float, float]:
    r"""Edges :math:`\sigma^2(1 \mp \sqrt{q})^2` of the Marchenko–Pastur law, :math:`q = n/p`.

    Parameters
    ----------
    ratio : float
        Aspect ratio :math:`q = n/p` (> 0).
    variance : float
        Entry variance :math:`\sigma^2` (> 0).

    Returns
    -------
    (float, float)
        The edges :math:`a \le b` of the continuous part.

    Examples
    --------
    >>> marchenko_pastur_support(0.25)
    (0.25, 2.25)
    """
    if not (np.isfinite(ratio) and ratio > 0):
        raise argument_error("ratio", "a positive number n / num_samples", ratio)
    if not (np.isfinite(variance) and variance > 0):
        raise argument_error("variance", "a positive number", variance)
    root = np.sqrt(ratio)
    return float(variance * (1.0 - root) ** 2), float(variance * (1.0 + root) ** 2)


def marchenko_pastur_atom(ratio: float) -> float:
    r"""Mass :math:`\max(0, 1 - 1/q)` of the Marchenko–Pastur atom at zero, :math:`q = n/p`.

    Parameters
    ----------
    ratio : float
        Aspect ratio :math:`q = n/p` (> 0).

    Returns
    -------
    float
        The mass at zero (0 for :math:`q \le 1`).

    Examples
    --------
    >>> marchenko_pastur_atom(4.0)
    0.75
    """
    if not (np.isfinite(ratio) and ratio > 0):
        raise argument_error("ratio", "a positive number n / num_samples", ratio)
    return float(max(0.0, 1.0 - 1.0 / ratio))


def marchenko_pastur_pdf(x: ArrayLike, ratio: float, variance: float = 1.0) -> FloatArray:
    r"""Continuous part of the Marchenko–Pastur density with ratio :math:`q = n/p`.

    .. math:: \rho(x) = \frac{\sqrt{(b - x)(x - a)}}{2\pi\sigma^2 q\,x},\qquad a \le x \le b,

    with :math:`[a, b]` from :func:`marchenko_pastur_support`. It integrates to
    :math:`\min(1, 1/q)`; for :math:`q > 1` the rest, :func:`marchenko_pastur_atom`, sits at 0.

    Parameters
    ----------
    x : array_like
        Points at which to evaluate the density.
    ratio : float
        Aspect ratio :math:`q = n/p` (> 0).
    variance : float
        Entry variance :math:`\sigma^2` (> 0).

    Returns
    -------
    numpy.ndarray
        float64 array of the shape of ``x`` (0 outside :math:`[a, b]`).

    Examples
    --------
    >>> float(marchenko_pastur_pdf(1.0, 0.25))
    0.6164...
    """
    a, b = marchenko_pastur_support(ratio, variance)
    x = np.asarray(x, dtype=np.float64)
    inside = (x > a) & (x < b) & (x > 0)
    safe = np.where(inside, x, 1.0)
    val = np.sqrt(np.clip((b - safe) * (safe - a), 0.0, None)) / (
        2.0 * np.pi * variance * ratio * safe
    )
    out: FloatArray = np.where(inside, val, 0.0)
    return out


def spiked_covariance(n: int, num_samples: int, spikes: ArrayLike, *, seed: Seed) -> FloatArray:
    r"""Sample covariance :math:`X^\top X/p` with population covariance :math:`I + U\Theta U^\top`.

    :math:`U` has Haar orthonormal columns and :math:`\Theta = \mathrm{diag}(\theta)`. With
    :math:`q = n/p`, a spike :math:`\theta > \sqrt{q}` produces an outlier near
    :math:`(1 + \theta)(1 + q/\theta)` above the Marchenko–Pastur edge :math:`(1 + \sqrt q)^2`
    (Baik–Ben Arous–Péché).

    Parameters
    ----------
    n : int
        Dimension.
    num_samples : int
        Number :math:`p` of samples.
    spikes : array_like
        The spikes :math:`\theta_k \ge 0` (at most ``n``).
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` symmetric positive semi-definite matrix.

    Examples
    --------
    >>> A = spiked_covariance(200, 800, [5.0], seed=0)
    >>> bool(abs(np.linalg.eigvalsh(A)[-1] - 6.3) < 0.8)
    True
    """
    theta = _spectrum(spikes)
    if np.any(theta <= -1.0):
        raise argument_error("spikes", "values > -1 (a positive definite covariance)", spikes)
    n = _positive_int("n", n)
    p = _positive_int("num_samples", num_samples)
    if theta.size > n:
        raise argument_error("spikes", f"at most n = {n} values", spikes)
    rng = _rng(seed)
    u = orthonormal_columns(n, theta.size, seed=rng)
    z = rng.standard_normal((p, n))
    # Sigma^{1/2} = I + U diag(sqrt(1 + theta) - 1) U^T
    x = z + ((z @ u) * (np.sqrt(1.0 + theta) - 1.0)) @ u.T
    return _symmetrise(x.T @ x / p)


def two_point(
    n: int, low: float, high: float, *, seed: Seed, fraction_high: float = 0.5
) -> FloatArray:
    r"""Haar rotation of a two-point spectrum: the diagonal concentrates at the mean.

    The spectrum has ``round(fraction_high * n)`` eigenvalues at ``high`` and the rest at
    ``low``. Each diagonal entry is :math:`\sum_j Q_{ij}^2 \lambda_j`, a weighted average of
    the spectrum with Dirichlet weights, so it concentrates at the mean
    :math:`\bar\lambda` with fluctuations :math:`O((\mathrm{high}-\mathrm{low})/\sqrt{n})`:
    the diagonal histogram is one narrow bump half-way between two atoms, and its
    Wasserstein distance to the spectrum grows linearly with the gap (Appendix C).

    Parameters
    ----------
    n : int
        Dimension.
    low, high : float
        The two eigenvalues.
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).
    fraction_high : float
        Fraction of the eigenvalues at ``high``, in :math:`[0, 1]`.

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` symmetric matrix.

    Examples
    --------
    >>> A = two_point(400, -1.0, 1.0, seed=0)
    >>> bool(np.abs(np.diag(A)).max() < 0.4)
    True
    """
    n = _positive_int("n", n)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise argument_error("low/high", "finite numbers", (low, high))
    if not 0.0 <= fraction_high <= 1.0:
        raise argument_error("fraction_high", "a number in [0, 1]", fraction_high)
    k = round(fraction_high * n)
    lam = np.concatenate([np.full(n - k, float(low)), np.full(k, float(high))])
    return prescribed_spectrum(lam, seed=seed)


def constant_diagonal(eigenvalues: ArrayLike, *, seed: Seed) -> FloatArray:
    r"""A symmetric matrix with the given spectrum whose diagonal is *exactly* constant.

    With :math:`H` a normalised Sylvester–Hadamard matrix (:math:`H_{ij}^2 = 1/n`) and
    :math:`D` a random sign matrix, :math:`A = D H \mathrm{diag}(\lambda) H^\top D` has
    :math:`a_{ii} = \sum_j H_{ij}^2\lambda_j = \bar\lambda` for every :math:`i` whatever the
    spectrum (a Schur–Horn extreme case). Any diagonal-based spectral estimate sees a single
    atom at the mean. ``len(eigenvalues)`` must be a power of two.

    Parameters
    ----------
    eigenvalues : array_like
        The spectrum; its length must be a power of two.
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` symmetric matrix whose diagonal entries all equal the mean
        eigenvalue.

    Examples
    --------
    >>> A = constant_diagonal([0.0, 0.0, 0.0, 8.0], seed=0)
    >>> np.diag(A)
    array([2., 2., 2., 2.])
    """
    lam = _spectrum(eigenvalues)
    n = lam.size
    if n & (n - 1):
        raise argument_error("eigenvalues", "a number of values that is a power of two", n)
    h = scipy.linalg.hadamard(n).astype(np.float64) / np.sqrt(n)
    signs = _rng(seed).choice(np.array([-1.0, 1.0]), size=n)
    return _rotate(h * signs[:, None], lam)


def flat_rank_one(n: int, value: float, *, seed: Seed) -> FloatArray:
    r"""The rank-one matrix :math:`\theta\,u u^\top` with a flat :math:`u_i = \pm 1/\sqrt{n}`.

    The spectrum is :math:`\{\theta, 0, \dots, 0\}` but every diagonal entry equals
    :math:`\theta/n`: the diagonal misses the outlier completely (as the paper's Diag-GGN
    misses the largest Hessian outlier).

    Parameters
    ----------
    n : int
        Dimension.
    value : float
        The non-zero eigenvalue.
    seed : int or numpy.random.Generator
        Source of the randomness (the same seed gives the same matrix).

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)`` rank-one matrix.

    Examples
    --------
    >>> A = flat_rank_one(4, 8.0, seed=0)
    >>> np.diag(A), float(np.linalg.eigvalsh(A)[-1])
    (array([2., 2., 2., 2.]), 8.0)
    """
    n = _positive_int("n", n)
    if not np.isfinite(value):
        raise argument_error("value", "a finite number", value)
    u = _rng(seed).choice(np.array([-1.0, 1.0]), size=n) / np.sqrt(n)
    return _symmetrise(float(value) * np.outer(u, u))
