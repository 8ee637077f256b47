r"""What an operator's structure gives exactly: eigenvalues, trace, log-det, damped inverse.

Free functions registered by type (lineax's habit): each returns ``None`` when the
structure does not determine the quantity without iterating, so callers
(:func:`curvops.compare`) fall back to estimates and say so.

* :class:`~curvops.kfac.KroneckerEigenOperator` (K-FAC, E-KFAC, their inverses):
  from the factors' eigendecompositions.
* :class:`~curvops.Diagonal`, :class:`~curvops.Identity`: the entries.
* :class:`~curvops.LowRank` :math:`U\operatorname{diag}(s)U^\top`: with :math:`U = QR`,
  the eigenvalues of the :math:`r \times r` matrix :math:`R\operatorname{diag}(s)R^\top`
  and :math:`n - r` zeros.
* :class:`~curvops.Dense` (symmetric): ``eigvalsh``.
* :class:`~curvops.BlockDiagonal`: the union over blocks (when every block has them).
* :class:`~curvops.Affine` :math:`aB + bI`: :math:`a\lambda(B) + b`.

>>> import numpy as np
>>> from curvops.structured import Diagonal
>>> exact_eigenvalues(Diagonal(np.array([3.0, 1.0]))).tolist()
[1.0, 3.0]
>>> exact_logdet(Diagonal(np.array([1.0, np.e])))
1.0
>>> exact_inverse(Diagonal(np.array([1.0, 3.0])), 1.0) @ np.ones(2)
array([0.5 , 0.25])
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from curvops.algebra import Affine, BlockDiagonal
from curvops.kfac import KroneckerEigenOperator
from curvops.kronecker import rounding_floor
from curvops.operator import CurvatureOperator, is_scalar
from curvops.structured import Dense, Diagonal, Identity, LowRank
from spectral.errors import argument_error

__all__ = [
    "exact_eigenvalues",
    "exact_inverse",
    "exact_logdet",
    "exact_top_eigenpairs",
    "exact_trace",
]


def exact_eigenvalues(A: CurvatureOperator) -> torch.Tensor | None:
    r"""All eigenvalues of a symmetric structured ``A`` in ascending order, or ``None``.

    Eigenvalues zero to working precision are exactly ``0.0`` (as K-FAC's,
    :meth:`curvops.KFACOperator.eigenvalues`): a computed eigenvalue within its
    absolute rounding error of 0 has no meaningful sign or size, so its logarithm
    (:func:`exact_logdet`) or reciprocal would be a number where the matrix is singular.
    The rounding error of each structure (:func:`_rounding_floors`):

    * :class:`~curvops.Diagonal`, :class:`~curvops.Identity`: none, the entries are
      the eigenvalues (a zero is zero, a tiny positive entry stays);
    * :class:`~curvops.Dense` :math:`n \times n`: ``eigvalsh`` is backward stable, its
      eigenvalues are exact for :math:`A + E` with :math:`\|E\|_2 \le c\,n\,\varepsilon
      \|A\|_2`, so by Weyl each is off by at most that; with :math:`c = 1` and
      :math:`\|A\|_2 = \max|\lambda|` this is :math:`n\,\varepsilon\max|\lambda|`
      (:func:`curvops.kronecker.rounding_floor`, ``numpy.linalg.matrix_rank``'s tolerance);
    * :class:`~curvops.LowRank` :math:`U\,\mathrm{diag}(s)\,U^\top` (``n x r``): the
      Householder QR :math:`U + \Delta U = QR` (:math:`\|\Delta U\|_2 \lesssim n\varepsilon
      \|U\|_2`) moves :math:`U S U^\top` by :math:`2 n\varepsilon\sigma` to first order,
      with :math:`\sigma = \max|s|\,\|U\|_2^2 \ge \|USU^\top\|_2`; forming
      :math:`R S R^\top` (sums of :math:`r` products) and its ``eigvalsh`` add
      :math:`r\varepsilon\sigma` each: :math:`2(n + r)\,\varepsilon\,\sigma` in all
      (relative to :math:`\sigma`, not :math:`\max|\lambda|`: weights of both signs can
      cancel, :math:`uu^\top - uu^\top = 0`);
    * :class:`~curvops.BlockDiagonal`: each block's own;
    * :class:`~curvops.Affine` :math:`aB + bI`: :math:`|a|` times :math:`B`'s plus the
      rounding of :math:`a\lambda + b`, :math:`2\varepsilon(|a\lambda| + |b|)`;
    * K-FAC, E-KFAC: already zeroed by the operator (``rounding_floor`` of each block).

    :math:`\varepsilon` is that of the dtype the eigenvalues are computed in.

    Parameters
    ----------
    A : CurvatureOperator
        A symmetric operator.

    Returns
    -------
    torch.Tensor or None
        The eigenvalues, ascending, or ``None`` when the structure does not give them.

    Examples
    --------
    >>> import numpy as np
    >>> from curvops import Dense, Diagonal
    >>> exact_eigenvalues(Diagonal(np.array([3.0, 1.0]))).tolist()
    [1.0, 3.0]
    >>> B = np.array([[1.0], [2.0]])
    >>> exact_eigenvalues(Dense(B @ B.T, symmetric=True)).tolist()  # rank 1: an exact 0
    [0.0, 5.0]
    """
    parts = _rounding_floors(A)
    if parts is None:
        return None
    values, floor = parts
    values = torch.where(values.abs() <= floor, torch.zeros_like(values), values)
    return torch.sort(values).values


def _rounding_floors(A: CurvatureOperator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, floors)``: the computed eigenvalues of ``A`` (any order) and each one's
    absolute rounding error (see :func:`exact_eigenvalues`), or ``None``."""
    if not isinstance(A, CurvatureOperator) or not A.symmetric:
        return None
    if isinstance(A, KroneckerEigenOperator | Diagonal | Identity):
        if isinstance(A, KroneckerEigenOperator):
            values = A.eigenvalues()  # zero to working precision already exactly 0
        elif isinstance(A, Diagonal):
            values = A.diagonal
        else:
            values = torch.ones(A.shape[0], dtype=A.torch_dtype, device=A.device)
        return values, torch.zeros_like(values)
    if isinstance(A, LowRank):
        _, R = torch.linalg.qr(A.factor)
        small = torch.linalg.eigvalsh((R * A.weights) @ R.T)
        values = torch.cat([small, small.new_zeros(A.shape[0] - small.shape[0])])
        return values, torch.full_like(values, _low_rank_floor(A.weights, R, A.shape[0]))
    if isinstance(A, Dense):
        values = torch.linalg.eigvalsh(A.matrix)
        return values, torch.full_like(values, rounding_floor(values, A.shape[0]))
    if isinstance(A, BlockDiagonal):
        parts = [_rounding_floors(b) for b in A.blocks]
        if any(p is None for p in parts):
            return None
        found = [p for p in parts if p is not None]
        return torch.cat([p[0] for p in found]), torch.cat([p[1] for p in found])
    if isinstance(A, Affine):
        base = _rounding_floors(A.base)
        if base is None:
            return None
        eps = float(torch.finfo(base[0].dtype).eps)
        scaled = A.a * base[0]
        floor = abs(A.a) * base[1] + 2.0 * eps * (scaled.abs() + abs(A.b))
        return scaled + A.b, floor
    return None


def _low_rank_floor(weights: torch.Tensor, R: torch.Tensor, n: int, damping: float = 0.0) -> float:
    """:math:`2(n + r)\\,\\varepsilon\\,(\\max|s|\\,\\|R\\|_2^2 + \\delta)`: the rounding error of
    the eigenvalues of :math:`USU^\\top + \\delta I` (``n x r``) from :math:`U = QR` (see
    :func:`exact_eigenvalues`; :math:`\\|R\\|_2 = \\|U\\|_2`; ``eps`` of ``R``'s dtype)."""
    r = weights.numel()
    sigma = 0.0
    if R.numel() and r:
        norm = float(torch.linalg.matrix_norm(R.to(torch.float64), ord=2))
        sigma = float(weights.abs().max()) * norm**2
    return 2.0 * (n + r) * float(torch.finfo(R.dtype).eps) * (sigma + damping)


def exact_trace(A: CurvatureOperator) -> float | None:
    """:math:`\\operatorname{tr}A` from the structure, or ``None``.

    Parameters
    ----------
    A : CurvatureOperator
        A symmetric operator.

    Returns
    -------
    float or None
        The trace, or ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvops import Diagonal
    >>> exact_trace(Diagonal(np.array([3.0, 1.0])))
    4.0
    """
    if isinstance(A, KroneckerEigenOperator):
        return A.trace()
    if isinstance(A, Diagonal):
        return float(A.diagonal.sum())
    values = exact_eigenvalues(A)
    return None if values is None else float(values.sum())


def exact_logdet(A: CurvatureOperator) -> float | None:
    """:math:`\\log\\det A` from the structure (``-inf`` if singular or indefinite), or ``None``.

    Singular means singular to working precision: an eigenvalue within its rounding error
    of 0 is exactly 0 in :func:`exact_eigenvalues` (``eigvalsh`` of an exactly singular
    :math:`BB^\\top` returns :math:`\\pm 10^{-16}`, whose log would give a finite
    number), so the result is ``-inf`` there; a diagonal's entries are taken as they are.
    A nonsingular matrix keeps its finite log-determinant, off by at most
    :math:`\\sum_i \\phi_i / \\lambda_i` to first order for eigenvalue errors
    :math:`\\phi_i` (the floors of :func:`exact_eigenvalues`).

    Parameters
    ----------
    A : CurvatureOperator
        A symmetric operator.

    Returns
    -------
    float or None
        The log-determinant, or ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvops import Diagonal
    >>> exact_logdet(Diagonal(np.array([1.0, np.e])))
    1.0
    >>> exact_logdet(Diagonal(np.array([1.0, 0.0])))
    -inf
    """
    values = exact_eigenvalues(A)
    if values is None:
        return None
    values = values.to(torch.float64)
    if values.numel() and float(values.min()) <= 0.0:
        return -math.inf
    return float(torch.log(values).sum())


def exact_inverse(A: CurvatureOperator, damping: float) -> CurvatureOperator | None:
    """:math:`(A + \\delta I)^{-1}` as a structured operator, or ``None``.

    Parameters
    ----------
    A : CurvatureOperator
        A symmetric operator.
    damping : float
        The damping :math:`\\delta \\ge 0`.

    Returns
    -------
    CurvatureOperator or None
        The structured inverse, or ``None``.

    Raises
    ------
    ValueError
        Negative or non-finite ``damping``, or :math:`A + \\delta I` singular to working
        precision (for the diagonal and dense cases; named ``A`` when :math:`\\delta = 0`).
        Indefinite but nonsingular matrices have inverses (not flagged psd).

    Examples
    --------
    >>> import numpy as np
    >>> from curvops import Diagonal
    >>> exact_inverse(Diagonal(np.array([1.0, 3.0])), 1.0) @ np.ones(2)
    array([0.5 , 0.25])
    """
    if not is_scalar(damping) or not np.isfinite(damping) or damping < 0:
        raise argument_error("damping", "a finite real number >= 0", damping)
    if isinstance(A, KroneckerEigenOperator):
        return A.inverse(float(damping))
    if isinstance(A, Diagonal):
        d = A.diagonal + damping
        _check_nonsingular(d, rounding_floor(d, 1), A, damping)
        return Diagonal(1.0 / d)
    if isinstance(A, Dense) and A.symmetric:
        M = A.matrix + damping * torch.eye(A.shape[0], dtype=A.torch_dtype, device=A.device)
        lam, U = torch.linalg.eigh(M)
        _check_nonsingular(lam, rounding_floor(lam, A.shape[0]), A, damping)
        return Dense((U / lam) @ U.T, symmetric=True, psd=bool((lam > 0).all()) or None)
    if isinstance(A, LowRank):
        return _low_rank_inverse(A, float(damping))
    if isinstance(A, BlockDiagonal):
        blocks = [exact_inverse(b, damping) for b in A.blocks]
        if any(b is None for b in blocks):
            return None
        return BlockDiagonal([b for b in blocks if b is not None], positions=A.positions)
    return None


def _check_nonsingular(
    values: torch.Tensor, floor: float, A: CurvatureOperator, damping: float
) -> None:
    """Refuse eigenvalues of :math:`A + \\delta I` within ``floor`` of 0.

    Their inverse would be rounding noise.  ``floor`` is the eigenvalues' absolute
    rounding error: :math:`n\\varepsilon\\max|\\lambda|` for a symmetric matrix's
    ``eigh`` (backward stable), :math:`\\varepsilon\\max|d + \\delta|` for a diagonal
    (:math:`n = 1`, the rounding of adding :math:`\\delta`), :func:`_low_rank_floor` for
    :math:`USU^\\top + \\delta I`; all relative to the operator's own scale, so a
    well-conditioned operator of any scale (:math:`10^{-14} I`) is inverted.  Indefinite
    but nonsingular is fine (a Hessian's proxy).
    """
    if values.numel() == 0:
        return
    mags = values.abs()
    if bool((mags > floor).all()):
        return
    detail = (
        f"(an eigenvalue {float(mags.min()):.3g} is zero to working precision, "
        f"|lambda| <= {floor:.3g}; indefinite is fine)"
    )
    if damping == 0:
        raise argument_error("A", f"a nonsingular operator {detail}", A)
    raise argument_error("damping", f"a value making A + damping * I nonsingular {detail}", damping)


def _low_rank_inverse(A: LowRank, damping: float) -> CurvatureOperator:
    """:math:`(U S U^\\top + \\delta I)^{-1} = \\delta^{-1} I + W (\\mathrm{diag}
    (e + \\delta)^{-1} - \\delta^{-1} I) W^\\top`, with :math:`U = QR`,
    :math:`R S R^\\top = E\\,\\mathrm{diag}(e)\\,E^\\top` and :math:`W = QE` (in float64):
    exact, with no iterative solve (a conjugate-gradient solve of a float32 low-rank
    proxy could not reach its tolerance); indefinite but nonsingular is fine (a Hessian's
    low-rank proxy).  Refused where an :math:`e_i + \\delta` is within the rounding error
    :func:`_low_rank_floor` (relative to :math:`\\max|s|\\|U\\|_2^2 + \\delta`, float64) of
    0; rank 0 gives :math:`\\delta^{-1} I`."""
    U = A.factor.to(torch.float64)
    weights = A.weights.to(torch.float64)
    n, r = U.shape
    if damping <= 0.0 and r < n:
        raise argument_error(
            "damping", f"a positive value (a rank-{r} operator of size {n} is singular)", damping
        )
    Q, R = torch.linalg.qr(U)
    core = R @ torch.diag(weights) @ R.T
    e, E = torch.linalg.eigh(0.5 * (core + core.T))
    shifted = e + damping
    _check_nonsingular(shifted, _low_rank_floor(weights, R, n, damping), A, damping)
    W = (Q @ E).to(A.torch_dtype)
    if damping == 0.0:  # full rank
        return LowRank(W, (1.0 / e).to(A.torch_dtype))
    correction = (1.0 / shifted - 1.0 / damping).to(A.torch_dtype)
    return Affine(LowRank(W, correction), 1.0, 1.0 / damping)


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``values``, largest first (ties: lower index first)."""
    order = torch.sort(values, descending=True, stable=True).indices
    return order[:k]


def exact_top_eigenpairs(A: CurvatureOperator, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``k`` largest eigenvalues (descending) and unit eigenvectors (``n x k``), or ``None``.

    From the structure, without products; ``None`` where it does not give them (then
    use :func:`spectral.top_eigenpairs`).

    Parameters
    ----------
    A : CurvatureOperator
        A symmetric operator.
    k : int
        Number of eigenpairs (a Python or numpy integer; ``None`` is returned unless
        :math:`1 \\le k \\le n`).

    Returns
    -------
    (torch.Tensor, torch.Tensor) or None
        Eigenvalues (descending; zero to working precision exactly 0, as in
        :func:`exact_eigenvalues`) and eigenvectors, or ``None``.

    Raises
    ------
    TypeError
        ``k`` not an integer (a float, a boolean).

    Examples
    --------
    >>> import numpy as np
    >>> from curvops.structured import Diagonal
    >>> values, vectors = exact_top_eigenpairs(Diagonal(np.array([1.0, 3.0, 2.0])), 2)
    >>> values.tolist(), vectors.argmax(0).tolist()
    ([3.0, 2.0], [1, 2])
    """
    if isinstance(k, bool | np.bool_) or not isinstance(k, numbers.Integral):
        raise argument_error("k", "an integer (the number of eigenpairs)", k, kind=TypeError)
    k = int(k)
    n = A.shape[0]
    if not isinstance(A, CurvatureOperator) or not A.symmetric or not 1 <= k <= n:
        return None
    dtype, device = A.torch_dtype, A.device
    if isinstance(A, KroneckerEigenOperator):
        eig = A.eigen_blocks()
        flat = [e.values.reshape(-1) for e in eig]
        rem = A.remainder_diagonal()
        values = torch.cat([*flat, rem])
        idx = _top(values, k)
        vectors = torch.zeros(n, k, dtype=dtype, device=device)
        sizes = [f.numel() for f in flat]
        starts = np.cumsum([0, *sizes]).tolist()
        rem_pos = A._remainder_positions
        for col, i in enumerate(idx.tolist()):
            b = int(np.searchsorted(starts, i, side="right")) - 1
            if b < len(eig):
                e, block = eig[b], A.blocks[b]
                r, c = divmod(i - starts[b], block.cols)
                v = torch.outer(e.U_G[:, r], e.U_A[:, c]).reshape(-1)
                vectors[block.positions.reshape(-1).to(device), col] = v
            else:
                vectors[rem_pos[i - starts[-1]], col] = 1.0
        return values[idx], vectors
    if isinstance(A, Diagonal):
        d = A.diagonal
        idx = _top(d, k)
        vectors = torch.zeros(n, k, dtype=dtype, device=device)
        vectors[idx, torch.arange(k, device=device)] = 1.0
        return d[idx], vectors
    if isinstance(A, Dense):
        lam, U = torch.linalg.eigh(A.matrix)
        floor = rounding_floor(lam, n)  # as exact_eigenvalues: zero to working precision
        lam = torch.where(lam.abs() <= floor, torch.zeros_like(lam), lam)
        idx = _top(lam, k)
        return lam[idx], U[:, idx]
    if isinstance(A, LowRank):
        Q, R = torch.linalg.qr(A.factor)
        lam, S = torch.linalg.eigh((R * A.weights) @ R.T)
        idx = _top(lam, k)
        if k > lam.numel() or float(lam[idx[-1]]) <= _low_rank_floor(A.weights, R, n):
            return None  # the top k reach into the null space (to working precision)
        return lam[idx], (Q @ S)[:, idx]
    if isinstance(A, BlockDiagonal):
        parts = [exact_top_eigenpairs(b, min(k, b.shape[0])) for b in A.blocks]
        if any(p is None for p in parts):
            return None
        vals, vecs = [], []
        for j, part in enumerate(parts):
            if part is None:  # pragma: no cover - excluded above
                return None
            pv, pV = part
            full = torch.zeros(n, pV.shape[1], dtype=dtype, device=device)
            full[A.block_index(j)] = pV
            vals.append(pv)
            vecs.append(full)
        allv, allV = torch.cat(vals), torch.cat(vecs, dim=1)
        idx = _top(allv, k)
        return allv[idx], allV[:, idx]
    if isinstance(A, Affine) and A.a > 0:
        base = exact_top_eigenpairs(A.base, k)
        if base is None:
            return None
        return A.a * base[0] + A.b, base[1]
    return None
