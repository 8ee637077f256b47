r"""The symmetric Lanczos process on any operator, in the operator's own array namespace.

Starting from ``q_1 = v_0 / \|v_0\|``, ``m`` steps of

.. math::

    \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},
    \qquad \alpha_j = q_j^T A q_j,\quad \beta_j = \|\beta_j q_{j+1}\|

build an orthonormal basis ``Q_m = [q_1 .. q_m]`` of the Krylov space
``K_m(A, v_0)`` and the tridiagonal ``T_m = Q_m^T A Q_m`` with
``A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^T``.  Vectors and the basis stay in the
operator's namespace and device (numpy, torch on any device, cupy,
``array_api_strict``); only ``alpha``/``beta`` go to the host, as float64, one
transfer of two scalars per step.

Reorthogonalisation (``reorth``):

* ``"full"``: after the three-term step, classical Gram-Schmidt against all
  previous vectors applied twice (CGS2), each pass two blocked products
  ``c = Q^T w`` and ``w <- w - Q c``; keeps ``\|Q^TQ - I\| = O(eps)``.
* ``"none"``: the plain three-term recurrence.  Orthogonality is lost as Ritz
  values converge and "ghost" copies of them appear; Gauss quadrature
  (and hence SLQ) stays accurate.  The only mode allowed with ``store_basis=False``.
* ``"partial"`` (Simon, 1984): the recurrence of Paige/Simon estimates
  ``\omega_{j+1,k} \approx q_{j+1}^T q_k`` on the host in O(j) per step; when
  ``max_k |\omega_{j+1,k}| > \sqrt{eps}`` the new vector and the next one are
  fully reorthogonalised (CGS2) and the estimates reset to ``eps\sqrt{n}``.
  Keeps orthogonality at the semi-orthogonal level ``\sqrt{eps}``.
* ``"selective"`` (Parlett and Scott, 1979): at every step the Ritz pairs of
  ``T_j`` whose residual bound ``\beta_j |s_{ji}|`` is below
  ``\sqrt{eps}\,\|T_j\|`` are declared converged and the new vector is
  orthogonalised (twice) against all converged Ritz vectors ``y_i = Q_j s_i``.
  Prevents ghosts of converged Ritz values.  By Paige's theorem that is where
  orthogonality is lost while every ``\beta_j`` is of the size of ``\|A\|``; it is
  not enough when the Krylov space is nearly invariant (``\beta_j`` small but above
  the breakdown level): rounding errors divided by ``\beta_j`` then put large
  components along basis directions that no converged Ritz vector covers (measured
  before this safeguard: ``\|Q^TQ - I\| = 36`` and Ritz values in ``[-15.6, 18.5]``
  for a spectrum in ``[1, 10]``).  Selective mode therefore also keeps Simon's
  estimates ``\omega_{j+1,k}``, projected as the vector is (with ``Y = Q_j S_c``,
  ``Q_j^T (I - YY^T) w = (I - S_c S_c^T) Q_j^T w`` for a semi-orthogonal ``Q_j``),
  and falls back on the safeguard of ``"partial"`` (CGS2 of this vector and the next)
  when ``max_k |\omega_{j+1,k}| > \sqrt{eps}``: the basis stays semi-orthogonal.
  Because the converged directions are removed from the estimates, this triggers far
  less often than in ``"partial"``: for ``n = 1000``, ``m = 80`` from a random start,
  0 times on ``linspace(0, 1)``, a bulk with 3 outliers and ``geomspace(1e-4, 1e2)``
  and once on a Gaussian spectrum (``"partial"``: 0, 15, 2 and 2 times).
* an integer ``k >= 1``: local reorthogonalisation (CGS2) against the last ``k``
  basis vectors only.

Exact breakdown: when ``\beta_j <= \tau\,\|A\|_{est}`` (``\|A\|_{est}``
the largest ``\sqrt{\alpha_i^2+\beta_i^2+\beta_{i-1}^2} = \|A q_i\|`` seen so far)
the Krylov space is invariant to working precision; the run stops with
``breakdown=True`` and fewer iterations (never NaN).  The relative threshold
``\tau`` is :func:`breakdown_tolerance` of the products' ``eps``:
``\sqrt{eps} = 2^{-26} \approx 1.5 \cdot 10^{-8}`` in float64 and
``eps^{2/3}`` in lower precisions (``2.4 \cdot 10^{-5}`` in float32).

Ritz residuals ``\beta_k |s_{ki}|`` (:meth:`LanczosResult.ritz`) are those of the
relation ``A Q_k = Q_k T_k + r e_k^T``; the computed basis satisfies it up to a
matrix ``F`` that they leave out.  With ``"full"`` or ``"none"`` ``F`` is rounding,
``O(eps \|A\|)``.  With ``"partial"`` and ``"selective"`` it also holds the
components that reorthogonalisation removes from the residuals without entering
``T``: up to a few ``\sqrt{eps}\,\|A\|`` (measured up to ``5.5 \sqrt{eps}\,\|A\|``
on clustered spectra), so there the true ``\|A y_i - \theta_i y_i\|`` can exceed the
reported residual by that much (``10^7`` times it after a narrowly missed breakdown):
a convergence flag at a tolerance near ``\sqrt{eps}`` is an exact-arithmetic
statement, not a bound.

>>> import numpy as np
>>> res = lanczos(np.diag([1.0, 2.0, 3.0, 4.0]), 4, seed=0)
>>> res.ritz().values.round(10).tolist()
[1.0, 2.0, 3.0, 4.0]
>>> res.breakdown, res.num_iters
(True, 4)
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spectral import _backend, resume
from spectral.errors import NumericalError, argument_error
from spectral.io import CorruptFileError
from spectral.operator import SymmetricOperator, as_operator
from spectral.probes import as_generator, random_probe, random_probes
from spectral.ritz import RitzPairs, ritz_pairs, tridiagonal_eigh

__all__ = [
    "REORTH_MODES",
    "LanczosResult",
    "Recurrence",
    "RecurrenceSettings",
    "check_symmetric",
    "lanczos",
    "lanczos_step",
]

logger = logging.getLogger(__name__)

REORTH_MODES = ("full", "none", "partial", "selective")


def breakdown_tolerance(eps: float) -> float:
    """Relative threshold below which ``beta_j / ||A||_est`` counts as an exact breakdown.

    After an exact invariance the computed residual is rounding noise of size
    ``eps ||A||`` amplified by ``||A|| / beta_i`` over earlier small ``beta_i``: over
    1,500 random spectra with up to 12 distinct eigenvalues it reached ``1e7 eps``
    (2e-9 in float64), and the running estimate ``max ||A q_i||`` can undershoot
    ``||A||`` by a factor of 1.4.  In float64 the threshold is therefore
    ``sqrt(eps) = 1.5e-8``, far above that noise and far below any residual that still
    carries information.  In lower precisions ``sqrt(eps)`` (3.4e-4 in float32) would
    stop runs on real network spectra whose bulk is tiny next to the top eigenvalue,
    so there the threshold is ``eps^(2/3)`` (2.4e-5 in float32): breakdown may then be
    missed, which only continues with a vector orthogonal to the basis (Ritz values of
    negligible weight), never NaN.

    >>> breakdown_tolerance(2.0**-52) == 2.0**-26
    True
    >>> round(breakdown_tolerance(2.0**-23) / 2.0 ** (-23 * 2 / 3), 12)
    1.0
    """
    return max(eps ** (2.0 / 3.0), min(math.sqrt(eps), 2.0**-26))


@dataclass
class LanczosResult:
    """Output of :func:`lanczos`.

    Attributes
    ----------
    alpha:
        float64 ``(k,)``, diagonal of ``T``.
    beta:
        float64 ``(k-1,)``, off-diagonal of ``T``.
    basis:
        ``(n, k)`` orthonormal Lanczos vectors in the operator's namespace and
        device, or ``None`` (``store_basis=False``).
    num_iters:
        ``k``, the number of steps performed (``< num_iters`` requested after a breakdown).
    breakdown:
        Whether the last residual vanished (invariant Krylov space).
    residual_norm:
        ``beta_k``, the norm of the last residual ``r = A q_k - alpha_k q_k - beta_{k-1} q_{k-1}``.
    start_norm:
        ``||v0||``, the norm of the (unnormalised) start vector.
    residual_vector:
        The residual ``r = beta_k q_{k+1}`` (namespace of the operator); with it
        ``A Q = Q T + r e_k^T``.
    reorth:
        The reorthogonalisation mode used.

    ``orthogonality_loss`` (computed on first access) is ``||Q^T Q - I||_2``,
    NaN without a stored basis.

    Examples
    --------
    >>> import numpy as np
    >>> r = lanczos(np.diag([1.0, 2.0]), 1, v0=np.array([1.0, 1.0]))
    >>> r.alpha.tolist(), r.residual_norm, r.tridiagonal().shape
    ([1.5], 0.5, (1, 1))
    """

    alpha: np.ndarray
    beta: np.ndarray
    basis: Any
    num_iters: int
    breakdown: bool
    residual_norm: float
    start_norm: float
    residual_vector: Any = None
    reorth: str | int = "full"
    _orth_loss: float | None = field(default=None, repr=False, compare=False)

    @property
    def orthogonality_loss(self) -> float:
        """``||Q^T Q - I||_2`` of the stored basis (NaN when no basis was stored)."""
        if self._orth_loss is None:
            if self.basis is None:
                self._orth_loss = math.nan
            else:
                gram = _backend.to_host_float64(self.basis.T @ self.basis)
                self._orth_loss = float(np.linalg.norm(gram - np.eye(gram.shape[0]), 2))
        return self._orth_loss

    def tridiagonal(self) -> np.ndarray:
        """The dense float64 ``k x k`` tridiagonal matrix ``T``."""
        return np.diag(self.alpha) + np.diag(self.beta, 1) + np.diag(self.beta, -1)

    def ritz(self, tol: float = 1e-8) -> RitzPairs:
        """Ritz values, quadrature weights, vectors (if the basis is stored), residuals.

        See :func:`spectral.ritz.ritz_pairs`; ``tol`` is the relative convergence threshold.
        The residuals ``beta_k |s_{ki}|`` are exact for the relation
        ``A Q = Q T + r e_k^T``; with ``reorth="partial"`` or ``"selective"`` the computed
        basis satisfies it only up to a few ``sqrt(eps) ||A||`` (see the module docstring),
        so the true residuals can be larger by that much and a flag at ``tol`` near
        ``sqrt(eps)`` is not a guarantee.
        """
        return ritz_pairs(self.alpha, self.beta, self.residual_norm, self.basis, tol=tol)


def _parse_reorth(reorth: Any) -> tuple[str, int]:
    if isinstance(reorth, bool):
        raise argument_error("reorth", f"one of {REORTH_MODES} or an integer >= 1", reorth)
    if isinstance(reorth, int | np.integer):
        if reorth < 1:
            raise argument_error("reorth", "an integer window >= 1", reorth)
        return "window", int(reorth)
    if reorth not in REORTH_MODES:
        raise argument_error("reorth", f"one of {REORTH_MODES} or an integer >= 1", reorth)
    return str(reorth), 0


def _start_vector(op: SymmetricOperator, v0: Any, rng: np.random.Generator) -> tuple[Any, float]:
    """Return ``(q1, ||v0||)`` with ``q1`` a unit vector in the operator's namespace."""
    xp = op.xp
    if v0 is None:
        v = random_probe(op.n, "sphere", rng, like=op.template)
    else:
        if not _backend.is_array(v0):
            if isinstance(v0, list | tuple):
                v0 = np.asarray(v0, dtype=np.float64)
            else:
                raise argument_error("v0", f"an array of shape ({op.n},)", v0, kind=TypeError)
        if tuple(v0.shape) != (op.n,):
            raise argument_error("v0", f"a vector of shape ({op.n},)", v0)
        if _backend.namespace(v0).isdtype(v0.dtype, "complex floating"):
            raise argument_error("v0", "a real vector", v0, kind=TypeError)
        v0, exponent = _power_of_two_scaled(v0)
        same = (
            _backend.namespace(v0) is xp
            and _backend.device(v0) == op.device
            and _backend.is_real_floating(xp, v0.dtype)
        )
        if same:
            v = _backend.detach(v0 if v0.dtype == op.dtype else xp.astype(v0, op.dtype))
        else:
            v = _backend.from_host(_backend.to_host_float64(v0), like=op.template)
    norm = float(_backend.vector_norm(xp, v))
    if not math.isfinite(norm) or norm == 0.0:
        raise argument_error("v0", "a nonzero vector with finite entries", v0)
    if v0 is None or exponent == 0:
        return v * (1.0 / norm), norm
    try:
        start_norm = math.ldexp(norm, exponent)
    except OverflowError:
        start_norm = math.inf
    if start_norm == math.inf:
        raise argument_error("v0", "a vector whose norm is finite in float64", v0)
    return v * (1.0 / norm), start_norm


