r"""Matrix-free trace, diagonal and Frobenius-norm estimation.

All estimators see ``A`` only through block products ``A @ X`` in the operator's own array
namespace and device; only ``k``-vectors and ``k × k`` matrices reach the host (float64).
Probes :math:`\omega` satisfy :math:`\mathbb{E}[\omega\omega^\top] = I` (Rademacher, Gaussian,
or spherical probes scaled to norm :math:`\sqrt n`).

* **Hutchinson**: :math:`\widehat{\mathrm{tr}} = \frac1N\sum_{k}\omega_k^\top A\omega_k`, unbiased,
  with variance :math:`2(\|A\|_F^2 - \sum_i a_{ii}^2)/N` for Rademacher and
  :math:`2\|A\|_F^2/N` for Gaussian probes.
* **Hutch++** (Meyer, Musco, Musco, Woodruff 2021): with ``N`` products, sketch
  :math:`Q = \mathrm{orth}(AS)` from :math:`N/3` probes, take :math:`\mathrm{tr}(Q^\top A Q)`
  exactly and apply Hutchinson with the remaining :math:`N/3` probes to the deflated
  :math:`(I - QQ^\top)A(I - QQ^\top)`. Exact (to rounding) when :math:`\mathrm{rank}(A) \le N/3`
  and the sketch :math:`AS` has the rank of :math:`A` (almost surely for Gaussian and spherical
  probes; Rademacher probes on a matrix supported on a few coordinates can repeat there up
  to sign);
  error :math:`O(1/N)` instead of :math:`O(1/\sqrt N)` for fast-decaying spectra.
* **XTrace** (Epperly, Tropp, Webber 2024): the exchangeable version of Hutch++ using all
  :math:`N/2` probes both for the sketch and for the residual; for each probe :math:`i`,
  :math:`Q_{(i)} = \mathrm{orth}(A\Omega_{-i})` and
  :math:`t_i = \mathrm{tr}(Q_{(i)}^\top A Q_{(i)}) + \omega_i^\top (I - Q_{(i)}Q_{(i)}^\top) A
  (I - Q_{(i)}Q_{(i)}^\top)\omega_i`; the estimate is :math:`\frac{1}{N/2}\sum_i t_i`, computed
  with ``N`` products through rank-one downdates of one QR factorisation (by the definition,
  one small SVD per probe, when the sketch loses rank). Exact when
  :math:`\mathrm{rank}(A) < N/2` and every :math:`A\Omega_{-i}` has the rank of :math:`A`
  (almost surely for Gaussian and spherical probes, as for Hutch++).
* **SLQ**: :math:`n\sum_i w_i\theta_i` averaged over probes (:func:`spectral.slq`);
  for a plain trace it only repeats Hutchinson at a higher cost, but it shares the run with
  a spectral density.

>>> import numpy as np
>>> A = np.diag(np.arange(1.0, 7.0))
>>> est = trace(A, method="hutch++", num_matvecs=18, seed=0)  # rank 6 <= 18 / 3: exact
>>> round(est.value, 8), est.method
(21.0, 'hutch++')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from spectral import _backend
from spectral.errors import NumericalError, argument_error
from spectral.operator import SymmetricOperator, as_operator
from spectral.probes import PROBE_KINDS, as_generator, random_probes
from spectral.quadrature import slq

__all__ = ["TRACE_METHODS", "TraceEstimate", "diagonal", "frobenius_norm_squared", "trace"]

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "slq")
DIAGONAL_METHODS = ("hutchinson", "exact")
#: Largest number of vector entries (n × columns) held in one block of probes.
_BLOCK_ENTRIES = 2**23

Seed = int | np.random.Generator | None


@dataclass(frozen=True)
class TraceEstimate:
    r"""A stochastic estimate of a trace-like quantity.

    Attributes
    ----------
    value:
        The estimate.
    stderr:
        Its estimated standard error :math:`s/\sqrt N`, with :math:`s` the sample standard
        deviation of the ``N`` terms the estimate averages; NaN when it cannot be estimated
        (a single term). For Hutchinson and SLQ the terms are i.i.d. and this is the usual
        standard error. For Hutch++ it covers the Hutchinson part and the rounding of the
        sketched part (computed exactly given the sketch, up to rounding of about
        :math:`\sqrt n\,\varepsilon\,\|Aq_i\|` per sketch vector, added in quadrature:
        without it, on an exactly low-rank ``A`` the 95 % interval missed the trace 42-48 %
        of the time, its width then being the rounding of the deflated terms alone). For
        XTrace it is the error estimate of Epperly, Tropp and Webber (2024), the same formula
        applied to the ``N = N_{mv}/2``
        leave-one-out terms :math:`t_i`; those are exchangeable but correlated (any two share
        :math:`N - 2` sketch probes), not independent, so it is a heuristic for the size of
        the error, not a standard error with a known sampling law, and it tends to be low:
        over 1000 seeds at ``n = 200`` (flat and decaying spectra) it averaged 0.76 to 0.91
        of the true standard deviation with 12 products and 0.64 to 0.68 with 120, where a
        95 % t-interval would have covered 79 % to 83 % of the time. :meth:`interval`
        therefore gives XTrace no confidence interval.
    num_matvecs:
        Products with ``A`` used.
    method:
        The estimator's name.
    num_samples:
        The number ``N`` of terms behind ``stderr``: i.i.d. except for ``"xtrace"``
        (exchangeable leave-one-out terms); ``None``: unknown.

    Examples
    --------
    >>> t = TraceEstimate(3.0, 0.1, 10, "hutchinson")
    >>> float(t), t.interval(2.0)
    (3.0, (2.8, 3.2))
    >>> lo, hi = TraceEstimate(3.0, 0.1, 4, "hutchinson", num_samples=4).interval()
    >>> round(hi - 3.0, 4)  # Student's t, 3 degrees of freedom: 3.1824 * 0.1
    0.3182
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str
    num_samples: int | None = None

    def __float__(self) -> float:
        return float(self.value)

    def interval(self, z: float | None = None, *, confidence: float = 0.95) -> tuple[float, float]:
        r"""The interval ``value ± q * stderr``.

        With ``z`` given, ``q = z``: plain arithmetic, with no coverage claimed. Otherwise
        ``q`` is the two-sided ``confidence`` quantile of Student's t with :math:`N - 1`
        degrees of freedom (:math:`N` = :attr:`num_samples`, e.g. 3.18 for ``N = 4`` at
        95%). For i.i.d. normal terms the interval then has exactly that coverage. For other
        i.i.d. terms the coverage is approximate (central limit theorem) and is not
        guaranteed for small :math:`N`. For Hutch++ the terms are those of its Hutchinson
        part. When :attr:`num_samples` is unknown the normal quantile is used (1.96 at 95%).
        With fewer than two terms ``stderr`` is NaN, and so is the interval.

        XTrace's terms are not independent and its ``stderr`` is a heuristic that runs low
        (see :class:`TraceEstimate`), so a confidence interval is refused for
        ``method="xtrace"``: use ``"hutch++"`` or ``"hutchinson"`` for one.

        Raises
        ------
        ValueError
            ``confidence`` is not strictly between 0 and 1, or ``z`` is not given for an
            XTrace estimate.

        Examples
        --------
        >>> TraceEstimate(3.0, 0.1, 8, "xtrace", num_samples=4).interval()
        Traceback (most recent call last):
        ...
        ValueError: Argument 'method': expected an estimate of method 'hutchinson', 'hutch++' ...
        """
        if z is None and self.method == "xtrace":
            raise argument_error(
                "method",
                "an estimate of method 'hutchinson', 'hutch++' or 'slq' for a confidence "
                "interval (XTrace's leave-one-out terms are correlated, and its stderr is a "
                "heuristic error estimate that can be well below the true standard deviation: "
                "no coverage can be stated; rerun trace with method='hutch++' or "
                "'hutchinson', or pass z for the plain value ± z * stderr)",
                self.method,
            )
        if z is None:
            if not (isinstance(confidence, float | int) and 0.0 < float(confidence) < 1.0):
                raise argument_error("confidence", "a number strictly between 0 and 1", confidence)
            from scipy import stats

            level = 0.5 + 0.5 * float(confidence)
            if self.num_samples is not None and self.num_samples >= 2:
                z = float(stats.t.ppf(level, self.num_samples - 1))
            else:
                z = float(stats.norm.ppf(level))
        return (self.value - z * self.stderr, self.value + z * self.stderr)


