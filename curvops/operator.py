"""The base class of every curvops operator: a torch-backed scipy ``LinearOperator``.

A :class:`CurvatureOperator` represents a real matrix :math:`A \\in \\mathbb{R}^{m \\times n}`
(square for every curvature matrix) whose products are computed by torch on one
device.  It is a :class:`scipy.sparse.linalg.LinearOperator` with a declared dtype,
so ``eigsh``, ``lobpcg``, ``cg`` and ``minres`` use it directly and never probe it
with an extra product.

Subclass contract
-----------------
A subclass calls, in its ``__init__``::

    super().__init__(shape=(n, n), dtype=np.dtype("float32"), device=device,
                     torch_dtype=torch.float32, symmetric=True, psd=False)

(all keyword-only; ``dtype`` and ``torch_dtype`` may be given alone, the other is
derived; ``device`` defaults to the CPU) and implements ONE method::

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor: ...

``X`` is an ``n x k`` tensor on ``self.device`` with ``self.torch_dtype``; the method
returns the ``m x k`` product :math:`AX` on the same device and dtype and must not
modify ``X`` in place (numpy inputs share memory with ``X`` on the CPU).  A
non-symmetric subclass may also implement ``_rmatmat_torch`` (:math:`A^\\top X`) to
have an adjoint.

Public products keep the caller's array type (see :mod:`curvops._arrays`): numpy in,
numpy out; torch in, torch out on the operator's device (a tensor on another device
is refused); cupy in, cupy out through DLPack.  Inputs of another real dtype are cast
to the operator's dtype and the output has the operator's dtype.

Operators are immutable: shape, dtype, device and the structure flags are read-only,
and the algebra (``+``, ``-``, scalar ``*``, ``@``, ``**``, :meth:`~CurvatureOperator.shift`,
:meth:`~CurvatureOperator.damp`, :meth:`~CurvatureOperator.deflate`) builds new operators
from :mod:`curvops.algebra`.  That module sits above this one (it subclasses
:class:`CurvatureOperator` and uses :mod:`curvops.structured`) and registers its
constructors here when it is imported (:func:`register_algebra`; ``import curvops``
imports it), so this module never imports it: ``operator <- structured <- algebra``
has no import cycle.

>>> import numpy as np
>>> from curvops.structured import Diagonal
>>> D = Diagonal(np.array([1.0, 2.0, 3.0]))
>>> D @ np.ones(3)
array([1., 2., 3.])
>>> S = -D.shift(-4.0)          # 4 I - D, tracked as a*D + b*I
>>> S.affine_decomposition()[:2]
(-1.0, 4.0)
>>> S.to_base_values(np.array([1.0, 3.0]))
array([3., 1.])
"""

from __future__ import annotations

import numbers
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse.linalg as sla
import torch

from curvops._arrays import (
    as_torch_device,
    from_torch,
    numpy_dtype,
    to_torch,
    torch_dtype_of,
    transpose,
)
from spectral.errors import argument_error

__all__ = ["ALGEBRA_CONSTRUCTORS", "CurvatureOperator", "is_scalar", "register_algebra"]

#: The constructors behind the operator syntax, registered by :mod:`curvops.algebra`.
ALGEBRA_CONSTRUCTORS = ("add", "scale", "shift", "product", "power", "adjoint", "deflate")
_algebra: dict[str, Callable[..., Any]] = {}


def register_algebra(**constructors: Callable[..., Any]) -> None:
    """Register the constructors named in :data:`ALGEBRA_CONSTRUCTORS` (by :mod:`curvops.algebra`).

    Raises
    ------
    ValueError
        If the names are not exactly those of :data:`ALGEBRA_CONSTRUCTORS`.
    """
    if sorted(constructors) != sorted(ALGEBRA_CONSTRUCTORS):
        raise argument_error(
            "constructors", f"exactly the names {ALGEBRA_CONSTRUCTORS}", sorted(constructors)
        )
    _algebra.update(constructors)


def _construct(name: str, *args: Any, **kwargs: Any) -> Any:
    """Build an algebra operator with the registered constructor ``name``."""
    try:
        build = _algebra[name]
    except KeyError:  # pragma: no cover - curvops/__init__ imports curvops.algebra
        raise RuntimeError(
            f"curvops.algebra has not registered {name!r}: import curvops (not only "
            "curvops.operator) before using the operator algebra"
        ) from None
    return build(*args, **kwargs)


