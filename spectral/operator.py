"""Normalise anything that acts like a symmetric matrix into a :class:`SymmetricOperator`.

Accepted inputs of :func:`as_operator`:

* a dense square 2-D array of any array-API library (numpy, torch, cupy,
  ``array_api_strict``): products are ``A @ x`` in that namespace and dtype;
* an object with ``.shape`` and ``.matvec`` (scipy/cupyx ``LinearOperator``,
  :mod:`curvops` operators); if it has a ``template_vector()`` method, that
  zero vector fixes the namespace, device and dtype of the vectors it wants
  (curvops operators return a torch tensor on the model's device); otherwise
  numpy with ``A.dtype`` (float64 when ``A.dtype`` is ``None``);
* a scipy sparse matrix/array (numpy namespace);
* a callable ``f(x) -> A @ x`` together with ``size`` (and optionally a
  template vector ``like``; numpy float64 by default).

An object whose ``symmetric`` attribute is ``False`` is refused: every algorithm
of :mod:`spectral` assumes a symmetric operator.

An operator in a 16-bit floating dtype (numpy ``float16``, torch ``float16`` and
``bfloat16``: the curvature operators of half-precision models) is presented with
float64 vectors: each product rounds its input to that dtype and widens its result
exactly, so the recurrences, orthogonalisation and linear algebra around the products
run in float64 (NumPy has no ``bfloat16``, and its linear algebra no ``float16``) and
only the products carry the low-precision error.

>>> import numpy as np
>>> op = as_operator(np.diag([1.0, 2.0, 3.0]))
>>> op.n, op.dtype
(3, dtype('float64'))
>>> op.matvec(np.ones(3)).tolist()
[1.0, 2.0, 3.0]
>>> as_operator(lambda x: 2 * x, size=2).matvec(np.ones(2)).tolist()
[2.0, 2.0]
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from spectral import _backend
from spectral.errors import argument_error

__all__ = ["SymmetricOperator", "as_operator"]


class SymmetricOperator:
    """A symmetric ``n x n`` linear operator bound to one array namespace, device and dtype.

    Attributes
    ----------
    n:
        The dimension.
    xp:
        The array-API namespace of the vectors (``array_api_compat`` wrapped).
    dtype, device:
        The dtype and device of the vectors the operator consumes and returns.
    template:
        A zero vector of length ``n`` with that namespace, dtype and device.
    eps:
        The machine epsilon of the products (that of ``dtype``, or of the 16-bit dtype
        an operator widened to float64 computes in).

    ``matvec(x)`` maps a length-``n`` vector to ``A @ x``; ``matmat(X)`` maps an
    ``n x k`` array to ``A @ X`` (column by column when the wrapped object has
    no block product).  Results are detached from autograd (torch tensors that
    require grad): the algorithms of :mod:`spectral` are not differentiable.

    Contract with the wrapped products (``matvec``/``matmat`` given here, a
    ``LinearOperator``'s, a callable's):

    * **Inputs.** A product may modify its input in place (an in-place scaling inside a
      user's matvec): unless ``protect_input=False``, it receives a private copy of the
      vector or block, so the arrays the algorithms keep (the Lanczos vector ``q_j``, the
      basis rows, the probes) never change behind their back.  The copy costs
      :math:`O(n)` (:math:`O(nk)` for a block) per product; only products known to leave
      their input alone skip it (``A @ x`` of a dense or sparse matrix, the wrappers of
      :mod:`spectral` around an already protected operator).
    * **Results.** A product must return a real floating-point array of the vectors'
      namespace with ``n`` (``n k``) entries; anything else (complex or integer values,
      another library's array, a wrong size) raises naming ``A``, and so does a product
      rounded more coarsely than ``eps`` states (float32 results for float64 vectors: the
      error bounds of every algorithm assume products accurate to ``eps``; give such an
      operator float32 vectors, ``as_operator(A, like=...)``).  The result may be an
      array the product owns (even its input, or a buffer it reuses): the algorithms
      never modify a result in place.

    Examples
    --------
    >>> import numpy as np
    >>> op = SymmetricOperator(lambda x: 3 * x, template=np.zeros(2))
    >>> op.matmat(np.eye(2)).tolist()
    [[3.0, 0.0], [0.0, 3.0]]
    """

    def __init__(
        self,
        matvec: Callable[[Any], Any],
        *,
        template: Any,
        matmat: Callable[[Any], Any] | None = None,
        source: Any = None,
        eps: float | None = None,
        protect_input: bool = True,
    ) -> None:
        self._matvec = matvec
        self._matmat = matmat
        self.protect_input = protect_input
        self.template = template
        self.xp = _backend.namespace(template)
        self.n = int(template.shape[0])
        self.dtype = template.dtype
        self.device = _backend.device(template)
        self.source = source
        self.eps = _backend.finfo_eps(self.xp, self.dtype) if eps is None else float(eps)
        self._real_dtypes: set[Any] = set()  # result dtypes already checked (one check each)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return (self.n, self.n)

    def matvec(self, x: Any) -> Any:
        """Return ``A @ x`` for a vector ``x`` of shape ``(n,)`` (result reshaped to ``(n,)``).

        ``x`` itself is never modified (see the class docstring).
        """
        y = self._checked(_backend.detach(self._matvec(self._private(x))), (self.n,))
        if tuple(y.shape) != (self.n,):
            y = self.xp.reshape(y, (self.n,))
        return y

    def matmat(self, X: Any) -> Any:
        """Return ``A @ X`` for ``X`` of shape ``(n, k)`` (``X`` itself is never modified)."""
        if self._matmat is not None:
            product = self._matmat(self._private(X))
            Y = self._checked(_backend.detach(product), (self.n, int(X.shape[1])))
            if tuple(Y.shape) != (self.n, int(X.shape[1])):
                raise self._bad_product((self.n, int(X.shape[1])), Y)
            return Y
        k = int(X.shape[1])
        cols = [self.matvec(X[:, i]) for i in range(k)]
        return self.xp.stack(cols, axis=1)

    def __repr__(self) -> str:
        return f"SymmetricOperator(n={self.n}, dtype={self.dtype}, device={self.device})"

    def _private(self, x: Any) -> Any:
        """The array handed to the wrapped product: a copy of ``x`` unless the product is
        known to leave its input alone (``protect_input=False``)."""
        return self.xp.asarray(x, copy=True) if self.protect_input else x

    def _checked(self, y: Any, shape: tuple[int, ...]) -> Any:
        """``y`` if it is a real floating array of the vectors' namespace with ``prod(shape)``
        entries.

        A product of the wrong length, ``None``, a list or an array of another library
        (a torch tensor for numpy vectors) is refused here, naming ``A``, instead of
        failing later in a reshape or a mixed-type product; so is a complex or integer
        product (a Hermitian matrix behind a callable: numpy dropped the imaginary parts
        with a mere warning, and the Ritz values belonged to no matrix).  The dtype is
        checked once per dtype seen (a set lookup per product).
        """
        if not isinstance(y, type(self.template)) and not (
            _backend.is_array(y) and _backend.namespace(y) is self.xp
        ):
            raise self._bad_product(shape, y, kind=TypeError)
        if math.prod(tuple(y.shape)) != math.prod(shape):
            raise self._bad_product(shape, y)
        dtype = y.dtype
        if dtype not in self._real_dtypes:
            if not _backend.is_real_floating(self.xp, dtype):
                raise argument_error(
                    "A",
                    "an operator whose products are real floating-point arrays",
                    y,
                    kind=TypeError,
                )
            self._refuse_coarser_products(dtype)
            self._real_dtypes.add(dtype)
        return y

    def _refuse_coarser_products(self, dtype: Any) -> None:
        """Raise if products of ``dtype`` are rounded more coarsely than ``eps`` states.

        Every error bound of :mod:`spectral` (Ritz residual floors, the node accuracy of
        the certified CDF bounds, breakdown tests) assumes products accurate to ``eps``.
        A product returning float32 for float64 vectors has rounded to float32 and its
        error is ``2**29`` times larger: certified bounds built on float64's ``eps``
        excluded the true CDF by up to 0.11.  Such an operator is refused instead.
        """
        product_eps = _backend.finfo_eps(self.xp, dtype)
        if product_eps > self.eps:
            raise argument_error(
                "A",
                f"products as precise as the vectors ({self.dtype}, eps {self.eps:.3g}), "
                "which every error bound assumes (give the vectors the products' dtype: "
                "as_operator(A, like=<a zero vector of that dtype>))",
                f"products of dtype {dtype} (eps {product_eps:.3g})",
                kind=TypeError,
            )

    def _bad_product(self, shape: tuple[int, ...], y: Any, kind: type = ValueError) -> Exception:
        cls = type(self.template)
        array = f"{cls.__module__.split('.')[0]}.{cls.__name__}"
        return argument_error(
            "A", f"an operator whose products are {array} arrays of shape {shape}", y, kind=kind
        )


def _check_square(shape: Any, A: Any) -> int:
    if shape is None or len(tuple(shape)) != 2 or int(shape[0]) != int(shape[1]):
        raise argument_error("A", "a square operator of shape (n, n)", A)
    n = int(shape[0])
    if n < 1:
        raise argument_error("A", "an operator of dimension n >= 1", A)
    return n


def _from_dense(A: Any) -> SymmetricOperator:
    A = _backend.detach(A)  # a torch matrix that requires grad: products need no graph
    xp = _backend.namespace(A)
    n = _check_square(A.shape, A)
    if not _backend.is_real_floating(xp, A.dtype):
        if xp.isdtype(A.dtype, ("integral", "bool")):
            A = xp.astype(A, xp.float64)
        else:
            raise argument_error("A", "a real floating (or integer) matrix", A, kind=TypeError)
    _check_dense_symmetric(xp, A, n)
    template = xp.zeros((n,), dtype=A.dtype, device=_backend.device(A))
    return SymmetricOperator(
        lambda x: A @ x, template=template, matmat=lambda X: A @ X, source=A, protect_input=False
    )


def _check_dense_symmetric(xp: Any, A: Any, n: int, rows: int = 512) -> None:
    r"""Refuse a dense matrix that is not symmetric to working precision.

    Every algorithm here assumes :math:`A = A^\top`; on a non-symmetric matrix the
    Lanczos recurrence runs without any error and returns numbers that belong to no
    matrix.  Accepted: :math:`\max|A - A^\top| \le \tau \max|A|` with the relative
    tolerance :math:`\tau` of :func:`asymmetry_tolerance` (rounding of a product such as
    :math:`Q \Lambda Q^\top` stays far below; a finite-difference Hessian, asymmetric at
    about :math:`10^{-6}`, is refused with the advice to symmetrise it).  Compared in
    blocks of ``rows`` rows (memory :math:`O(\text{rows}\cdot n)`), one pass over the
    matrix.
    """
    eps = _backend.finfo_eps(xp, A.dtype)
    asym, scale = 0.0, 0.0
    for start in range(0, n, rows):
        stop = min(start + rows, n)  # the Array API leaves out-of-bounds stops unspecified
        block = A[start:stop, :]
        largest = float(xp.max(xp.abs(block)))
        if not math.isfinite(largest):
            return  # NaN/Inf entries: the products report them with their iteration
        scale = max(scale, largest)
        mirror = xp.permute_dims(A[:, start:stop], (1, 0))  # finite block: no inf - inf
        asym = max(asym, float(xp.max(xp.abs(block - mirror))))
    _refuse_asymmetry(asym, scale, eps, n, "matrix")


#: The largest relative asymmetry :math:`\max|A - A^\top| / \max|A|` that the worst-case
#: rounding bound ``10 n eps`` may allow (see :func:`asymmetry_tolerance`).
ASYMMETRY_CAP = 1.0 / 16.0


def asymmetry_tolerance(eps: float, n: int) -> float:
    r"""Relative tolerance :math:`\tau` of the symmetry check of a matrix in a dtype of
    machine epsilon ``eps``: :math:`\max|A - A^\top| \le \tau \max|A|` is symmetric to
    rounding.

    .. math:: \tau = \max\bigl(\sqrt{\epsilon},\ \min(10 n \epsilon,\ 1/16)\bigr)

    An entry of a computed product (:math:`Q \Lambda Q^\top`, :math:`B B^\top`) and its
    mirror are two sums of ``n`` terms, each with a rounding error of at most
    :math:`\gamma_n = n\epsilon/(1 - n\epsilon)` of the terms' magnitudes: hence ``10 n
    eps`` (float64 and float32 keep it: it reaches the cap only past ``n = 52,000`` in
    float32).  That worst-case bound means nothing once :math:`n\epsilon` nears 1 (float16
    from ``n = 103``, bfloat16 from ``n = 13``), where it would accept an upper-triangular
    matrix (:math:`\max|A - A^\top| = \max|A|`).  It is therefore capped at
    :data:`ASYMMETRY_CAP` ``= 1/16``: the mirror differences that rounding really leaves
    are about ``eps`` (one rounding of each entry, as numpy and torch accumulate 16-bit
    products in float32: measured 0.5 to 0.8 ``eps`` for :math:`Q \Lambda Q^\top` in
    float16 and bfloat16 up to ``n = 3000``), and growth like :math:`\sqrt{n}\,\epsilon`
    of sums rounded in 16 bits stays below 6 % up to ``n = 4000`` in float16.  The floor
    :math:`\sqrt{\epsilon}` (1.5e-8 in float64, 8.8 % in bfloat16, above the cap: bfloat16
    has only 8 bits) is unchanged.  So :math:`\tau \le 0.09` in every dtype.

    >>> asymmetry_tolerance(2.0**-23, 1000) == 10 * 1000 * 2.0**-23  # float32
    True
    >>> asymmetry_tolerance(2.0**-10, 300)  # float16: 10 n eps would be 2.9
    0.0625
    >>> round(asymmetry_tolerance(2.0**-7, 300), 4)  # bfloat16: sqrt(eps)
    0.0884
    """
    return max(math.sqrt(eps), min(10 * n * eps, ASYMMETRY_CAP))


def _refuse_asymmetry(asym: float, scale: float, eps: float, n: int, what: str) -> None:
    """Raise unless ``asym <= asymmetry_tolerance(eps, n) * scale`` (symmetric to rounding)."""
    if asym > asymmetry_tolerance(eps, n) * scale:
        raise argument_error(
            "A",
            "a symmetric matrix (every algorithm of spectral assumes A = A^T; symmetrise "
            "a matrix that is symmetric only approximately with (A + A.T) / 2)",
            f"a {n} x {n} {what} with max|A - A^T| = {asym:.3g} (max|A| = {scale:.3g})",
        )


def _template(like: Any, n: int) -> Any:
    """Validate the ``like`` argument: a real floating array of shape ``(n,)``."""
    if not _backend.is_array(like):
        raise argument_error(
            "like", f"None or a template vector (an array) of shape ({n},)", like, kind=TypeError
        )
    if tuple(like.shape) != (int(n),):
        raise argument_error("like", f"a template vector of shape ({n},)", like)
    if not _backend.is_real_floating(_backend.namespace(like), like.dtype):
        raise argument_error(
            "like",
            "a template vector of a real floating dtype (the dtype of the products)",
            like,
            kind=TypeError,
        )
    return like


def _from_linear_operator(A: Any, template: Any | None) -> SymmetricOperator:
    n = _check_square(A.shape, A)
    if template is not None:
        template = _template(template, n)
    if template is None:
        if hasattr(A, "template_vector"):
            template = A.template_vector()
        else:
            module = type(A).__module__.split(".")[0]
            dtype = np.dtype(A.dtype) if getattr(A, "dtype", None) is not None else np.float64
            if np.dtype(dtype).kind not in "fiub":
                raise argument_error(
                    "A", "a real operator (complex operators are not supported)", A, kind=TypeError
                )
            if np.dtype(dtype).kind != "f":
                dtype = np.float64
            if module == "cupyx":  # pragma: no cover - needs cupy
                xp = _backend.xp_for_module("cupy")
                template = xp.zeros((n,), dtype=xp.float64 if dtype == np.float64 else xp.float32)
            else:
                template = np.zeros(n, dtype=dtype)
    if tuple(template.shape) != (n,):
        raise argument_error("like", f"a template vector of shape ({n},)", template)
    matvec, matmat = A.matvec, getattr(A, "matmat", None)
    if _is_scipy_linear_operator(A):
        matvec = _named_shape_errors(A, matvec, n)
        matmat = None if matmat is None else _named_shape_errors(A, matmat, n)
    xp = _backend.namespace(template)
    eps = _backend.finfo_eps(xp, template.dtype)
    stated = getattr(A, "product_eps", None)  # products rounded more coarsely than the vectors
    if isinstance(stated, int | float) and not isinstance(stated, bool) and stated > eps:
        eps = float(stated)
    return SymmetricOperator(matvec, template=template, matmat=matmat, source=A, eps=eps)


def _is_scipy_linear_operator(A: Any) -> bool:
    try:
        from scipy.sparse.linalg import LinearOperator
    except ImportError:  # pragma: no cover - scipy is a dependency
        return False
    return isinstance(A, LinearOperator)


def _named_shape_errors(A: Any, product: Callable[[Any], Any], n: int) -> Callable[[Any], Any]:
    """``product`` with scipy's own shape errors re-raised naming ``A``.

    scipy's public ``LinearOperator.matvec`` reshapes what the user's ``_matvec``
    returned to ``(n,)``. A product of the wrong length therefore fails inside scipy
    ("cannot reshape array of size 31 into shape (30,)") before
    :meth:`SymmetricOperator.matvec` can check it. Only a ``ValueError`` raised in
    scipy's wrapper itself (its innermost Python frame in
    ``scipy/sparse/linalg/_interface.py``) is translated. Errors from the user's own
    product pass through unchanged.
    """

    def checked(x: Any) -> Any:
        try:
            return product(x)
        except ValueError as exc:
            frames = traceback.extract_tb(exc.__traceback__)
            if not frames or not frames[-1].filename.replace("\\", "/").endswith(
                "sparse/linalg/_interface.py"
            ):
                raise
            raise argument_error(
                "A",
                f"an operator whose products have n = {n} entries per column",
                f"{A!r}, whose product failed in scipy: {exc}",
            ) from exc

    return checked


def as_operator(A: Any, size: int | None = None, *, like: Any = None) -> SymmetricOperator:
    """Wrap ``A`` as a :class:`SymmetricOperator` (see the module docstring for accepted forms).

    Parameters
    ----------
    A:
        Dense square array, object with ``.shape``/``.matvec``, scipy sparse
        matrix, callable, or an existing :class:`SymmetricOperator` (returned as is).
    size:
        The dimension ``n``; required for a callable, checked against ``A.shape`` otherwise.
    like:
        Optional template vector fixing namespace/device/dtype for a callable or
        a ``LinearOperator`` without ``template_vector()``.

    An object with ``.shape`` and ``.matvec`` may state the precision of its products in a
    ``product_eps`` attribute (:attr:`curvops.CurvatureOperator.product_eps`: a bfloat16
    model's operator widened to float64 vectors): ``eps``, which every error bound uses,
    is then the larger of it and the vectors' epsilon.

    Returns
    -------
    SymmetricOperator
        A thin wrapper with ``n``, ``matvec``/``matmat`` and the array namespace, device and
        dtype of the vectors.

    Raises
    ------
    ValueError
        Non-square shape, ``size`` mismatch, missing ``size`` for a callable,
        or an operator flagged ``symmetric = False``.
    TypeError
        Unsupported object or complex dtype.

    Examples
    --------
    >>> import numpy as np
    >>> as_operator(np.eye(4)).shape
    (4, 4)
    """
    if isinstance(A, SymmetricOperator):
        op = A
    elif getattr(A, "symmetric", True) is False:
        raise argument_error("A", "a symmetric operator (its 'symmetric' flag is False)", A)
    elif _backend.is_array(A):
        op = _from_dense(A)
    elif _is_scipy_sparse(A):
        n = _check_square(A.shape, A)
        if np.dtype(A.dtype).kind not in "fiub":
            raise argument_error(
                "A", "a real sparse matrix (complex matrices are not supported)", A, kind=TypeError
            )
        _check_sparse_symmetric(A, n)
        dtype = A.dtype if np.dtype(A.dtype).kind == "f" else np.float64
        template = np.zeros(n, dtype=dtype) if like is None else _template(like, n)
        op = SymmetricOperator(
            lambda x: A @ x,
            template=template,
            matmat=lambda X: A @ X,
            source=A,
            protect_input=False,  # a sparse product leaves x alone
        )
    elif hasattr(A, "shape") and hasattr(A, "matvec"):
        op = _from_linear_operator(A, like)
    elif callable(A):
        if size is None:
            raise argument_error(
                "size", "the dimension n when A is a callable", size, kind=TypeError
            )
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise argument_error("size", "a positive integer", size)
        template = np.zeros(int(size), dtype=np.float64) if like is None else _template(like, size)
        op = SymmetricOperator(A, template=template, source=A)
    else:
        raise argument_error(
            "A",
            "a dense square array, an object with .shape and .matvec, or a callable with size",
            A,
            kind=TypeError,
        )
    if size is not None and int(size) != op.n:
        raise argument_error("size", f"the operator's dimension {op.n}", size)
    return _widened(op) if _low_precision(op) else op


def _low_precision(op: SymmetricOperator) -> bool:
    """Whether ``op`` works in a floating dtype narrower than 32 bits (float16, bfloat16)."""
    try:
        return _backend.is_real_floating(op.xp, op.dtype) and op.xp.finfo(op.dtype).bits < 32
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - exotic namespaces
        return False


def _widened(op: SymmetricOperator) -> SymmetricOperator:
    """``op`` with float64 vectors: inputs rounded to its dtype for each product, results
    widened (exactly), so that every algorithm of :mod:`spectral` runs its recurrence,
    orthogonalisation and linear algebra in float64 around 16-bit products."""
    xp, low = op.xp, op.dtype

    def matvec(x: Any) -> Any:
        return xp.astype(op.matvec(xp.astype(x, low)), xp.float64)

    def matmat(X: Any) -> Any:
        return xp.astype(op.matmat(xp.astype(X, low)), xp.float64)

    template = xp.astype(op.template, xp.float64)
    # x never reaches op's product (astype makes a new array), and op protects its own input
    return SymmetricOperator(
        matvec, template=template, matmat=matmat, source=op.source, eps=op.eps, protect_input=False
    )


def _check_sparse_symmetric(A: Any, n: int) -> None:
    """:func:`_check_dense_symmetric` for a scipy sparse matrix (on its stored entries)."""
    if A.nnz == 0:
        return
    dtype = A.dtype if np.dtype(A.dtype).kind == "f" else np.float64
    scale = float(abs(A).max())
    if not math.isfinite(scale):
        return  # NaN/Inf entries: the products report them with their iteration
    asym = float(abs(A - A.T).max())
    _refuse_asymmetry(asym, scale, float(np.finfo(dtype).eps), n, "sparse matrix")


def _is_scipy_sparse(A: Any) -> bool:
    try:
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover - scipy is a dependency
        return False
    return bool(sp.issparse(A))
