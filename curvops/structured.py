"""Explicitly structured operators: identity, diagonal, dense and symmetric low-rank matrices.

Constructors accept numpy arrays, torch tensors, cupy arrays or nested lists; the data
is copied to a private tensor (so the operator is immutable).  The device defaults to
the input's own device and the dtype to the input's floating dtype (float64 for integer
or list input); both may be overridden with ``device=`` / ``dtype=``.

>>> import numpy as np
>>> LowRank(np.array([[1.0], [1.0]]), np.array([2.0])) @ np.array([1.0, 0.0])
array([2., 2.])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from curvops._arrays import as_tensor_arg, torch_dtype_of
from curvops.operator import CurvatureOperator
from spectral.errors import argument_error

__all__ = ["Dense", "Diagonal", "Identity", "LowRank"]


class Identity(CurvatureOperator):
    """The ``n x n`` identity :math:`I` (symmetric, psd).

    ``A + c * Identity(n)`` folds into the tracked shift ``A.shift(c)``.

    Parameters
    ----------
    n : int
        The dimension.
    device : torch.device, optional
        Where products run (default CPU).
    dtype : optional
        numpy or torch dtype (default float64).

    Examples
    --------
    >>> Identity(2, dtype=np.float32) @ np.array([1.0, 2.0])
    array([1., 2.], dtype=float32)
    """

    def __init__(self, n: int, *, device: Any = None, dtype: Any = torch.float64) -> None:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise argument_error("n", "a non-negative integer", n)
        super().__init__(
            shape=(int(n), int(n)),
            torch_dtype=torch_dtype_of(dtype),
            device=device,
            symmetric=True,
            psd=True,
        )

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return X.clone()


class Diagonal(CurvatureOperator):
    """:math:`\\mathrm{diag}(d)`; psd when every :math:`d_i \\ge 0`.

    Parameters
    ----------
    d : array_like
        The diagonal (numpy, torch or a sequence).
    device : torch.device, optional
        Where products run (default: ``d``'s, or the CPU).
    dtype : optional
        numpy or torch dtype (default: ``d``'s).

    Examples
    --------
    >>> Diagonal([1.0, -2.0]) @ np.ones(2)
    array([ 1., -2.])
    """

    def __init__(self, d: Any, *, device: Any = None, dtype: Any = None) -> None:
        diag = as_tensor_arg(d, "d", device=device, dtype=dtype)
        if diag.ndim != 1:
            raise argument_error("d", "a 1-D array", d)
        if not bool(torch.isfinite(diag).all()):
            raise argument_error("d", "finite entries", d)
        super().__init__(
            shape=(diag.shape[0], diag.shape[0]),
            torch_dtype=diag.dtype,
            device=diag.device,
            symmetric=True,
            psd=bool((diag >= 0).all()),
        )
        self._d = diag

    @property
    def diagonal(self) -> torch.Tensor:
        """A copy of ``d``."""
        return self._d.clone()

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._d[:, None] * X


def _refuse_psd_of_unsymmetric(mat: torch.Tensor, symmetric: bool | None, M: Any, psd: Any) -> None:
    """The error for ``psd=True`` on a matrix not taken as symmetric (names the cause).

    A matrix symmetric up to :math:`10\\,n\\,\\varepsilon\\max|M|` (what ``symmetric=True``
    accepts) is refused for not being exactly symmetric; any other for being non-symmetric.
    """
    m, n = mat.shape
    asym = float((mat - mat.mT).abs().max()) if m == n and mat.numel() else 0.0
    scale = float(mat.abs().max()) if mat.numel() else 0.0
    rounding = 10.0 * n * float(torch.finfo(mat.dtype).eps) * scale
    if m == n and symmetric is None and asym <= rounding:  # symmetric up to rounding
        raise argument_error(
            "M",
            f"an exactly symmetric matrix for psd=True (max |M - M^T| = {asym:.3g}; pass "
            "symmetric=True to accept a matrix symmetric up to rounding, stored symmetrised)",
            M,
        )
    raise argument_error("psd", "False for a non-symmetric M", psd)


class Dense(CurvatureOperator):
    """An explicit ``m x n`` matrix ``M``.

    Parameters
    ----------
    M:
        The matrix.
    symmetric:
        ``None`` (default): symmetric iff ``M`` equals its transpose exactly.  ``True``:
        ``M`` must be symmetric up to :math:`10\\,n\\,\\varepsilon\\,\\max|M|`, and is stored
        symmetrised, :math:`(M + M^\\top)/2`, so products are exactly symmetric.
        ``False``: treated as general.
    psd:
        ``None``/``False``: not flagged psd.  ``True``: checked with ``eigvalsh``
        (smallest eigenvalue :math:`\\ge -10\\,n\\,\\varepsilon\\,\\|M\\|_2`).

    Raises
    ------
    ValueError
        Not 2-D, non-finite entries, or a symmetry/psd claim that does not hold.

    Examples
    --------
    >>> Dense(np.array([[2.0, 1.0], [1.0, 2.0]]), psd=True).psd
    True
    """

    def __init__(
        self,
        M: Any,
        *,
        symmetric: bool | None = None,
        psd: bool | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        mat = as_tensor_arg(M, "M", device=device, dtype=dtype)
        if mat.ndim != 2:
            raise argument_error("M", "a 2-D array", M)
        if not bool(torch.isfinite(mat).all()):
            raise argument_error("M", "finite entries", M)
        m, n = mat.shape
        eps = float(torch.finfo(mat.dtype).eps)
        scale = float(mat.abs().max()) if mat.numel() else 0.0
        if symmetric is None:
            is_sym = m == n and bool(torch.equal(mat, mat.mT))
        elif symmetric:
            if m != n:
                raise argument_error("symmetric", "False for a non-square M", symmetric)
            asym = float((mat - mat.mT).abs().max()) if mat.numel() else 0.0
            if asym > 10.0 * n * eps * scale:
                raise argument_error("M", f"a symmetric matrix (max |M - M^T| = {asym:.3g})", M)
            mat = 0.5 * (mat + mat.mT)
            is_sym = True
        else:
            is_sym = False
        is_psd = False
        if psd:
            if not is_sym:
                _refuse_psd_of_unsymmetric(mat, symmetric, M, psd)
            evals = torch.linalg.eigvalsh(mat.to(torch.float64))
            norm = float(evals.abs().max()) if n else 0.0
            if n and float(evals.min()) < -10.0 * n * eps * norm:
                raise argument_error(
                    "M", f"a psd matrix (smallest eigenvalue {float(evals.min()):.3g})", M
                )
            is_psd = True
        super().__init__(
            shape=(m, n),
            torch_dtype=mat.dtype,
            device=mat.device,
            symmetric=is_sym,
            psd=is_psd,
        )
        self._M = mat

    @property
    def matrix(self) -> torch.Tensor:
        """A copy of ``M``."""
        return self._M.clone()

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._M @ X

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._M.mT @ X


class LowRank(CurvatureOperator):
    """:math:`U\\,\\mathrm{diag}(s)\\,U^\\top` for ``U`` (``n x r``) and ``s`` (``r``).

    Symmetric; psd when every :math:`s_i \\ge 0`.  ``U`` need not be orthonormal.
    Cost per product: :math:`O(nrk)`.

    Parameters
    ----------
    U : array_like
        The ``(n, r)`` factor.
    s : array_like
        The ``r`` weights.
    device : torch.device, optional
        Where products run (default: ``U``'s).
    dtype : optional
        numpy or torch dtype (default: ``U``'s).

    Examples
    --------
    >>> L = LowRank(np.eye(3)[:, :1], [5.0])
    >>> L @ np.ones(3), L.psd
    (array([5., 0., 0.]), True)
    """

    def __init__(self, U: Any, s: Any, *, device: Any = None, dtype: Any = None) -> None:
        factor = as_tensor_arg(U, "U", device=device, dtype=dtype)
        if factor.ndim != 2:
            raise argument_error("U", "a 2-D array of shape (n, r)", U)
        weights = as_tensor_arg(s, "s", device=factor.device, dtype=factor.dtype)
        if weights.ndim != 1 or weights.shape[0] != factor.shape[1]:
            raise argument_error("s", f"a 1-D array of length {factor.shape[1]}", s)
        if not (bool(torch.isfinite(factor).all()) and bool(torch.isfinite(weights).all())):
            raise argument_error("U, s", "finite entries", (U, s))
        n = factor.shape[0]
        super().__init__(
            shape=(n, n),
            torch_dtype=factor.dtype,
            device=factor.device,
            symmetric=True,
            psd=bool((weights >= 0).all()),
        )
        self._U = factor
        self._s = weights

    @property
    def factor(self) -> torch.Tensor:
        """A copy of ``U``."""
        return self._U.clone()

    @property
    def weights(self) -> torch.Tensor:
        """A copy of ``s``."""
        return self._s.clone()

    @property
    def rank(self) -> int:
        """Number of columns ``r`` of ``U`` (an upper bound on the rank)."""
        return int(self._U.shape[1])

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._U @ (self._s[:, None] * (self._U.mT @ X))