def _power_of_two_scaled(v0: Any) -> tuple[Any, int]:
    """``(v0 * 2**-e, e)``: entries of at most unit size when squaring them could overflow
    or underflow (largest magnitude outside :math:`2^{\\pm 56}`), else ``(v0, 0)``.

    Only the start vector's direction matters; scaling by a power of two is exact, so
    ``q1`` is bitwise what it would be without overflow (``v0 = 1e300 * u`` and
    ``v0 = 1e-300 * u`` start where ``u`` does).  Refuses a zero or non-finite ``v0``.
    """
    v0 = _backend.detach(v0)
    ns = _backend.namespace(v0)
    largest = float(ns.max(ns.abs(v0))) if v0.shape[0] else 0.0
    if not math.isfinite(largest) or largest == 0.0:
        raise argument_error("v0", "a nonzero vector with finite entries", v0)
    exponent = math.frexp(largest)[1]
    if abs(exponent) <= 56:  # squares and their sum stay normal even in float32
        return v0, 0
    half = -exponent // 2  # two factors: 2**1074 itself is not a float
    return (v0 * (2.0**half)) * (2.0 ** (-exponent - half)), exponent


def check_symmetric(A: Any, *, seed: int | np.random.Generator | None = None) -> float:
    r"""Check ``u^T (A v) == v^T (A u)`` on two random Gaussian vectors, up to rounding.

    The relative mismatch
    ``\mu = |u^T A v - v^T A u| / (\|u\|\|Av\| + \|v\|\|Au\|)`` (at most 1) is compared
    with the threshold

    .. math::
        \min\Bigl(\max\bigl(100\sqrt{n}\,\epsilon_v,\ 10\,\epsilon_p/\sqrt{n}\bigr),\
        \frac{1}{10\sqrt{n}}\Bigr)

    with ``eps_v`` the machine epsilon of the vectors' dtype and ``eps_p`` that of the
    products (equal, except for a float16/bfloat16 operator run with float64 vectors).

    * ``100 sqrt(n) eps_v``: rounding of two products and two dot products of length
      ``n`` in the vectors' precision, with a safety factor (unchanged for float32 and
      float64 operators up to ``n = 8,400`` in float32 and any ``n`` in float64).
    * ``10 eps_p / sqrt(n)``: a 16-bit product's own error ``e`` (input and result rounded,
      :math:`\|e\| \lesssim \epsilon_p \|Av\|`) enters as :math:`u^\top e`, about
      :math:`\|e\|` for a Gaussian ``u`` independent of it, against the normaliser
      :math:`\|u\|\|Av\| \approx \sqrt{n}\|Av\|` (measured: about ``0.5 eps_p / sqrt(n)``).
    * the cap ``1 / (10 sqrt(n))``: for :math:`A = S + K` with a skew part ``K`` the
      mismatch is :math:`|u^\top K v|` over the same normaliser, of order
      :math:`\|K\|_F / (\sqrt{n}\|A\|_F)`: a grossly non-symmetric operator (an
      upper-triangular matrix) typically gives 0.1 to 1 over :math:`\sqrt{n}` (a random
      quantity).  The old threshold ``100 sqrt(n) eps`` exceeded that in float16 for
      ``n >= 4`` and reached 1 (accepting every operator) at ``n = 100``, and in float32 it
      passed :math:`0.3/\sqrt{n}` at ``n = 25,000``; the cap keeps the test meaningful in
      every dtype.

    A single pair of vectors detects a skew part with high probability, not certainty.
    Returns the relative mismatch.

    Parameters
    ----------
    A : operator or array
        Anything :func:`spectral.as_operator` accepts.
    seed : int, numpy.random.Generator or None
        Source of the two random vectors.

    Returns
    -------
    float
        The relative mismatch.

    Raises
    ------
    ValueError
        If the mismatch exceeds the threshold (``A`` is not symmetric).

    Examples
    --------
    >>> import numpy as np
    >>> check_symmetric(np.eye(3), seed=0) < 1e-15
    True
    >>> from scipy.sparse.linalg import aslinearoperator  # (a dense array is refused earlier)
    >>> check_symmetric(aslinearoperator(np.triu(np.ones((3, 3)))), seed=0)
    Traceback (most recent call last):
    ...
    ValueError: Argument 'A': expected a symmetric operator ...
    """
    op = as_operator(A)
    xp = op.xp
    rng = as_generator(seed)
    U = random_probes(op.n, 2, "gaussian", rng, like=op.template)
    u, v = U[:, 0], U[:, 1]
    Au, Av = op.matvec(u), op.matvec(v)
    stats = xp.stack(
        [
            u @ Av,
            v @ Au,
            _backend.vector_norm(xp, u) * _backend.vector_norm(xp, Av),
            _backend.vector_norm(xp, v) * _backend.vector_norm(xp, Au),
        ]
    )
    uAv, vAu, s1, s2 = (float(x) for x in _backend.to_host_float64(stats))
    if not all(math.isfinite(x) for x in (uAv, vAu, s1, s2)):
        raise NumericalError("check_symmetric: the products A @ u, A @ v contain NaN or Inf")
    scale = s1 + s2
    mismatch = abs(uAv - vAu) / scale if scale > 0 else 0.0
    threshold = symmetry_threshold(op)
    if mismatch > threshold:
        raise argument_error(
            "A",
            f"a symmetric operator (relative mismatch of u^T(Av) and v^T(Au) <= {threshold:.2e})",
            f"an operator with relative mismatch {mismatch:.3e}",
        )
    return mismatch