# ---------------------------------------------------------------------- helpers
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise argument_error(name, f"an integer >= {minimum}", value, kind=TypeError)
    if value < minimum:
        raise argument_error(name, f"an integer >= {minimum}", value)
    return int(value)


def _check_probe(probe: str) -> str:
    if probe not in PROBE_KINDS:
        raise argument_error("probe", f"one of {PROBE_KINDS}", probe)
    return probe


def _probes(op: SymmetricOperator, k: int, probe: str, rng: np.random.Generator) -> Any:
    """``k`` probes with ``E[w w^T] = I`` as the ``n × k`` columns of an array like ``op``."""
    X = random_probes(op.n, k, probe, rng, like=op.template)
    if probe == "sphere":
        X = X * math.sqrt(op.n)
    return X


def _column_dots(op: SymmetricOperator, X: Any, Y: Any) -> np.ndarray:
    """Host float64 vector of the column inner products ``x_j^T y_j``."""
    return _backend.to_host_float64(op.xp.sum(X * Y, axis=0))


def _blocks(n: int, total: int) -> list[int]:
    size = max(1, min(total, _BLOCK_ENTRIES // max(1, n)))
    sizes = [size] * (total // size)
    if total % size:
        sizes.append(total % size)
    return sizes


def _mean_stderr(samples: np.ndarray) -> tuple[float, float]:
    r"""Mean and standard error, computed on the samples scaled by :math:`2^{-e}` with
    :math:`2^{e-1} \le \max|x_i| < 2^e` (exact, ``numpy.ldexp``: the factor itself need not
    be representable, as for samples of :math:`2^{1023}` and more), so that neither
    overflows for huge operators; a result beyond the float64 range is infinite."""
    samples = np.asarray(samples, dtype=np.float64)
    largest = float(np.max(np.abs(samples))) if samples.size else 0.0
    exponent = math.frexp(largest)[1] if 0.0 < largest < math.inf else 0
    scaled = np.ldexp(samples, -exponent)
    with np.errstate(over="ignore"):
        mean = float(np.ldexp(np.mean(scaled), exponent))
        if samples.size < 2:
            return mean, math.nan
        spread = np.std(scaled, ddof=1) / math.sqrt(samples.size)
        return mean, float(np.ldexp(spread, exponent))


def _hutchinson_samples(
    op: SymmetricOperator, num: int, probe: str, rng: np.random.Generator
) -> np.ndarray:
    out = []
    for size in _blocks(op.n, num):
        X = _probes(op, size, probe, rng)
        out.append(_column_dots(op, X, op.matmat(X)))
    return np.concatenate(out)


class _Scaled:
    """``op`` times :math:`2^{-e}`, with :math:`e` fixed by the largest entry of the first
    product, and every product checked for NaN/Inf (before and after the scaling; with
    ``scale=False`` the products are only checked).

    Power-of-two scaling is exact, so the estimators below run on values of order one
    whatever the operator's scale (without it, xtrace was 62 % off at a scale of
    :math:`2^{-520}` and NaN at :math:`2^{600}`, and float32 Frobenius norms of
    :math:`10^{-25}` underflowed to 0); the results are scaled back by :math:`2^e`.
    """

    def __init__(self, op: SymmetricOperator, what: str, *, scale: bool = True) -> None:
        self.base, self.what = op, what
        self.exponent: int | None = None if scale else 0
        self.products = 0
        self.op = SymmetricOperator(
            self._apply_vector,
            template=op.template,
            matmat=self._apply,
            source=op.source,
            eps=op.eps,
            protect_input=False,  # the products of ``op`` itself protect their input
        )

    @property
    def factor(self) -> float:
        """:math:`2^e`, the factor the scaled results are multiplied by."""
        return math.ldexp(1.0, self.exponent or 0)

    def _scaled(self, Y: Any, count: int) -> Any:
        xp = self.base.xp
        if not bool(xp.all(xp.isfinite(Y))):
            raise NumericalError(
                f"{self.what}: a product of the operator returned NaN or Inf "
                f"(products {self.products + 1}-{self.products + count})."
            )
        self.products += count
        if self.exponent is None:
            largest = float(xp.max(xp.abs(Y))) if Y.shape[0] else 0.0
            # 2^e and 2^-e representable in the operator's dtype
            limit = math.frexp(float(xp.finfo(self.base.dtype).max))[1] - 4
            exponent = math.frexp(largest)[1] - 1 if largest > 0 else 0
            self.exponent = max(-limit, min(limit, exponent))
        if not self.exponent:
            return Y
        out = Y * math.ldexp(1.0, -self.exponent)
        if not bool(xp.all(xp.isfinite(out))):  # a later product far above the first one
            raise NumericalError(
                f"{self.what}: products {self.products - count + 1}-{self.products} exceed the "
                f"first one's scale (2^{self.exponent}) by more than the dtype's range; the "
                "operator's products span more than its floating-point range."
            )
        return out

    def _apply(self, X: Any) -> Any:
        return self._scaled(self.base.matmat(X), int(X.shape[1]))

    def _apply_vector(self, x: Any) -> Any:
        return self._scaled(self.base.matvec(x), 1)


def _scaled_estimate(estimate: TraceEstimate, factor: float, power: int = 1) -> TraceEstimate:
    """``estimate`` times ``factor ** power`` (multiplied ``power`` times: overflows to inf)."""
    value, stderr = estimate.value, estimate.stderr
    for _ in range(power):
        value, stderr = value * factor, stderr * factor
    return TraceEstimate(value, stderr, estimate.num_matvecs, estimate.method, estimate.num_samples)


# ---------------------------------------------------------------------- estimators
def _hutchinson(
    op: SymmetricOperator, num: int, probe: str, rng: np.random.Generator
) -> TraceEstimate:
    value, stderr = _mean_stderr(_hutchinson_samples(op, num, probe, rng))
    return TraceEstimate(value, stderr, num, "hutchinson", num)


def _hutchpp(
    op: SymmetricOperator, num: int, probe: str, rng: np.random.Generator
) -> TraceEstimate:
    if num < 3:
        raise argument_error("num_matvecs", "an integer >= 3 for method='hutch++'", num)
    xp = op.xp
    k = num // 3
    S = _probes(op, k, probe, rng)
    Q, _ = xp.linalg.qr(op.matmat(S))
    AQ = op.matmat(Q)
    sketched = float(np.sum(_column_dots(op, Q, AQ)))
    # the sketched part carries rounding the sample variance cannot see (the whole error
    # when rank(A) <= k): each q^T (A q) is rounded like sqrt(n) eps ||A q|| (probabilistic
    # rounding, for the product and the dot product alike), taken as a standard deviation
    rounding = 2.0 * math.sqrt(op.n) * op.eps * float(np.sum(np.sqrt(_column_dots(op, AQ, AQ))))
    samples = []
    for size in _blocks(op.n, num - 2 * k):
        G = _probes(op, size, probe, rng)
        G = G - Q @ (Q.T @ G)
        samples.append(_column_dots(op, G, op.matmat(G)))
    terms = np.concatenate(samples)
    rest, stderr = _mean_stderr(terms)
    return TraceEstimate(sketched + rest, math.hypot(stderr, rounding), num, "hutch++", terms.size)


def _downdate_directions(R: np.ndarray) -> np.ndarray:
    r"""Unit vectors :math:`s_i` with :math:`\mathrm{range}(Y_{-i}) = Q\,(s_i^\perp)` (columns).

    For ``Y = QR`` with ``R`` square and invertible, :math:`s_i \propto R^{-\top} e_i` is
    orthogonal to every column of ``R`` but the ``i``-th. It is computed from the SVD
    :math:`R = U\Sigma V^\top` as :math:`U\Sigma^{-1}V^\top e_i`, with singular values floored
    at :math:`\varepsilon^2\sigma_{\max}`: when ``A`` has rank below ``m`` the tiny singular
    values belong to directions of ``Q`` outside :math:`\mathrm{range}(A)`, so removing them
    keeps the estimator exact, while an ill-conditioned full-rank ``R`` is inverted as is (no
    thresholding, hence no bias). When ``R`` has fewer rows than columns (``m > n``), every
    :math:`Y_{-i}` spans :math:`\mathrm{range}(Y)` and :math:`s_i = 0`.
    """
    r, m = R.shape
    if r < m:
        return np.zeros((r, m))
    U, sv, Vt = np.linalg.svd(R)
    if sv[0] == 0.0:  # A vanishes on the sketch: any orthonormal directions do
        S = U @ Vt
    else:
        floor = sv[0] * np.finfo(np.float64).eps ** 2
        S = (U / np.maximum(sv, floor)) @ Vt
    out: np.ndarray = S / np.linalg.norm(S, axis=0, keepdims=True)
    return out


def _leave_one_out_terms(
    R: np.ndarray, H: np.ndarray, W: np.ndarray, omega_a_omega: np.ndarray, tol: float
) -> np.ndarray:
    r"""XTrace's terms :math:`t_i` by their definition, for a rank-deficient sketch.

    :math:`\mathrm{range}(A\Omega_{-i}) = Q\,\mathrm{range}(R_{-i})`, so
    :math:`Q_{(i)} = Q B_i` with :math:`B_i` an orthonormal basis of the columns of
    :math:`R_{-i}` (singular values above ``tol``), and with :math:`H = Q^\top A Q`,
    :math:`w_i = Q^\top\omega_i`, :math:`b_i = B_i^\top w_i`:
    :math:`t_i = \mathrm{tr}(B_i^\top H B_i) + \omega_i^\top A\omega_i
    - 2 R_{:,i}^\top B_i b_i + b_i^\top B_i^\top H B_i\, b_i`.  The rank-one downdates
    (:func:`_downdate_directions`) assume every :math:`A\Omega_{-i}` spans
    :math:`\mathrm{range}(A\Omega)`; Rademacher probes on a matrix supported on a few
    coordinates often repeat there up to sign, and the estimate was biased (mean 6.05
    for a trace of 6, z = 16 over 10,000 seeds).  :math:`O(m)` SVDs of
    :math:`r \times (m - 1)` matrices on the host.
    """
    m = R.shape[1]
    terms = np.empty(m)
    for i in range(m):
        U, sv, _ = np.linalg.svd(np.delete(R, i, axis=1), full_matrices=False)
        B = U[:, sv > tol]
        b = B.T @ W[:, i]
        HB = B.T @ H @ B
        terms[i] = np.trace(HB) + omega_a_omega[i] - 2.0 * R[:, i] @ (B @ b) + b @ HB @ b
    return terms


def _xtrace(op: SymmetricOperator, num: int, probe: str, rng: np.random.Generator) -> TraceEstimate:
    if num < 4:
        raise argument_error("num_matvecs", "an integer >= 4 for method='xtrace'", num)
    xp = op.xp
    m = num // 2
    Omega = _probes(op, m, probe, rng)
    Y = op.matmat(Omega)
    Q, R_ns = xp.linalg.qr(Y)
    Z = op.matmat(Q)
    R = _backend.to_host_float64(R_ns)  # (r, m), r = min(n, m); Q^T Y = R = Q^T A Omega
    H = _backend.to_host_float64(Q.T @ Z)
    H = 0.5 * (H + H.T)  # Q^T A Q
    W = _backend.to_host_float64(Q.T @ Omega)  # (r, m)
    omega_a_omega = _column_dots(op, Omega, Y)  # omega_i^T A omega_i
    sv = np.linalg.svd(R, compute_uv=False)
    tol = 10.0 * max(R.shape) * op.eps * float(sv[0]) if sv.size else 0.0
    # Y = A Omega loses rank (with m > n and full row rank, Q spans everything: exact below)
    if not sv.size or sv[-1] <= tol:
        terms = _leave_one_out_terms(R, H, W, omega_a_omega, tol)
        value, stderr = _mean_stderr(terms)
        return TraceEstimate(value, stderr, 2 * m, "xtrace", int(terms.size))
    # Everything below is m x m on the host. A symmetric gives Z^T Omega = Q^T A Omega = R,
    # so omega_i^T A Q = R[:, i]^T; with u_i = omega_i - Q W_i + c_i Q s_i,
    # A u_i = Y_i - Z W_i + c_i Z s_i and u_i^T A u_i needs only R, H, W and s_i.
    S = _downdate_directions(R)
    c = np.einsum("ij,ij->j", S, W)  # c_i = s_i^T W_i
    HS = H @ S
    HW = H @ W
    tr_sketch = np.trace(H) - np.einsum("ij,ij->j", S, HS)
    # u_i = (I - P_i) omega_i with P_i = Q (I - s_i s_i^T) Q^T; A u_i via Y, Z.
    q_a_u = R - HW + HS * c  # Q^T A u_i, columns
    omega_a_u = omega_a_omega - np.einsum("ij,ij->j", R, W) + c * np.einsum("ij,ij->j", R, S)
    u_a_u = omega_a_u - np.einsum("ij,ij->j", W, q_a_u) + c * np.einsum("ij,ij->j", S, q_a_u)
    value, stderr = _mean_stderr(tr_sketch + u_a_u)
    return TraceEstimate(value, stderr, 2 * m, "xtrace", int(np.size(u_a_u)))


def _slq_trace(
    op: SymmetricOperator, num: int, probe: str, rng: np.random.Generator, num_iters: int
) -> TraceEstimate:
    m = min(num_iters, op.n)
    probes = num // m
    if probes < 1:
        raise argument_error(
            "num_matvecs",
            f"at least num_iters = {m} products for method='slq' (num_matvecs // num_iters "
            "probes of num_iters Lanczos steps each; lower num_iters or raise num_matvecs)",
            num,
        )
    density = slq(op, m, num_probes=probes, probe=probe, seed=rng)
    samples = op.n * density.probe_expectations(lambda x: x)
    value, stderr = _mean_stderr(samples)
    return TraceEstimate(value, stderr, probes * m, "slq", int(np.size(samples)))


def trace(
    A: Any,
    *,
    method: str = "hutch++",
    num_matvecs: int = 60,
    probe: str = "rademacher",
    seed: Seed = None,
    num_iters: int = 10,
) -> TraceEstimate:
    r"""Estimate :math:`\mathrm{tr}(A)` of a symmetric operator from matrix-vector products.

    Parameters
    ----------
    A:
        Anything :func:`spectral.operator.as_operator` accepts.
    method:
        ``"hutchinson"``, ``"hutch++"`` (default), ``"xtrace"`` or ``"slq"`` (see the module
        docstring for the estimators and their exactness).
    num_matvecs:
        Budget ``N`` of products with ``A`` (>= 1; >= 3 for Hutch++, >= 4 for XTrace, which
        uses the largest even number <= N). For ``"slq"``: ``N // num_iters`` probes of
        ``num_iters`` Lanczos steps (``num_iters`` capped at ``n``), so ``N >= num_iters``.
    probe:
        ``"rademacher"`` (default: the smallest variance among the three), ``"gaussian"``
        or ``"sphere"`` (scaled to norm :math:`\sqrt n`).
    seed:
        Integer or :class:`numpy.random.Generator`; the same seed gives the same probes on
        every backend.
    num_iters:
        Lanczos steps per probe for ``method="slq"`` only.

    Returns
    -------
    TraceEstimate

    Raises
    ------
    ValueError, TypeError
        Unknown method/probe, or a budget too small for the method.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.diag([1.0, 2.0, 3.0])
    >>> trace(A, method="hutchinson", num_matvecs=4, seed=0).value  # Rademacher on a diagonal
    6.0
    >>> round(trace(A, method="xtrace", num_matvecs=8, seed=0, probe="gaussian").value, 10)
    6.0
    """
    if method not in TRACE_METHODS:
        raise argument_error("method", f"one of {TRACE_METHODS}", method)
    op = as_operator(A)
    num = _check_int("num_matvecs", num_matvecs, 1)
    probe = _check_probe(probe)
    rng = as_generator(seed)
    scaled = _Scaled(op, "trace")
    if method == "slq":
        iters = _check_int("num_iters", num_iters, 1)
        estimate = _slq_trace(scaled.op, num, probe, rng, iters)
    else:
        estimator = {"hutchinson": _hutchinson, "hutch++": _hutchpp, "xtrace": _xtrace}[method]
        estimate = estimator(scaled.op, num, probe, rng)
    return _scaled_estimate(estimate, scaled.factor)


def diagonal(
    A: Any,
    *,
    method: str = "hutchinson",
    num_matvecs: int = 60,
    probe: str = "rademacher",
    seed: Seed = None,
) -> Any:
    r"""Estimate (or compute) the diagonal of ``A``, returned in the operator's namespace.

    ``"hutchinson"`` (Bekas, Kokiopoulou, Saad 2007):
    :math:`\hat d = \sum_k \omega_k \odot A\omega_k \,\big/\, \sum_k \omega_k\odot\omega_k`
    with ``num_matvecs`` probes; with Rademacher probes the denominator is ``N`` and
    :math:`\mathrm{Var}(\hat d_i) = \sum_{j\ne i} a_{ij}^2 / N`. ``"exact"`` applies ``A`` to
    the columns of the identity in blocks: ``n`` products (``num_matvecs``, ``probe`` and
    ``seed`` are ignored).

    The paper's point (Appendix C, :mod:`spectral.synthetic`) is that a histogram of the
    diagonal is *not* a spectral density: use it for preconditioning, not for spectra.

    Returns
    -------
    A length-``n`` vector in the operator's namespace, device and dtype.

    Parameters
    ----------
    A : operator or array
        Anything :func:`spectral.as_operator` accepts.
    method : str
        ``"hutchinson"`` (default) or ``"exact"``.
    num_matvecs : int
        Number :math:`N` of probes (products) for ``"hutchinson"``.
    probe : str
        ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
    seed : int, numpy.random.Generator or None
        Source of the probes (the same seed gives the same probes on every backend).

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[2.0, 1.0], [1.0, 3.0]])
    >>> diagonal(A, method="exact").tolist()
    [2.0, 3.0]
    """
    if method not in DIAGONAL_METHODS:
        raise argument_error("method", f"one of {DIAGONAL_METHODS}", method)
    if method == "exact":  # each entry read as it is: no common scaling, which over- and
        # underflowed entries of blocks far from the first one's scale (1e20 came back inf)
        checked = _Scaled(as_operator(A), "diagonal", scale=False)
        op, xp = checked.op, checked.op.xp
        parts = []
        start = 0
        for size in _blocks(op.n, op.n):
            E = xp.eye(op.n, size, k=-start, dtype=op.dtype, device=op.device)
            parts.append(xp.sum(E * op.matmat(E), axis=0))
            start += size
        return xp.concat(parts) if len(parts) > 1 else parts[0]
    scaled = _Scaled(as_operator(A), "diagonal")
    op, xp = scaled.op, scaled.op.xp
    num = _check_int("num_matvecs", num_matvecs, 1)
    probe = _check_probe(probe)
    rng = as_generator(seed)
    numerator = xp.zeros((op.n,), dtype=op.dtype, device=op.device)
    denominator = xp.zeros((op.n,), dtype=op.dtype, device=op.device)
    for size in _blocks(op.n, num):
        X = _probes(op, size, probe, rng)
        numerator = numerator + xp.sum(X * op.matmat(X), axis=1)
        denominator = denominator + xp.sum(X * X, axis=1)
    return numerator / denominator * scaled.factor


def frobenius_norm_squared(
    A: Any, *, num_matvecs: int = 30, probe: str = "rademacher", seed: Seed = None
) -> TraceEstimate:
    r"""Estimate :math:`\|A\|_F^2 = \mathrm{tr}(A^\top A) = \mathbb{E}\,\|A\omega\|^2`.

    Hutchinson on :math:`A^\top A` with ``num_matvecs`` products (one per probe); with
    Rademacher probes the variance is :math:`2(\|A^2\|_F^2 - \sum_i (A^2)_{ii}^2)/N`.

    Parameters
    ----------
    A : operator or array
        Anything :func:`spectral.as_operator` accepts.
    num_matvecs : int
        Number :math:`N` of probes (products).
    probe : str
        ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
    seed : int, numpy.random.Generator or None
        Source of the probes (the same seed gives the same probes on every backend).

    Returns
    -------
    TraceEstimate
        The estimate of :math:`\|A\|_F^2` and its standard error.

    Examples
    --------
    >>> import numpy as np
    >>> est = frobenius_norm_squared(np.diag([1.0, 2.0]), num_matvecs=3, seed=0)
    >>> est.value, est.stderr
    (5.0, 0.0)
    """
    scaled = _Scaled(as_operator(A), "frobenius_norm_squared")
    op = scaled.op
    num = _check_int("num_matvecs", num_matvecs, 1)
    probe = _check_probe(probe)
    rng = as_generator(seed)
    samples = []
    for size in _blocks(op.n, num):
        AX = op.matmat(_probes(op, size, probe, rng))
        samples.append(_column_dots(op, AX, AX))
    terms = np.concatenate(samples)
    value, stderr = _mean_stderr(terms)
    estimate = TraceEstimate(value, stderr, num, "hutchinson", int(terms.size))
    return _scaled_estimate(estimate, scaled.factor, 2)
