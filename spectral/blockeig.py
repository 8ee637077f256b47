r"""Extreme eigenpairs from a block Krylov subspace that can start from a guess (warm start).

:func:`block_eigenpairs` builds an orthonormal basis ``V`` (rows) of a block
Krylov space started from ``X_0 = [\text{start}, \text{guard vectors}]``, keeps the
products ``W = V A`` (rows ``A v``), and after each block forms the Rayleigh
quotient ``H = V W^T`` on the host in float64 (Rayleigh--Ritz).  For the Ritz pair
``(\theta_i, y_i = V^T s_i)`` the residual is computed explicitly,

.. math::
    r_i = A y_i - \theta_i y_i = W^T s_i - \theta_i V^T s_i ,

and, as ``y_i`` is a unit vector and ``\theta_i`` its Rayleigh quotient, an eigenvalue
of ``A`` lies within ``\|r_i\|`` of ``\theta_i`` (and within ``\|r_i\|^2/\delta_i``
where ``\delta_i`` is the gap to the rest of the spectrum).  A pair is converged when

.. math::
    \|r_i\| \le \max\bigl(\mathrm{tol}\cdot\max(|\theta_i|, \epsilon^{2/3}\|H\|),\
    f\,\|H\|\bigr)

(the criterion of :func:`spectral.top_eigenpairs`, with its floor ``f`` of
:func:`spectral.eigen.residual_floor`: ``100 eps`` for float32/float64 operators, ``2 eps``
of the dtype of float16/bfloat16 operators, whose products round to it).  The next block is the
residuals of the wanted pairs not yet converged, so the space grows as the block
Krylov space ``span\{X_0, A X_0, A^2 X_0, \dots\}`` restricted to what is still
wrong.  The ``guard`` vectors take part in every Rayleigh--Ritz step but their
residuals are not expanded (on small MLP Hessians that saved about 20 % of the
products, warm and cold, without slowing the wanted pairs).  When the
basis would exceed ``max_basis`` it is restarted with its most wanted Ritz vectors
(``V \leftarrow S^T V``, ``W \leftarrow S^T W``: no products).

Warm start: when ``start`` holds the eigenvectors of a nearby matrix (the previous
measurement of a slowly changing curvature), the first Rayleigh--Ritz step already
has residuals of the size of the change, and a few blocks finish the job; a cold
start (random block) needs the full Krylov build-up.  The ``guard`` random vectors
keep the search open to an eigenvalue that moves past the wanted ones.  Like every
Krylov method this finds the wanted end of the spectrum with high probability, not
with certainty (a direction absent from every start vector stays unseen).

Vectors stay in the operator's namespace and device; only ``H`` and the residual
norms cross to the host.

>>> import numpy as np
>>> A = np.diag(np.arange(1.0, 41.0))
>>> cold = block_eigenpairs(A, 3, seed=0)
>>> cold.values.round(8).tolist()
[40.0, 39.0, 38.0]
>>> warm = block_eigenpairs(A + 1e-3 * np.eye(40), 3, start=cold.vectors, seed=0)
>>> warm.values.round(6).tolist(), warm.products < cold.products
([40.001, 39.001, 38.001], True)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from spectral import _backend
from spectral.eigen import residual_floor
from spectral.errors import NumericalError, argument_error, check_integer, check_real
from spectral.operator import SymmetricOperator, as_operator
from spectral.probes import as_generator, random_probes

__all__ = ["BlockEigenResult", "block_eigenpairs"]

logger = logging.getLogger(__name__)

_WHICH = ("LA", "SA", "LM")


@dataclass(frozen=True)
class BlockEigenResult:
    """What :func:`block_eigenpairs` found.

    Attributes
    ----------
    values:
        float64 ``(k,)``, most wanted first (descending for ``"LA"``).
    vectors:
        ``(n, k)`` unit Ritz vectors in the operator's namespace (column ``i``: ``values[i]``).
    residuals:
        float64 ``(k,)``, ``\\|A y_i - \\theta_i y_i\\|`` (an eigenvalue lies within it).
    thresholds:
        float64 ``(k,)``, the convergence threshold each residual met.
    subspace:
        ``(n, m)`` the ``m = min(keep, basis size)`` most wanted Ritz vectors of the final
        basis, ``vectors`` first: the ``start`` of a warm-started next solve.
    products:
        Number of matrix-vector products spent (columns of ``A @ X``).
    blocks:
        Number of Rayleigh--Ritz steps.
    """

    values: np.ndarray
    vectors: Any
    residuals: np.ndarray
    thresholds: np.ndarray
    subspace: Any
    products: int
    blocks: int


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _validate(op: SymmetricOperator, k: Any, which: Any, tol: Any, guard: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k < op.n:
        raise argument_error("k", f"an integer with 1 <= k < n = {op.n}", k)
    if which not in _WHICH:
        raise argument_error("which", f"one of {_WHICH}", which)
    check_real("tol", tol, "a positive finite number", lambda t: 0 < t < math.inf)
    if isinstance(guard, bool) or not isinstance(guard, int | np.integer) or guard < 0:
        raise argument_error("guard", "an integer >= 0", guard)


def _orthonormal_rows(xp: Any, V: Any, X: Any, eps: float) -> Any:
    """Rows of ``X`` orthonormalised against the rows of ``V`` and each other (CGS2).

    A row whose norm falls below ``sqrt(eps)`` of its norm on entry is a numerically
    dependent direction and is dropped.
    """
    kept: list[Any] = []
    for i in range(int(X.shape[0])):
        x = X[i, :]
        norm0 = float(_backend.vector_norm(xp, x))
        if not norm0 > 0.0 or not math.isfinite(norm0):
            continue
        x = _backend.divided(xp, x, norm0)  # a subnormal residual's reciprocal overflows
        basis = V if not kept else xp.concat([V, xp.stack(kept, axis=0)], axis=0)
        for _ in range(2):
            if int(basis.shape[0]):
                x = x - (basis @ x) @ basis
        norm = float(_backend.vector_norm(xp, x))
        if norm > math.sqrt(eps):
            kept.append(x * (1.0 / norm))
    if not kept:
        return xp.zeros((0, int(X.shape[1])), dtype=X.dtype, device=_backend.device(X))
    return xp.stack(kept, axis=0)


def _start_block(op: SymmetricOperator, start: Any, width: int, rng: np.random.Generator) -> Any:
    """``[start^T; random rows]``: ``width`` rows in the operator's namespace."""
    xp = op.xp
    rows: list[Any] = []
    if start is not None:
        if tuple(start.shape)[:1] != (op.n,) or len(tuple(start.shape)) != 2:
            raise argument_error("start", f"an array of shape ({op.n}, j)", start)
        host = _backend.to_host_float64(start)
        if not np.all(np.isfinite(host)):
            raise argument_error("start", "finite vectors", "an array with NaN or Inf")
        block = _backend.from_host(np.ascontiguousarray(host.T), like=op.template)
        rows.extend(block[i, :] for i in range(int(block.shape[0])))
    extra = width - len(rows)
    if extra > 0:
        probes = random_probes(op.n, extra, "gaussian", rng, like=op.template)
        rows.extend(probes[:, i] for i in range(extra))
    return xp.stack(rows, axis=0)