def symmetry_threshold(op: SymmetricOperator) -> float:
    """The threshold of :func:`check_symmetric` for ``op`` (see its docstring).

    >>> import numpy as np
    >>> symmetry_threshold(as_operator(np.eye(100))) == 1000 * 2.0**-52
    True
    >>> symmetry_threshold(as_operator(np.eye(100, dtype=np.float16))) == 2.0**-10
    True
    """
    root = math.sqrt(op.n)
    rounding = max(100.0 * root * _backend.finfo_eps(op.xp, op.dtype), 10.0 * op.eps / root)
    return min(rounding, 0.1 / root)


class _Basis:
    """Lanczos vectors stored as the rows of a preallocated ``m x n`` array (or a list)."""

    def __init__(self, op: SymmetricOperator, m: int) -> None:
        self.xp = op.xp
        self.rows: list[Any] = []
        self.array: Any = None
        if _backend.supports_item_assignment(op.xp):
            self.array = op.xp.empty((m, op.n), dtype=op.dtype, device=op.device)
        self.size = 0

    def append(self, q: Any) -> None:
        if self.array is not None:
            self.array[self.size, :] = q
        else:
            self.rows.append(q)
        self.size += 1

    def block(self, lo: int, hi: int) -> Any:
        """Rows ``lo..hi-1`` as a ``(hi - lo) x n`` array (a view when preallocated)."""
        if self.array is not None:
            return self.array[lo:hi, :]
        return self.xp.stack(self.rows[lo:hi], axis=0)

    def matrix(self) -> Any:
        """The ``n x k`` basis.

        After an early stop (breakdown) the rows are copied, so the returned basis
        does not keep the whole preallocated ``m x n`` array alive.
        """
        rows = self.block(0, self.size)
        if self.array is not None and self.size < self.array.shape[0]:
            rows = self.xp.asarray(rows, copy=True)
        return rows.T


