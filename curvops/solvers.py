"""Inverse products :math:`x = A^{-1} b` by Krylov solvers in torch on the operator's device.

:func:`inverse` wraps a symmetric operator ``A`` in an :class:`InverseOperator` whose
product solves :math:`Ax = b` for every column of ``b`` at once (one batched product of
``A`` per iteration, columns converging independently):

* ``"cg"`` — conjugate gradients, for positive (semi-)definite ``A`` (e.g. ``G.damp(delta)``);
* ``"minres"`` — Paige–Saunders MINRES, for symmetric indefinite ``A`` (e.g. ``H.shift(mu)``);
  it minimises :math:`\\|b - Ax_j\\|` over the Krylov space :math:`\\mathcal{K}_j(A, b)`;
* ``"lanczos"`` — Lanczos with full reorthogonalisation solving the projected tridiagonal
  system :math:`T_j y = \\|b\\| e_1`, :math:`x_j = Q_j y` (FOM; one column at a time, the basis
  :math:`n \\times j` is stored).

Stopping rule: relative residual :math:`\\|b - Ax_j\\| \\le \\mathrm{tol}\\,\\|b\\|`, measured by
the solver's own recurrence (CG's updated residual, MINRES's :math:`\\bar\\phi_j`, Lanczos'
:math:`\\beta_{j+1}|e_j^\\top y|`), so no extra product is spent.  In float32 the attainable
relative residual is about :math:`\\varepsilon\\,\\kappa(A)`; choose ``tol`` accordingly.

After each product, ``.last_info`` (a :class:`SolveInfo`) records iterations and residuals.
A column that does not converge within ``maxiter`` raises
:class:`spectral.errors.NumericalError` naming the columns, the iteration and the residual
(a singular system with a right-hand side outside the range returned vectors of norm
:math:`10^{17}` before this was the default); with ``strict=False`` it is logged as a
warning instead, flagged in ``last_info.converged``, and the iterate is returned.
NaN or Inf never becomes a number: a right-hand side with NaN/Inf, a product of ``A`` with
NaN/Inf, or a non-finite solution raises :class:`spectral.errors.NumericalError` naming the
column or the iteration, for every method and whatever ``strict`` says.

The products are approximations of :math:`A^{-1}b` to ``tol``: the inverse operator is
flagged symmetric (and psd when ``A`` is), which holds up to that tolerance.

>>> import numpy as np
>>> from curvops.structured import Dense
>>> A = Dense(np.array([[4.0, 1.0], [1.0, 3.0]]), psd=True)
>>> Ainv = inverse(A, method="cg", tol=1e-12)
>>> np.allclose(A @ (Ainv @ np.array([1.0, 2.0])), [1.0, 2.0])
True
>>> Ainv.last_info.converged, Ainv.last_info.iterations
(True, 2)
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch

from curvops.operator import CurvatureOperator
from spectral.errors import NumericalError, argument_error

__all__ = ["InverseOperator", "SolveInfo", "inverse"]

logger = logging.getLogger(__name__)

_METHODS = ("cg", "minres", "lanczos")

Apply = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SolveInfo:
    """Convergence record of one inverse product (all columns of the right-hand side).

    Attributes
    ----------
    method:
        ``"cg"``, ``"minres"`` or ``"lanczos"``.
    iterations:
        Largest number of iterations (products with ``A``) over the columns.
    residual:
        Largest true relative residual :math:`\\|b - Ax\\|/\\|b\\|` over the columns
        (computed with one product after the solve, not the recurrence's estimate).
    converged:
        Whether every column reached ``tol``.
    column_iterations, column_residuals, column_converged:
        The same, per column.

    Examples
    --------
    >>> import numpy as np
    >>> from curvops import Diagonal, inverse
    >>> Dinv = inverse(Diagonal([1.0, 3.0]), method="minres")
    >>> _ = Dinv @ np.ones(2)
    >>> info = Dinv.last_info
    >>> info.method, info.converged, info.iterations <= 2
    ('minres', True, True)
    """

    method: str
    iterations: int
    residual: float
    converged: bool
    column_iterations: tuple[int, ...]
    column_residuals: tuple[float, ...]
    column_converged: tuple[bool, ...]


def _column_norms(V: torch.Tensor) -> torch.Tensor:
    """The 2-norm of each column (of a vector: its norm), computed on the column divided by
    its largest magnitude, so that it neither overflows nor underflows where the norm
    itself is representable (``vector_norm`` squares: ``[1e200, 1e200]`` gave inf, and an
    operator of norm 1e160 stopped MINRES on "overflow")."""
    largest = V.abs().amax(dim=0)
    safe = torch.where(largest > 0, largest, torch.ones_like(largest))
    return largest * torch.linalg.vector_norm(V / safe, dim=0)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0``, else 0 (keeps finished columns finite)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _apply_active(apply: Apply, V: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``A @ V`` computed only on the active columns (zeros elsewhere)."""
    if bool(active.all()):
        return apply(V)
    out = torch.zeros_like(V)
    idx = torch.nonzero(active).flatten()
    out[:, idx] = apply(V[:, idx])
    return out


def cg_solve(
    apply: Apply, B: torch.Tensor, tol: float, maxiter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched conjugate gradients for :math:`AX = B` (``A`` symmetric positive definite).

    Returns ``(X, iterations, relative_residuals, converged)`` (the last three per column).
    A column meeting non-positive curvature :math:`p^\\top A p \\le 0` stops unconverged.
    """
    k = B.shape[1]
    bnorm = torch.linalg.vector_norm(B, dim=0)
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    target = tol * bnorm
    active = bnorm > 0
    converged = ~active
    iters = torch.zeros(k, dtype=torch.int64, device=B.device)
    for _ in range(maxiter):
        if not bool(active.any()):
            break
        AP = _apply_active(apply, P, active)
        pAp = (P * AP).sum(0)
        active = active & (pAp > 0)
        alpha = torch.where(active, _safe_div(rs, pAp), torch.zeros_like(rs))
        X = X + alpha * P
        R = R - alpha * AP
        rs_new = (R * R).sum(0)
        iters = iters + active.to(torch.int64)
        done = active & (rs_new.sqrt() <= target)
        converged = converged | done
        active = active & ~done
        beta = torch.where(active, _safe_div(rs_new, rs), torch.zeros_like(rs))
        P = R + beta * P
        rs = rs_new
    relres = _safe_div(rs.sqrt(), bnorm)
    return X, iters, relres, converged


def minres_solve(
    apply: Apply, B: torch.Tensor, tol: float, maxiter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched MINRES (Paige & Saunders 1975) for symmetric, possibly indefinite ``A``.

    Lanczos tridiagonalisation :math:`AQ_j = Q_{j+1}\\underline{T}_j` with a QR factorisation
    of :math:`\\underline{T}_j` by Givens rotations updated one column per step; the iterate
    :math:`x_j = Q_j y_j` minimises :math:`\\|b - Ax\\|` and :math:`\\bar\\phi_j = \\|b - Ax_j\\|`.
    The rotation norm :math:`\\gamma_j = \\|(\\bar\\gamma_j, \\beta_{j+1})\\|` is floored at
    :math:`\\varepsilon\\,\\|T\\|` (with :math:`\\|T\\| \\approx \\max_j \\|(\\alpha_j,
    \\beta_{j+1})\\| \\le \\|A\\|`), a floor relative to the operator's scale, so the
    iteration is scale-equivariant: :math:`(2^k A)\\,x = b` gives :math:`2^{-k} x`
    (an absolute floor :math:`\\varepsilon` stalls once :math:`\\|A\\| < \\varepsilon`).
    Returns ``(X, iterations, relative_residuals, converged)``.
    """
    k = B.shape[1]
    tiny = torch.finfo(B.dtype).tiny
    eps = torch.finfo(B.dtype).eps
    zeros = torch.zeros(k, dtype=B.dtype, device=B.device)
    beta1 = torch.linalg.vector_norm(B, dim=0)
    X = torch.zeros_like(B)
    r1 = B.clone()
    r2 = B.clone()
    y = B.clone()
    oldb = zeros.clone()
    beta = beta1.clone()
    dbar = zeros.clone()
    epsln = zeros.clone()
    phibar = beta1.clone()
    tnorm = zeros.clone()  # running estimate of ||T|| <= ||A||
    cs = -torch.ones_like(zeros)
    sn = zeros.clone()
    w = torch.zeros_like(B)
    w2 = torch.zeros_like(B)
    active = beta1 > 0
    converged = ~active
    iters = torch.zeros(k, dtype=torch.int64, device=B.device)
    for itn in range(1, maxiter + 1):
        if not bool(active.any()):
            break
        v = _safe_div(torch.ones_like(beta), beta) * y
        y = _apply_active(apply, v, active)
        if itn >= 2:
            y = y - _safe_div(beta, oldb) * r1
        alfa = (v * y).sum(0)
        y = y - _safe_div(alfa, beta) * r2
        r1 = r2
        r2 = y
        oldb = beta
        beta = _column_norms(r2)
        # Apply the previous rotation, then build and apply the new one.
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        tnorm = torch.maximum(tnorm, torch.hypot(alfa, beta))
        floor = torch.clamp(eps * tnorm, min=tiny)
        gamma = torch.maximum(torch.hypot(gbar, beta), floor)
        cs = gbar / gamma
        sn = beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1 = w2
        w2 = w
        w = (v - oldeps * w1 - delta * w2) / gamma
        X = torch.where(active, X + phi * w, X)
        iters = iters + active.to(torch.int64)
        done = active & (phibar <= tol * beta1)
        converged = converged | done
        # beta == 0: the Krylov space is invariant; the iterate is final.
        active = active & ~done & (beta > tiny)
    relres = _safe_div(phibar, beta1)
    return X, iters, relres, converged


def lanczos_solve(
    apply: Apply, B: torch.Tensor, tol: float, maxiter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lanczos (FOM) with full reorthogonalisation, column by column.

    Builds :math:`Q_j` and :math:`T_j` from :math:`q_1 = b/\\|b\\|`, solves
    :math:`T_j y = \\|b\\| e_1` in float64 on the host (banded solver, :math:`O(j)`), and
    stops when :math:`\\beta_{j+1}|e_j^\\top y| \\le \\mathrm{tol}\\,\\|b\\|` (the residual norm).
    Steps with a singular :math:`T_j` (possible for indefinite ``A``) are skipped.
    Returns ``(X, iterations, relative_residuals, converged)``.
    """
    k = B.shape[1]
    X = torch.zeros_like(B)
    iters = np.zeros(k, dtype=np.int64)
    relres = np.zeros(k)
    converged = np.zeros(k, dtype=bool)
    for col in range(k):
        b = B[:, col]
        bnorm = float(torch.linalg.vector_norm(b))
        if bnorm == 0.0:
            converged[col] = True
            continue
        Q = [b / bnorm]
        alphas: list[float] = []
        betas: list[float] = []
        ycoef: np.ndarray[Any, np.dtype[np.float64]] | None = None
        res = 1.0
        for j in range(maxiter):
            q = Q[-1]
            wv = apply(q[:, None])[:, 0]
            alpha = float(q @ wv)
            wv = wv - alpha * q
            if j > 0:
                wv = wv - betas[-1] * Q[-2]
            Qm = torch.stack(Q, dim=1)
            for _ in range(2):
                wv = wv - Qm @ (Qm.mT @ wv)
            bnext = float(_column_norms(wv))
            alphas.append(alpha)
            m = len(alphas)
            ab = np.zeros((3, m))
            ab[1] = alphas
            ab[0, 1:] = betas
            ab[2, :-1] = betas
            rhs = np.zeros(m)
            rhs[0] = bnorm
            iters[col] = m
            try:
                ycoef = scipy.linalg.solve_banded((1, 1), ab, rhs)
                res = bnext * abs(float(ycoef[-1])) / bnorm
            except (np.linalg.LinAlgError, ValueError):
                ycoef = None
                res = math.inf
            anorm = max(max(abs(a) for a in alphas), max(betas, default=0.0), bnext)
            invariant = bnext <= 10.0 * torch.finfo(B.dtype).eps * anorm
            if res <= tol or invariant or m >= maxiter:
                break
            betas.append(bnext)
            Q.append(wv / bnext)
        Qm = torch.stack(Q[: len(alphas)], dim=1)
        if ycoef is None:  # singular T at the last step: least-squares coefficients
            T = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1)
            T = T + np.diag(betas[: len(alphas) - 1], -1)
            e1 = np.zeros(len(alphas))
            e1[0] = bnorm
            ycoef = np.linalg.lstsq(T, e1, rcond=None)[0]
        X[:, col] = Qm @ torch.from_numpy(np.asarray(ycoef)).to(B.device, B.dtype)
        relres[col] = res
        converged[col] = res <= tol
    return (
        X,
        torch.from_numpy(iters),
        torch.from_numpy(relres),
        torch.from_numpy(converged),
    )


_SOLVERS = {"cg": cg_solve, "minres": minres_solve, "lanczos": lanczos_solve}


class InverseOperator(CurvatureOperator):
    """:math:`A^{-1}` applied by a Krylov solver; build with :func:`inverse`.

    Attributes
    ----------
    operator:
        The operator ``A``.
    method, tol, maxiter, strict:
        Solver settings.
    last_info:
        :class:`SolveInfo` of the most recent product (``None`` before the first); the only
        state that changes after construction.

    Examples
    --------
    >>> import numpy as np
    >>> from curvops import Diagonal, inverse
    >>> Dinv = inverse(Diagonal([2.0, 4.0]), method="cg")
    >>> Dinv @ np.array([2.0, 2.0]), Dinv.last_info.converged
    (array([1. , 0.5]), True)
    """

    def __init__(
        self,
        A: CurvatureOperator,
        *,
        method: str,
        tol: float,
        maxiter: int,
        strict: bool,
    ) -> None:
        super().__init__(
            shape=A.shape,
            torch_dtype=A.torch_dtype,
            device=A.device,
            symmetric=True,
            psd=A.psd,
        )
        self._A = A
        self._method = method
        self._tol = tol
        self._maxiter = maxiter
        self._strict = strict
        self.args = (A,)
        self.last_info: SolveInfo | None = None

    @property
    def operator(self) -> CurvatureOperator:
        """The operator being inverted."""
        return self._A

    @property
    def method(self) -> str:
        """``"cg"``, ``"minres"`` or ``"lanczos"``."""
        return self._method

    @property
    def tol(self) -> float:
        """Relative residual tolerance."""
        return self._tol

    @property
    def maxiter(self) -> int:
        """Iteration limit per column."""
        return self._maxiter

    def _true_residuals(
        self, B: torch.Tensor, Y: torch.Tensor, estimated: torch.Tensor, claimed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`\\|b - Ay\\|/\\|b\\|` per column, from one more product, and convergence.

        The solvers' residuals are recurrence estimates; they drift from the true
        residual by rounding, and far from it where the recurrence breaks down (MINRES on
        a singular, inconsistent system reported 0.3 while the true relative residual was
        3.5e14).  A column counts as converged when its solver said so and its true
        residual is within ``tol`` up to the attainable accuracy
        :math:`100\\,\\varepsilon (1 + \\|Ay\\|/\\|b\\|)` (the rounding of forming
        :math:`b - Ay` itself).  Columns with :math:`b = 0` keep their estimate (0).
        """
        AY = self._A._apply(Y)
        norm_b = torch.linalg.vector_norm(B, dim=0)
        safe_b = torch.where(norm_b > 0, norm_b, 1.0)
        true = torch.where(norm_b > 0, _column_norms(B - AY) / safe_b, estimated)
        eps = torch.finfo(B.dtype).eps
        attainable = 100.0 * eps * (1.0 + _column_norms(AY) / safe_b)
        converged = claimed & (true <= torch.clamp(attainable, min=self._tol))
        return true, converged

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        solver = _SOLVERS[self._method]
        finite = torch.isfinite(X).all(dim=0)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            dtype = str(X.dtype).removeprefix("torch.")
            raise NumericalError(
                f"inverse({self._method}): the right-hand side has NaN or Inf in column(s) "
                f"{bad[:10]} (iteration 0; in the operator's dtype, {dtype}: entries beyond "
                "its range overflow when converted)"
            )
        counter = [0]

        def checked(V: torch.Tensor) -> torch.Tensor:
            # One host synchronisation per iteration, beside the solvers' own.
            counter[0] += 1
            out = self._A._apply(V)
            if not bool(torch.isfinite(out).all()):
                raise NumericalError(
                    f"inverse({self._method}): the product with A gave NaN or Inf at "
                    f"iteration {counter[0]}"
                )
            return out

        # Each column is solved scaled by a power of two to a largest entry in [1/2, 1):
        # exact, and the norms of the recurrences neither underflow (a right-hand side of
        # 1e-200 gave x = 0 "converged") nor overflow (1e154 gave NaN).
        _, exponents = torch.frexp(X.abs().amax(dim=0))
        B = torch.ldexp(X, -exponents)
        # No torch.no_grad() here: the operator's own product may need autograd.
        Y, iters, relres, claimed = solver(checked, B, self._tol, self._maxiter)
        finite = torch.isfinite(Y).all(dim=0)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise NumericalError(
                f"inverse({self._method}): the solution has NaN or Inf in column(s) {bad[:10]} "
                f"after {counter[0]} iterations (overflow in the recurrence)"
            )
        relres, conv = self._true_residuals(B, Y, relres, claimed)
        Y = torch.ldexp(Y, exponents)
        if not bool(torch.isfinite(Y).all()):
            bad = torch.nonzero(~torch.isfinite(Y).all(dim=0)).flatten().tolist()
            raise NumericalError(
                f"inverse({self._method}): the solution of column(s) {bad[:10]} is beyond "
                f"the range of {str(Y.dtype).removeprefix('torch.')} (overflow)"
            )
        col_iters = tuple(int(i) for i in iters.tolist())
        col_res = tuple(float(r) for r in relres.tolist())
        col_conv = tuple(bool(c) for c in conv.tolist())
        info = SolveInfo(
            method=self._method,
            iterations=max(col_iters, default=0),
            residual=max(col_res, default=0.0),
            converged=all(col_conv),
            column_iterations=col_iters,
            column_residuals=col_res,
            column_converged=col_conv,
        )
        self.last_info = info
        if not info.converged:
            bad = [i for i, c in enumerate(col_conv) if not c]
            message = (
                f"inverse({self._method}): columns {bad} did not converge to tol={self._tol:g} "
                f"within {self._maxiter} iterations (iteration {info.iterations}; largest "
                f"relative residual {info.residual:.3g})"
            )
            stopped = [i for i in bad if not bool(claimed[i]) and col_iters[i] < self._maxiter]
            if self._method == "cg" and stopped:
                message += (
                    f"; columns {stopped} stopped early on non-positive curvature p^T A p <= 0: "
                    "A is not positive definite (method='minres' takes indefinite systems)"
                )
            if self._strict:
                raise NumericalError(message)
            logger.warning(message)
        return Y


def inverse(
    A: CurvatureOperator,
    method: str = "cg",
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    assume_psd: bool = False,
    strict: bool = True,
) -> InverseOperator:
    """Return an operator whose product solves :math:`Ax = b` on ``A``'s device.

    Parameters
    ----------
    A:
        A symmetric :class:`~curvops.operator.CurvatureOperator` (square, nonsingular on
        the right-hand sides used).
    method:
        ``"cg"`` (requires ``A.psd`` unless ``assume_psd=True``), ``"minres"`` (symmetric
        indefinite) or ``"lanczos"`` (full reorthogonalisation; stores the basis).
    tol:
        Relative residual tolerance :math:`\\|b - Ax\\| \\le \\mathrm{tol}\\,\\|b\\|`.
    maxiter:
        Iterations per column; default ``10 n`` (cg), ``5 n`` (minres), ``n`` (lanczos).
    assume_psd:
        Let CG run on an operator not flagged psd (e.g. a damped Hessian known to be
        positive definite).
    strict:
        Raise :class:`~spectral.errors.NumericalError` on non-convergence (the default);
        ``False`` logs a warning and returns the unconverged iterate, flagged in
        ``last_info`` (for inexact inner solves whose accuracy the caller controls).

    Returns
    -------
    InverseOperator
        The operator :math:`A^{-1}`; its ``last_info`` is the :class:`SolveInfo` of the latest
        product.

    Raises
    ------
    TypeError
        ``A`` not a CurvatureOperator.
    ValueError
        Unknown method, non-symmetric ``A``, CG on an operator not flagged psd, bad
        ``tol``/``maxiter``.
    spectral.errors.NumericalError
        (At a product.) NaN/Inf in the right-hand side, in a product of ``A`` or in the
        solution, for every method, ``strict`` or not; non-convergence with ``strict=True``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvops.structured import Diagonal
    >>> Hinv = inverse(Diagonal([2.0, -4.0]), method="minres", tol=1e-12)
    >>> Hinv @ np.array([1.0, 1.0])
    array([ 0.5 , -0.25])
    """
    if not isinstance(A, CurvatureOperator):
        raise argument_error("A", "a curvops CurvatureOperator", A, kind=TypeError)
    if method not in _METHODS:
        raise argument_error("method", f"one of {_METHODS}", method)
    if not A.symmetric:
        raise argument_error("A", "a symmetric operator (flag symmetric=True)", A)
    if method == "cg" and not (A.psd or assume_psd):
        raise argument_error(
            "A",
            "a psd operator for method='cg' (use method='minres' for indefinite operators, "
            "A.damp(delta) on a psd operator, or pass assume_psd=True)",
            A,
        )
    if not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
        raise argument_error("tol", "a finite real number >= 0", tol)
    n = A.shape[0]
    if maxiter is None:
        maxiter = max(1, {"cg": 10 * n, "minres": 5 * n, "lanczos": n}[method])
    if not isinstance(maxiter, numbers.Integral) or isinstance(maxiter, bool) or maxiter < 1:
        raise argument_error("maxiter", "a positive integer", maxiter)
    return InverseOperator(A, method=method, tol=float(tol), maxiter=int(maxiter), strict=strict)