def block_eigenpairs(
    A: Any,
    k: int,
    *,
    start: Any = None,
    guard: int = 1,
    which: str = "LA",
    tol: float = 1e-8,
    max_basis: int | None = None,
    max_products: int | None = None,
    keep: int | None = None,
    seed: int | np.random.Generator | None = None,
) -> BlockEigenResult:
    """The ``k`` eigenpairs of the symmetric ``A`` at one end of its spectrum, warm-startable.

    Parameters
    ----------
    A:
        Anything :func:`spectral.operator.as_operator` accepts (``n x n``).
    k:
        Number of eigenpairs, ``1 <= k < n``.
    start:
        Optional ``(n, j)`` start vectors (e.g. the previous result's ``vectors``);
        need not be orthonormal.  Random vectors fill the block up to ``k + guard``.
    guard:
        Extra block vectors beyond ``k`` (random when ``start`` has ``k`` columns).
    which:
        ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
    tol:
        Relative residual tolerance (module docstring); raised to
        :func:`spectral.eigen.residual_floor` (``100 eps`` of a float32/float64 dtype,
        ``2 eps`` of a float16/bfloat16 one) if smaller.
    max_basis:
        Basis size before a restart (default ``min(n, max(4 (k + guard), 24))``).
    keep:
        Number of Ritz vectors returned in ``subspace`` (default ``k + guard``).
    max_products:
        Budget of products (default ``max(2000, 20 n)``); exceeded: ``NumericalError``.
    seed:
        Integer or numpy ``Generator`` for the random vectors.

    Returns
    -------
    BlockEigenResult

    Raises
    ------
    ValueError, TypeError
        Invalid arguments.
    spectral.errors.NumericalError
        NaN/Inf in a product, or no convergence within ``max_products``.

    >>> import numpy as np
    >>> r = block_eigenpairs(np.diag(np.linspace(-5.0, 1.0, 40)), 2, which="SA", seed=1)
    >>> r.values.round(8).tolist(), bool(np.all(r.residuals <= r.thresholds))
    ([-5.0, -4.84615385], True)
    """
    op = as_operator(A)
    _validate(op, k, which, tol, guard)
    k, guard, n, xp = int(k), int(guard), op.n, op.xp
    width = min(k + guard, n)
    max_basis, max_products, keep = _limits(n, k, width, max_basis, max_products, keep)
    eps = op.eps
    floor = residual_floor(op)
    tol = max(float(tol), floor)
    rng = as_generator(seed)
    V = xp.zeros((0, n), dtype=op.dtype, device=op.device)
    W = xp.zeros((0, n), dtype=op.dtype, device=op.device)
    block = _orthonormal_rows(xp, V, _start_block(op, start, width, rng), eps)
    products = 0
    ritz: _Ritz | None = None
    for step in range(1, max_products + 1):
        if int(block.shape[0]) == 0:  # nothing new to add: continue with random directions
            block = _orthonormal_rows(xp, V, _start_block(op, None, width, rng), eps)
            if int(block.shape[0]) == 0:
                break  # the basis spans everything reachable and still no convergence
        AB = xp.permute_dims(op.matmat(xp.permute_dims(block, (1, 0))), (1, 0))
        products += int(block.shape[0])
        V = xp.concat([V, block], axis=0)
        W = xp.concat([W, AB], axis=0)
        anorm = 0.0 if ritz is None else ritz.anorm
        ritz = _Ritz.of(
            xp, V, W, step, which=which, width=width, tol=tol, eps=eps, anorm=anorm, floor=floor
        )
        if len(ritz.active) >= k and np.all(ritz.done[:k]):
            logger.debug("block_eigenpairs: converged after %d blocks, %d products", step, products)
            return ritz.result(xp, V, k, keep, products=products, blocks=step)
        if products >= max_products:
            break
        V, W, block = ritz.next_block(xp, V, W, k, width, max_basis, eps)
    raise _not_converged(ritz, k, tol, max_products)