def _cgs2(Qb: Any, w: Any) -> tuple[Any, Any]:
    """Classical Gram-Schmidt twice of ``w`` against the orthonormal rows of ``Qb``.

    Each pass is two blocked products, ``c = Q^T w`` and ``w <- w - Q c`` (``Qb``
    holds ``Q^T``).  ``w`` must be a vector owned by the caller: it is updated in
    place where the namespace allows (``-=`` rebinds for immutable arrays).
    """
    c1 = Qb @ w
    w -= c1 @ Qb
    c2 = Qb @ w
    w -= c2 @ Qb
    return w, c1 + c2


def _validate(op: SymmetricOperator, num_iters: Any) -> int:
    if isinstance(num_iters, bool) or not isinstance(num_iters, int | np.integer):
        raise argument_error("num_iters", "an integer", num_iters, kind=TypeError)
    if not 1 <= num_iters <= op.n:
        raise argument_error(
            "num_iters", f"an integer with 1 <= num_iters <= n = {op.n}", num_iters
        )
    return int(num_iters)


def lanczos(
    A: Any,
    num_iters: int,
    *,
    v0: Any = None,
    seed: int | np.random.Generator | None = None,
    reorth: str | int = "full",
    store_basis: bool = True,
    check_symmetric: bool = False,
    checkpoint: str | os.PathLike[str] | resume.LanczosHook | None = None,
    checkpoint_every: int = 10,
) -> LanczosResult:
    """Run ``num_iters`` steps of the symmetric Lanczos process on ``A`` (see module docstring).

    Parameters
    ----------
    A:
        Anything :func:`spectral.operator.as_operator` accepts.
    num_iters:
        ``m``, with ``1 <= m <= n``.
    v0:
        Start vector of shape ``(n,)`` (any namespace; moved to the operator's);
        a uniformly random unit vector drawn from ``seed`` when ``None``.
    seed:
        Integer or numpy ``Generator`` for the start vector and the symmetry check.
    reorth:
        ``"full"``, ``"none"``, ``"partial"``, ``"selective"`` or an integer window.
    store_basis:
        Keep the basis (``n x m``).  ``False`` keeps memory at O(n) and is only
        allowed with ``reorth="none"``.
    check_symmetric:
        Run :func:`check_symmetric` first (two extra products).
    checkpoint:
        Path of a state file (see :mod:`spectral.resume`).  The recurrence state
        (``alpha``, ``beta``, the last two vectors, the basis when stored, the
        estimates of partial and selective reorthogonalisation) is written there atomically every
        ``checkpoint_every`` steps and at the end.  If the file exists, the run
        resumes from it (bit-identical to an uninterrupted run on the CPU; a
        finished state returns its result at once); a file written with other
        arguments or for another operator raises
        :class:`spectral.resume.StateMismatchError`.  Costs one extra product
        (the operator fingerprint).
    checkpoint_every:
        Save interval in steps (a positive integer).

    Returns
    -------
    LanczosResult

    Raises
    ------
    ValueError, TypeError
        Invalid arguments (built with :func:`spectral.errors.argument_error`).
    spectral.errors.NumericalError
        A product ``A q_j`` contained NaN or Inf (the message names the iteration).
    spectral.resume.StateMismatchError, spectral.io.CorruptFileError
        ``checkpoint`` belongs to another run or cannot be read.

    Examples
    --------
    >>> import numpy as np
    >>> r = lanczos(np.diag(np.arange(1.0, 101.0)), 10, seed=0, reorth="none", store_basis=False)
    >>> r.num_iters, r.basis is None, r.alpha.shape, r.beta.shape
    (10, True, (10,), (9,))
    """
    op = as_operator(A)
    m = _validate(op, num_iters)
    mode, window = _parse_reorth(reorth)
    if not isinstance(store_basis, bool):
        raise argument_error("store_basis", "a bool", store_basis, kind=TypeError)
    if not store_basis and mode != "none":
        raise argument_error(
            "store_basis",
            "True unless reorth='none' (reorthogonalisation needs the stored basis)",
            store_basis,
        )
    hook = _make_hook(op, checkpoint, checkpoint_every, m, reorth, store_basis, seed, v0)
    rng = as_generator(seed)
    if check_symmetric:
        _check_symmetric_fn(op, seed=rng)
    q, start_norm = _start_vector(op, v0, rng)
    # NaN/Inf in a product are detected on alpha/beta and raised with the iteration number;
    # numpy's own floating-point warnings would only precede that error.
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _run(op, q, m, mode, window, store_basis, start_norm, reorth, hook)