def is_scalar(value: Any) -> bool:
    """Return True for a real Python/numpy number (not bool, not an array).

    >>> is_scalar(2.0), is_scalar(np.float32(1)), is_scalar(True), is_scalar(np.ones(1))
    (True, True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _scalar_operand(value: Any, name: str) -> float | None:
    """``value`` as a float when it is a real scalar operand, None when it is not a scalar.

    Real Python/numpy numbers and 0-d real tensors or numpy arrays are scalars (a 0-d
    array is a number, not a matrix); booleans and complex numbers (also 0-d) are
    refused, since an operator is real and ``True * A`` is almost certainly a mistake.

    Raises
    ------
    TypeError
        Naming ``name``, for a boolean or complex scalar.

    >>> _scalar_operand(np.float32(2), "c"), _scalar_operand(torch.tensor(3.0), "c")
    (2.0, 3.0)
    >>> _scalar_operand(np.ones(2), "c") is None
    True
    """
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise argument_error(name, "a real scalar", value, kind=TypeError)
        return float(value.item())
    if isinstance(value, np.ndarray) and value.ndim == 0:
        if value.dtype.kind not in "iuf":
            raise argument_error(name, "a real scalar", value, kind=TypeError)
        return float(value.item())
    if isinstance(value, (bool, np.bool_, numbers.Complex)) and not is_scalar(value):
        raise argument_error(
            name, "a real scalar (not a boolean or complex)", value, kind=TypeError
        )
    return float(value) if is_scalar(value) else None


class CurvatureOperator(sla.LinearOperator, metaclass=ABCMeta):
    """A real matrix applied by torch on one device, usable wherever scipy wants a LinearOperator.

    Parameters
    ----------
    shape:
        ``(m, n)``; curvature matrices are square.
    dtype:
        numpy dtype of the operator (float16, float32 or float64); may be omitted when
        ``torch_dtype`` is given.
    device:
        The torch device on which products run (default CPU).
    torch_dtype:
        torch dtype of the operator; derived from ``dtype`` when omitted.  When both are
        given they must agree.
    symmetric:
        Whether :math:`A = A^\\top`.  Symmetric operators are their own transpose/adjoint.
    psd:
        Whether :math:`x^\\top A x \\ge 0` for all ``x`` (requires ``symmetric``).

    Raises
    ------
    ValueError, TypeError
        Bad shape, unsupported or inconsistent dtypes, ``psd`` without ``symmetric``
        or ``symmetric`` with a non-square shape.

    Examples
    --------
    >>> import numpy as np
    >>> from curvops import Diagonal
    >>> D = Diagonal([1.0, 2.0])   # a CurvatureOperator
    >>> isinstance(D, CurvatureOperator), D.shape, D.dtype, D.symmetric, D.psd
    (True, (2, 2), dtype('float64'), True, True)
    >>> (2.0 * D).shift(1.0) @ np.ones(2)
    array([3., 5.])
    """

    def __init__(
        self,
        *,
        shape: tuple[int, int],
        dtype: Any = None,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
        symmetric: bool = False,
        psd: bool = False,
    ) -> None:
        try:
            m, n = (int(s) for s in shape)
            ok = m >= 0 and n >= 0 and all(int(s) == s for s in shape)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise argument_error("shape", "a pair of non-negative integers (m, n)", shape)
        if dtype is None and torch_dtype is None:
            raise argument_error("dtype", "a floating dtype (dtype or torch_dtype)", None)
        t_dtype = torch_dtype_of(torch_dtype if torch_dtype is not None else dtype)
        if dtype is not None and torch_dtype is not None and torch_dtype_of(dtype) != t_dtype:
            raise argument_error(
                "torch_dtype", f"the torch equivalent of dtype={np.dtype(dtype)}", torch_dtype
            )
        if symmetric and m != n:
            raise argument_error("symmetric", "False for a non-square shape", symmetric)
        if psd and not symmetric:
            raise argument_error("psd", "False unless symmetric=True", psd)
        self._shape = (m, n)
        self._torch_dtype = t_dtype
        self._dtype = numpy_dtype(t_dtype)
        self._device = as_torch_device(device)
        self._symmetric = bool(symmetric)
        self._psd = bool(psd)
        self.args: tuple[Any, ...] = ()

    # ------------------------------------------------------------------ read-only state
    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``."""
        return self._shape

    @property
    def dtype(self) -> np.dtype[Any]:
        """numpy dtype (declared, so scipy never probes the operator)."""
        return self._dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        """torch dtype in which products are computed."""
        return self._torch_dtype

    @property
    def device(self) -> torch.device:
        """torch device on which products are computed."""
        return self._device

    @property
    def product_eps(self) -> float:
        """The machine epsilon of the products: that of :attr:`torch_dtype`, or of the
        coarsest operator this one is built from (``args``).

        A widened bfloat16 operator (:func:`curvops.precision.widen`) returns float64
        vectors whose entries carry bfloat16's rounding; :func:`spectral.as_operator` reads
        this attribute as the products' precision, so that its error bounds (Ritz residual
        floors, the certified CDF bounds' node accuracy) use bfloat16's epsilon, not
        float64's (a widened float32 operator's certified bounds excluded the true CDF by
        0.2 with float64's).

        >>> from curvops.precision import widen
        >>> from curvops.structured import Diagonal
        >>> widen(Diagonal(torch.ones(2, dtype=torch.bfloat16))).product_eps
        0.0078125
        """
        eps = float(torch.finfo(self._torch_dtype).eps)
        for arg in self.args:
            if isinstance(arg, CurvatureOperator):
                eps = max(eps, arg.product_eps)
        return eps

    @property
    def symmetric(self) -> bool:
        """Whether the operator is symmetric."""
        return self._symmetric

    @property
    def psd(self) -> bool:
        """Whether the operator is known to be positive semi-definite."""
        return self._psd

    # ------------------------------------------------------------------ the one method
    @abstractmethod
    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        """Return ``A @ X`` for an ``n x k`` tensor on ``self.device`` with ``self.torch_dtype``."""

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        """Return ``A^T @ X`` (``m x k`` in, ``n x k`` out); symmetric operators reuse ``A @ X``."""
        if self._symmetric:
            return self._matmat_torch(X)
        raise NotImplementedError(
            f"{type(self).__name__} is not symmetric and defines no adjoint product "
            "(_rmatmat_torch)."
        )

    # ------------------------------------------------------------------ public products
    def _prepare(self, x: Any, name: str) -> tuple[torch.Tensor, Any]:
        return to_torch(x, device=self._device, dtype=self._torch_dtype, name=name)

    def _check_result(self, Y: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        if tuple(Y.shape) != shape:
            raise RuntimeError(
                f"{type(self).__name__}._matmat_torch returned shape {tuple(Y.shape)}; "
                f"expected {shape}."
            )
        return Y

    def _apply(self, X: torch.Tensor, *, adjoint: bool = False) -> torch.Tensor:
        m, n = self._shape
        if X.ndim == 2 and X.shape[1] == 0:  # no columns: nothing to compute (A @ (n, 0))
            return X.new_zeros((n if adjoint else m, 0))
        # Autograd records nothing under torch.inference_mode, where a caller's evaluation
        # code may run products: they would come out zero or fail.  Products leave it.
        with torch.inference_mode(False):
            if X.is_inference():
                X = X.clone()
            if adjoint:
                return self._check_result(self._rmatmat_torch(X), (n, X.shape[1]))
            return self._check_result(self._matmat_torch(X), (m, X.shape[1]))

    def _vector_product(self, x: Any, *, adjoint: bool) -> Any:
        m, n = self._shape
        if adjoint:
            m, n = n, m
        t, kind = self._prepare(x, "x")
        if tuple(t.shape) not in ((n,), (n, 1)):
            raise argument_error("x", f"an array of shape ({n},) or ({n}, 1)", x)
        y = self._apply(t.reshape(n, 1), adjoint=adjoint)
        y = y.reshape(m) if t.ndim == 1 else y.reshape(m, 1)
        return from_torch(y, kind, like=x)

    def _matrix_product(self, X: Any, *, adjoint: bool) -> Any:
        m, n = self._shape
        if adjoint:
            m, n = n, m
        t, kind = self._prepare(X, "X")
        if t.ndim != 2 or t.shape[0] != n:
            raise argument_error("X", f"a 2-D array with {n} rows", X)
        return from_torch(self._apply(t, adjoint=adjoint), kind, like=X)

    def matvec(self, x: Any) -> Any:
        """Return :math:`Ax` for ``x`` of shape ``(n,)`` or ``(n, 1)``, in ``x``'s array type."""
        return self._vector_product(x, adjoint=False)

    def rmatvec(self, x: Any) -> Any:
        """Return :math:`A^\\top x` for ``x`` of shape ``(m,)`` or ``(m, 1)``."""
        return self._vector_product(x, adjoint=True)

    def matmat(self, X: Any) -> Any:
        """Return :math:`AX` for ``X`` of shape ``(n, k)`` in ``X``'s array type (one product)."""
        return self._matrix_product(X, adjoint=False)

    def rmatmat(self, X: Any) -> Any:
        """Return :math:`A^\\top X` for ``X`` of shape ``(m, k)``."""
        return self._matrix_product(X, adjoint=True)

    # scipy's private hooks (numpy in, numpy out) route through the same code.
    def _matvec(self, x: Any) -> Any:
        return self.matvec(x)

    def _matmat(self, X: Any) -> Any:
        return self.matmat(X)

    def _rmatvec(self, x: Any) -> Any:
        return self.rmatvec(x)

    def _rmatmat(self, X: Any) -> Any:
        return self.rmatmat(X)

    def dot(self, x: Any) -> Any:
        """``A @ x`` for an array (1-D or 2-D), a scalar (scaling) or an operator (product)."""
        if isinstance(x, CurvatureOperator):
            return _construct("product", self, x)
        if isinstance(x, sla.LinearOperator):
            raise argument_error(
                "x",
                "a CurvatureOperator (wrap other matrices in curvops.Dense)",
                x,
                kind=TypeError,
            )
        c = _scalar_operand(x, "x")
        if c is not None:
            return _construct("scale", self, c)
        ndim = getattr(x, "ndim", None)
        if ndim is None:
            ndim = np.ndim(x)
        if ndim == 1:
            return self.matvec(x)
        if ndim == 2:
            return self.matmat(x)
        raise argument_error("x", "a 1-D or 2-D array", x)

    def _rdot(self, x: Any) -> Any:
        """``x @ A`` for an array: :math:`(A^\\top x^\\top)^\\top`."""
        if getattr(x, "ndim", np.ndim(x)) == 1:
            return self.rmatvec(x)
        return transpose(self.rmatmat(transpose(x)))

    def __matmul__(self, other: Any) -> Any:
        if is_scalar(other):
            raise argument_error("other", "an array or operator (use * for scalars)", other)
        return self.dot(other)

    def __rmatmul__(self, other: Any) -> Any:
        if is_scalar(other):
            raise argument_error("other", "an array or operator (use * for scalars)", other)
        return self._rdot(other)

    def __call__(self, x: Any) -> Any:
        return self @ x

    def __mul__(self, other: Any) -> Any:
        c = _scalar_operand(other, "other")
        return self.dot(other) if c is None else _construct("scale", self, c)

    def __rmul__(self, other: Any) -> Any:
        c = _scalar_operand(other, "other")
        return self._rdot(other) if c is None else _construct("scale", self, c)

    def __truediv__(self, other: Any) -> CurvatureOperator:
        c = _scalar_operand(other, "other")
        if c is None or c == 0:
            raise argument_error("other", "a non-zero real scalar", other, kind=TypeError)
        return _construct("scale", self, 1.0 / c)

    def __neg__(self) -> CurvatureOperator:
        return _construct("scale", self, -1.0)

    def __add__(self, other: Any) -> Any:
        """``A + B`` for a curvops operator ``B``; scipy's generic sum for other LinearOperators."""
        if isinstance(other, CurvatureOperator):
            return _construct("add", self, other)
        if isinstance(other, sla.LinearOperator):  # e.g. scipy's IdentityOperator
            return sla.LinearOperator.__add__(self, other)
        raise argument_error(
            "other",
            "a CurvatureOperator (use A.shift(mu) to add mu * I)",
            other,
            kind=TypeError,
        )

    def __sub__(self, other: Any) -> Any:
        """``A - B``; scipy's generic sum ``A + (-B)`` for a non-curvops LinearOperator."""
        if isinstance(other, CurvatureOperator):
            return _construct("add", self, _construct("scale", other, -1.0))
        if isinstance(other, sla.LinearOperator):  # expm_multiply forms A - mu * I this way
            return sla.LinearOperator.__add__(self, -other)
        raise argument_error(
            "other",
            "a CurvatureOperator (use A.shift(-mu) to subtract mu * I)",
            other,
            kind=TypeError,
        )

    def __pow__(self, k: Any) -> CurvatureOperator:
        return _construct("power", self, k)

    # ------------------------------------------------------------------ adjoint / transpose
    def adjoint(self) -> CurvatureOperator:
        """:math:`A^\\top` (real operators): ``self`` when symmetric, else an Adjoint view."""
        if self._symmetric:
            return self
        return _construct("adjoint", self)

    def transpose(self) -> CurvatureOperator:
        """Same as :meth:`adjoint` (operators are real)."""
        return self.adjoint()

    @property
    def H(self) -> CurvatureOperator:
        """:meth:`adjoint` (dispatching to a subclass's own ``adjoint``)."""
        return self.adjoint()

    @property
    def T(self) -> CurvatureOperator:
        """:meth:`transpose`."""
        return self.adjoint()

    def _adjoint(self) -> CurvatureOperator:
        return self.adjoint()

    def _transpose(self) -> CurvatureOperator:
        return self.adjoint()

    # ------------------------------------------------------------------ algebra shortcuts
    def shift(self, mu: float) -> CurvatureOperator:
        """:math:`A + \\mu I` (square operators); tracked by :meth:`affine_decomposition`."""
        return _construct("shift", self, mu)

    def damp(self, delta: float) -> CurvatureOperator:
        """:math:`A + \\delta I` with :math:`\\delta \\ge 0` (damping); keeps psd."""
        if not is_scalar(delta) or not np.isfinite(delta) or delta < 0:
            raise argument_error("delta", "a finite real number >= 0", delta)
        return self.shift(float(delta))

    def deflate(self, V: Any, *, tol: float | None = None) -> CurvatureOperator:
        """:math:`(I - VV^\\top) A (I - VV^\\top)` for ``V`` (``n x r``), orthonormal columns.

        Returns a :class:`curvops.algebra.Projected`.
        """
        return _construct("deflate", self, V, tol=tol)

    def affine_decomposition(self) -> tuple[float, float, CurvatureOperator]:
        """Return ``(a, b, base)`` with ``self == a * base + b * I`` (default ``(1, 0, self)``)."""
        return 1.0, 0.0, self

    def to_base_values(self, values: Any) -> Any:
        """Map eigen/Ritz values of ``self`` to those of the base: :math:`(\\lambda - b)/a`.

        Exact for Ritz values (Theorem 1: the Krylov space of :math:`aB + bI` is that
        of :math:`B`).  With ``a < 0`` the order reverses.  Keeps numpy/torch/float type.

        Raises
        ------
        ValueError
            If the scale ``a`` is zero (the base cannot be recovered).
        """
        a, b, _ = self.affine_decomposition()
        if a == 0:
            raise argument_error("self", "an operator with non-zero scale a", self)
        if isinstance(values, torch.Tensor):
            return (values - b) / a
        if is_scalar(values):
            return (float(values) - b) / a
        return (np.asarray(values, dtype=np.float64) - b) / a

    # ------------------------------------------------------------------ helpers
    def template_vector(self) -> torch.Tensor:
        """A zero vector of length ``n`` on the operator's device and dtype (spectral protocol).

        >>> from curvops.structured import Identity
        >>> Identity(2).template_vector()
        tensor([0., 0.], dtype=torch.float64)
        """
        return torch.zeros(self._shape[1], device=self._device, dtype=self._torch_dtype)

    def to_dense(self) -> torch.Tensor:
        """The ``m x n`` matrix as a torch tensor (``n`` products; for tests and small sizes)."""
        eye = torch.eye(self._shape[1], device=self._device, dtype=self._torch_dtype)
        return self._apply(eye)

    def __repr__(self) -> str:
        m, n = self._shape
        flags = [f for f, on in (("symmetric", self._symmetric), ("psd", self._psd)) if on]
        extra = f", {', '.join(flags)}" if flags else ""
        return f"<{m}x{n} {type(self).__name__} with dtype={self._dtype} on {self._device}{extra}>"