def _limits(
    n: int, k: int, width: int, max_basis: Any, max_products: Any, keep: Any
) -> tuple[Any, Any, Any]:
    """``(max_basis, max_products, keep)`` with their defaults, checked against ``n`` and ``k``."""
    if max_basis is None:
        max_basis = min(n, max(4 * width, 24))
    if (
        isinstance(max_basis, bool)
        or not isinstance(max_basis, int | np.integer)
        or not min(width + 1, n) <= max_basis <= n
    ):
        raise argument_error(
            "max_basis", f"an integer with k + guard < max_basis <= n = {n}", max_basis
        )
    if max_products is None:
        max_products = max(2000, 20 * n)
    max_products = check_integer(
        "max_products", max_products, "None or a positive integer", lambda p: p >= 1
    )
    keep = width if keep is None else keep
    if isinstance(keep, bool) or not isinstance(keep, int | np.integer) or not k <= keep <= n:
        raise argument_error("keep", f"an integer with k <= keep <= n = {n}", keep)
    return max_basis, max_products, keep


@dataclass
class _Ritz:
    """The Rayleigh-Ritz step on the basis ``V`` (rows) with ``W = A V``, and what it found.

    ``theta``/``S``: eigenpairs of the projected (host, float64, symmetrised)
    :math:`H = V A V^\\top`; ``order`` the Ritz values from the wanted end (``which``),
    ``active`` its first ``width``; ``Y``/``R`` the active Ritz vectors and residuals
    :math:`A y - \\theta y` (rows, in ``A``'s namespace); ``resid`` their norms,
    ``threshold`` the convergence thresholds (module docstring), ``done`` which met
    them; ``anorm`` the largest :math:`|\\theta|` seen so far.
    """

    theta: np.ndarray
    S: np.ndarray
    order: np.ndarray
    active: np.ndarray
    Y: Any
    R: Any
    resid: np.ndarray
    threshold: np.ndarray
    done: np.ndarray
    anorm: float

    @classmethod
    def of(
        cls,
        xp: Any,
        V: Any,
        W: Any,
        step: int,
        *,
        which: str,
        width: int,
        tol: float,
        eps: float,
        anorm: float,
        floor: float | None = None,
    ) -> _Ritz:
        """Project, solve, and measure the residuals of the wanted Ritz pairs.

        ``floor`` is the relative residual floor (:func:`spectral.eigen.residual_floor`;
        ``100 eps`` when not given, that of products in the vectors' own precision).

        Raises
        ------
        NumericalError
            The projected matrix holds NaN or Inf (a product did), naming ``step``.
        """
        H = _backend.to_host_float64(V @ xp.permute_dims(W, (1, 0)))
        if not np.all(np.isfinite(H)):
            raise NumericalError(
                f"block_eigenpairs: the product A @ v contains NaN or Inf (block {step})"
            )
        H = 0.5 * (H + H.T)
        theta, S = np.linalg.eigh(H)
        anorm = max(anorm, float(np.max(np.abs(theta))))
        order = _order(theta, which)
        active = order[: min(width, len(order))]
        Sa = _backend.from_host(np.ascontiguousarray(S[:, active].T), like=V)
        Y = Sa @ V
        R = Sa @ W - _backend.from_host(theta[active], like=V)[:, None] * Y
        resid = _backend.to_host_float64(_backend.vector_norm(xp, R, axis=1))
        threshold = np.maximum(
            tol * np.maximum(np.abs(theta[active]), eps ** (2.0 / 3.0) * anorm),
            (100.0 * eps if floor is None else floor) * anorm,
        )
        done = resid <= threshold
        return cls(theta, S, order, active, Y, R, resid, threshold, done, anorm)

    def result(
        self, xp: Any, V: Any, k: int, keep: int, *, products: int, blocks: int
    ) -> BlockEigenResult:
        """The converged ``k`` pairs, plus ``keep`` Ritz vectors as the warm-start subspace."""
        active, S = self.active, self.S
        return BlockEigenResult(
            values=self.theta[active[:k]].copy(),
            vectors=xp.permute_dims(self.Y[:k, :], (1, 0)),
            residuals=self.resid[:k].copy(),
            thresholds=self.threshold[:k].copy(),
            subspace=xp.permute_dims(
                _backend.from_host(np.ascontiguousarray(S[:, self.order[:keep]].T), like=V) @ V,
                (1, 0),
            ),
            products=products,
            blocks=blocks,
        )

    def next_block(
        self, xp: Any, V: Any, W: Any, k: int, width: int, max_basis: int, eps: float
    ) -> tuple[Any, Any, Any]:
        """``(V, W, block)`` for the next step: the unconverged residuals, orthonormalised.

        When the basis would outgrow ``max_basis``, it is first restarted with the
        ``max(width, max_basis // 2)`` most wanted Ritz vectors.
        """
        active, done, order = self.active, self.done, self.order
        grow = [i for i in range(min(k, len(active))) if not done[i]]
        if int(V.shape[0]) + len(grow) > max_basis:  # restart with the most wanted Ritz vectors
            kept = order[: max(width, max_basis // 2)]
            Sk = _backend.from_host(np.ascontiguousarray(self.S[:, kept].T), like=V)
            V, W = Sk @ V, Sk @ W
        R = self.R
        rows = xp.stack([R[i, :] for i in grow], axis=0) if grow else R[:0, :]
        return V, W, _orthonormal_rows(xp, V, rows, eps)


def _not_converged(ritz: _Ritz | None, k: int, tol: float, max_products: int) -> NumericalError:
    """The error of a run that ended without ``k`` converged pairs (from the last Ritz step)."""
    if ritz is None:
        return NumericalError(
            f"block_eigenpairs: no Ritz step was possible (the start block is empty); "
            f"0 of {k} eigenpairs converged to tol={tol:.1e}"
        )
    return NumericalError(
        f"block_eigenpairs: {int(np.sum(ritz.done[:k]))} of {k} eigenpairs converged to "
        f"tol={tol:.1e} within max_products={max_products} products (largest residual "
        f"{float(np.max(ritz.resid[:k])):.3e}); increase max_products or max_basis"
    )