def _make_hook(
    op: SymmetricOperator,
    checkpoint: Any,
    checkpoint_every: Any,
    m: int,
    reorth: str | int,
    store_basis: bool,
    seed: Any,
    v0: Any,
) -> resume.LanczosHook | None:
    """The state-file hook of a run (``None`` without ``checkpoint``); loads a saved state.

    The configuration fingerprint holds every argument that changes the result; the
    symmetry check is left out (it does not change the recurrence).
    """
    if checkpoint is None:
        return None
    if isinstance(checkpoint, resume.LanczosHook):  # from slq / the nets workflow
        return checkpoint
    every = resume.check_every(checkpoint_every)
    config = {
        "function": "lanczos",
        "n": op.n,
        "num_iters": m,
        "reorth": reorth if isinstance(reorth, str) else int(reorth),
        "store_basis": store_basis,
        "seed": resume.describe_seed(seed),
        "v0": None if v0 is None else resume.array_digest(v0),
    }
    ck = resume.Checkpoint(checkpoint, kind="lanczos", config=config, operator=op)
    saved = ck.load()
    initial = (
        None if saved is None else resume.LanczosState.from_payload(saved, path=ck.path, n=op.n)
    )
    return resume.LanczosHook(
        ck, every, initial=initial, storage=resume.storage_dtype(op.xp, op.dtype)
    )


def _from_state(op: SymmetricOperator, st: resume.LanczosState, reorth: str | int) -> LanczosResult:
    """The result of a finished run stored in a state file (vectors back in ``op``'s namespace)."""
    basis = None
    if st.basis is not None:
        basis = _backend.from_host(st.basis, like=op.template).T
    residual = None if st.residual is None else _backend.from_host(st.residual, like=op.template)
    return LanczosResult(
        alpha=np.asarray(st.alphas, dtype=np.float64),
        beta=np.asarray(st.betas, dtype=np.float64),
        basis=basis,
        num_iters=st.iteration,
        breakdown=st.breakdown,
        residual_norm=st.residual_norm,
        start_norm=st.start_norm,
        residual_vector=residual,
        reorth=reorth,
    )


_check_symmetric_fn = check_symmetric


@dataclass(frozen=True)
class RecurrenceSettings:
    """What stays fixed over a run: reorthogonalisation, number of steps, precision
    (``eps`` of the products and ``largest``, the largest finite value of the vectors' dtype).
    """

    mode: str  # "full", "none", "partial", "selective" or "window"
    window: int  # the window of mode "window"
    num_iters: int  # m
    n: int
    eps: float
    largest: float = float(np.finfo(np.float64).max)  # of the vectors' dtype

    @property
    def breakdown_level(self) -> float:
        """``beta_j <= breakdown_level * ||A||_est`` is an exact breakdown."""
        return breakdown_tolerance(self.eps)


@dataclass(frozen=True)
class Recurrence:
    r"""The state of the Lanczos recurrence after ``j`` steps (Golub & Van Loan, Alg. 10.1.1).

    In the book's notation, after step ``j``: ``q = q_{j+1}`` (the vector the next
    step multiplies), ``q_prev = q_j``, ``beta_prev = \beta_j``, ``alphas =
    (\alpha_1..\alpha_j)``, ``betas = (\beta_1..\beta_j)``; ``anorm`` the running
    estimate ``max_i \|A q_i\|``.  ``basis`` is the append-only store of
    ``q_1..q_j`` (``None`` without reorthogonalisation and stored basis);
    ``omega_cur``/``omega_old``/``force_reorth`` are the estimates of partial and
    selective reorthogonalisation.  After the last step (``done``) ``betas`` stops at
    ``\beta_{j-1}``, and ``residual = r_j`` with norm ``residual_norm = \beta_j`` and
    ``breakdown`` describe the end: ``A Q_j = Q_j T_j + r_j e_j^T``.
    """

    j: int
    q: Any
    q_prev: Any = None
    beta_prev: float = 0.0
    alphas: tuple[float, ...] = ()
    betas: tuple[float, ...] = ()
    anorm: float = 0.0
    basis: _Basis | None = None
    omega_cur: np.ndarray = field(default_factory=lambda: np.ones(1))
    omega_old: np.ndarray = field(default_factory=lambda: np.zeros(0))
    force_reorth: bool = False
    done: bool = False
    breakdown: bool = False
    residual: Any = None
    residual_norm: float = 0.0


def lanczos_step(op: SymmetricOperator, st: Recurrence, cfg: RecurrenceSettings) -> Recurrence:
    r"""One step ``j -> j + 1`` of the recurrence (Alg. 10.1.1 plus reorthogonalisation).

    .. math::
        w = A q_{j+1} - \beta_j q_j,\quad \alpha_{j+1} = q_{j+1}^T w,\quad
        w \leftarrow w - \alpha_{j+1} q_{j+1},\quad \beta_{j+1} = \|w\|,\quad
        q_{j+2} = w / \beta_{j+1}

    (``st`` is not changed; only the append-only basis store grows by ``q_{j+1}``).
    The step is the last (``done``) at a breakdown or after ``cfg.num_iters`` steps;
    then ``w`` is the residual and is not normalised.

    Raises
    ------
    spectral.errors.NumericalError
        The product contains NaN or Inf (names the iteration).
    """
    xp = op.xp
    j, q, basis = st.j, st.q, st.basis
    if basis is not None:
        basis.append(q)
    w = op.matvec(q)
    if j > 0:
        w = w - st.beta_prev * st.q_prev  # out of place: the product may alias q or A's state
        a = q @ w
        w -= a * q  # w is now a fresh vector owned by this step: update in place
    else:
        a = q @ w
        w = w - a * q
    w, a = _reorthogonalise(cfg, st, w, a)
    b_arr = _backend.vector_norm(xp, w)
    host = _backend.to_host_float64(xp.stack([xp.asarray(a), xp.asarray(b_arr)]))
    alpha_j, beta_j = float(host[0]), float(host[1])
    if not (math.isfinite(alpha_j) and math.isfinite(beta_j)):
        raise NumericalError(
            f"lanczos: the product A @ q at iteration {j + 1} contains NaN or Inf "
            f"(alpha={alpha_j}, beta={beta_j})"
        )
    alphas = (*st.alphas, alpha_j)
    anorm = max(st.anorm, math.hypot(alpha_j, beta_j, st.beta_prev))  # no overflow
    omega_cur, omega_old, force_reorth = st.omega_cur, st.omega_old, st.force_reorth
    level = cfg.breakdown_level
    if cfg.mode in ("partial", "selective") and basis is not None:
        w, beta_j, omega_cur, omega_old, force_reorth = _semi_orthogonalise(
            cfg, st, basis, w, alphas, beta_j, anorm
        )
    breakdown = beta_j <= level * anorm
    if breakdown or j + 1 == cfg.num_iters:
        if breakdown:
            logger.debug("lanczos: breakdown at iteration %d (beta=%.3e)", j + 1, beta_j)
        return Recurrence(
            j=j + 1, q=q, q_prev=st.q_prev, beta_prev=st.beta_prev, alphas=alphas,
            betas=st.betas, anorm=anorm, basis=basis, omega_cur=omega_cur,
            omega_old=omega_old, force_reorth=force_reorth, done=True, breakdown=breakdown,
            residual=w, residual_norm=beta_j,
        )  # fmt: skip
    inverse = 1.0 / beta_j
    if inverse <= cfg.largest:
        w *= inverse  # w is owned (fresh) and no longer needed as a residual
    else:  # a subnormal beta (a subnormal operator): its reciprocal overflows, w / beta not
        w = w / beta_j
    return Recurrence(
        j=j + 1, q=w, q_prev=q, beta_prev=beta_j, alphas=alphas, betas=(*st.betas, beta_j),
        anorm=anorm, basis=basis, omega_cur=omega_cur, omega_old=omega_old,
        force_reorth=force_reorth,
    )  # fmt: skip


def _reorthogonalise(cfg: RecurrenceSettings, st: Recurrence, w: Any, a: Any) -> tuple[Any, Any]:
    """Full (CGS2 against ``q_1..q_{j+1}``) or windowed reorthogonalisation of ``w``."""
    j, q, basis = st.j, st.q, st.basis
    do_full = cfg.mode == "full" or (cfg.mode in ("partial", "selective") and st.force_reorth)
    if do_full and basis is not None and j > 0:
        w, c = _cgs2(basis.block(0, j + 1), w)
        a = a + c[j]
    elif cfg.mode == "window" and basis is not None:
        lo = max(0, j + 1 - cfg.window)
        w, c = _cgs2(basis.block(lo, j + 1), w)
        a = a + c[j - lo]
    elif do_full:  # j == 0: only q itself
        coef = q @ w
        w = w - coef * q
        a = a + coef
    return w, a


# ---------------------------------------------------------------------- the driver
def _run(
    op: SymmetricOperator,
    q: Any,
    m: int,
    mode: str,
    window: int,
    store_basis: bool,
    start_norm: float,
    reorth: str | int,
    hook: resume.LanczosHook | None = None,
) -> LanczosResult:
    """Run the recurrence to the end; with a ``hook``, resume from and save to its state file."""
    cfg = RecurrenceSettings(mode, window, m, op.n, op.eps, float(op.xp.finfo(op.dtype).max))
    st = Recurrence(j=0, q=q, basis=_Basis(op, m) if store_basis else None)
    if hook is not None and hook.initial is not None:
        if hook.initial.complete:
            return _from_state(op, hook.initial, reorth)
        st, start_norm = _resumed(op, hook, st.basis, m)
    while not st.done:
        st = lanczos_step(op, st, cfg)
        if hook is not None and not st.done and st.j % hook.every == 0:
            hook.save(_saved(st, start_norm, hook))
    if hook is not None:
        hook.save(_saved(st, start_norm, hook))
    return LanczosResult(
        alpha=np.asarray(st.alphas, dtype=np.float64),
        beta=np.asarray(st.betas, dtype=np.float64),
        basis=st.basis.matrix() if st.basis is not None else None,
        num_iters=st.j,
        breakdown=st.breakdown,
        residual_norm=float(st.residual_norm),
        start_norm=start_norm,
        residual_vector=st.residual,
        reorth=reorth,
    )


def _saved(st: Recurrence, start_norm: float, hook: resume.LanczosHook) -> resume.LanczosState:
    """The host (state-file) form of a running or finished recurrence."""
    basis = None if st.basis is None else hook.host(st.basis.block(0, st.j))
    alphas = np.asarray(st.alphas, dtype=np.float64)
    betas = np.asarray(st.betas, dtype=np.float64)
    if st.done:
        return resume.LanczosState(
            iteration=st.j, alphas=alphas, betas=betas, start_norm=start_norm, basis=basis,
            complete=True, breakdown=st.breakdown, residual=hook.host(st.residual),
            residual_norm=float(st.residual_norm),
        )  # fmt: skip
    return resume.LanczosState(
        iteration=st.j, alphas=alphas, betas=betas, start_norm=start_norm, basis=basis,
        q=hook.host(st.q), q_prev=hook.host(st.q_prev), beta_prev=st.beta_prev, anorm=st.anorm,
        omega_cur=st.omega_cur, omega_old=st.omega_old, force_reorth=st.force_reorth,
    )  # fmt: skip


def _resumed(
    op: SymmetricOperator, hook: resume.LanczosHook, basis: _Basis | None, m: int
) -> tuple[Recurrence, float]:
    """The recurrence and ``||v0||`` saved mid-run in a state file (vectors in ``op``'s xp)."""
    init = hook.initial
    assert init is not None and not init.complete
    vectors_missing = init.q is None or init.q_prev is None
    if (basis is None) != (init.basis is None) or vectors_missing or init.iteration >= m:
        raise CorruptFileError(
            f"State file '{hook.checkpoint.path}' is inconsistent with this run "
            f"(iteration {init.iteration} of {m}, vectors missing: {vectors_missing})."
        )
    if init.basis is not None and basis is not None:
        for row in init.basis:
            basis.append(_backend.from_host(row, like=op.template))
    logger.info("lanczos: resuming after iteration %d of %d", init.iteration, m)
    st = Recurrence(
        j=init.iteration,
        q=_backend.from_host(init.q, like=op.template),
        q_prev=_backend.from_host(init.q_prev, like=op.template),
        beta_prev=init.beta_prev,
        alphas=tuple(float(a) for a in init.alphas),
        betas=tuple(float(b) for b in init.betas),
        anorm=init.anorm,
        basis=basis,
        omega_cur=init.omega_cur.copy(),
        omega_old=init.omega_old.copy(),
        force_reorth=init.force_reorth,
    )
    return st, init.start_norm


def _reset_omega(j: int, eps: float, n: int) -> np.ndarray:
    """Estimates ``q_{j+1}^T q_k`` right after a full reorthogonalisation (length ``j + 2``)."""
    omega = np.full(j + 2, eps * math.sqrt(n))
    omega[-1] = 1.0
    return omega


def _omega_step(
    omega_cur: np.ndarray,
    omega_old: np.ndarray,
    alphas: list[float],
    betas: list[float],
    beta_j: float,
    anorm: float,
    eps: float,
    n: int,
) -> np.ndarray:
    r"""One step of the Paige/Simon recurrence for ``\omega_{j+1,k} \approx q_{j+1}^T q_k``.

    ``\beta_j\omega_{j+1,k} = \beta_k\omega_{j,k+1} + (\alpha_k-\alpha_j)\omega_{j,k}
    + \beta_{k-1}\omega_{j,k-1} - \beta_{j-1}\omega_{j-1,k}`` plus a rounding term
    ``\pm 2\,eps\,\|A\|``.
    """
    j = len(alphas) - 1
    new = np.empty(j + 2)
    new[j + 1] = 1.0
    new[j] = eps * math.sqrt(n)
    if j > 0:
        a = np.asarray(alphas)
        b_all = np.asarray([*betas, beta_j])  # b_all[k] couples q_k and q_{k+1}
        k = np.arange(j)
        val = b_all[k] * omega_cur[k + 1] + (a[k] - a[j]) * omega_cur[k]
        val[1:] += b_all[k[1:] - 1] * omega_cur[k[1:] - 1]
        val -= b_all[j - 1] * omega_old[:j]
        val += np.copysign(2.0 * eps * anorm, val)
        new[:j] = val / beta_j if beta_j > 0 else val
    return new


def _semi_orthogonalise(
    cfg: RecurrenceSettings,
    st: Recurrence,
    basis: _Basis,
    w: Any,
    alphas: tuple[float, ...],
    beta_j: float,
    anorm: float,
) -> tuple[Any, float, np.ndarray, np.ndarray, bool]:
    r"""Partial (Simon) or selective (Parlett-Scott) reorthogonalisation of the new residual.

    ``w = \beta_{j+1} q_{j+2}`` after the three-term step.  Both modes update Simon's
    estimates ``\omega_{j+2,k} \approx q_{j+2}^T q_k`` (:func:`_omega_step`).  Selective
    mode first orthogonalises ``w`` against the converged Ritz vectors ``Y = Q S_c``
    (:func:`_selective`); with ``Q`` semi-orthogonal that maps ``Q^T w`` to
    ``(I - S_c S_c^T) Q^T w``, so the estimates are projected the same way and rescaled by
    the old over the new norm of ``w``.  In both modes an estimate above ``\sqrt{eps}``
    (orthogonality lost in directions no converged Ritz vector covers: near-invariance, when
    ``\beta`` is small but above the breakdown level) triggers CGS2 of ``w`` against the whole
    basis and of the next vector (``force_reorth``).  Returns ``(w, beta, omega_cur,
    omega_old, force_reorth)`` for the next state.
    """
    j, n, eps = st.j, cfg.n, cfg.eps
    xp = basis.xp
    if st.force_reorth:  # w was orthogonalised against the whole basis in _reorthogonalise
        return w, beta_j, _reset_omega(j, eps, n), st.omega_cur, False
    alive = beta_j > cfg.breakdown_level * anorm
    if st.omega_cur.shape[0] != j + 1:  # no estimates (a selective state file of an older
        omega_new = np.ones(j + 2)  # version): count the basis as not semi-orthogonal
    else:
        omega_new = _omega_step(
            st.omega_cur, st.omega_old, list(alphas), list(st.betas), beta_j, anorm, eps, n
        )
    if cfg.mode == "selective" and alive:
        w, beta_new, S_c = _selective(basis, list(alphas), list(st.betas), w, beta_j, cfg)
        if S_c is not None and beta_new > 0.0:
            head = omega_new[: j + 1]
            omega_new[: j + 1] = (head - S_c @ (S_c.T @ head)) * (beta_j / beta_new)
        beta_j = beta_new
        alive = beta_j > cfg.breakdown_level * anorm
    if alive and np.max(np.abs(omega_new[: j + 1])) > math.sqrt(eps):
        w, _ = _cgs2(basis.block(0, j + 1), w)
        beta_j = float(_backend.vector_norm(xp, w))
        return w, beta_j, _reset_omega(j, eps, n), st.omega_cur, True
    return w, beta_j, omega_new, st.omega_cur, False


def _selective(
    basis: _Basis,
    alphas: list[float],
    betas: list[float],
    w: Any,
    beta_j: float,
    cfg: RecurrenceSettings,
) -> tuple[Any, float, np.ndarray | None]:
    """Orthogonalise ``w`` against the converged Ritz vectors of ``T_j`` (Parlett-Scott).

    Returns ``w``, its norm and the host matrix ``S_c`` of the converged eigenvectors of
    ``T_j`` (``Y = Q_j S_c``; ``None`` when none has converged).
    """
    theta, S = tridiagonal_eigh(np.asarray(alphas), np.asarray(betas))
    bounds = beta_j * np.abs(S[-1, :])
    good = bounds <= math.sqrt(cfg.eps) * float(np.max(np.abs(theta)))
    if not np.any(good):
        return w, beta_j, None
    S_c = np.ascontiguousarray(S[:, good])
    Qb = basis.block(0, len(alphas))
    Y = _backend.from_host(np.ascontiguousarray(S_c.T), like=Qb) @ Qb
    w, _ = _cgs2(Y, w)
    return w, float(_backend.vector_norm(basis.xp, w)), S_c
