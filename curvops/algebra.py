"""Operator algebra: sums, scalings, affine shifts, products, powers, deflation, block diagonals.

Each combinator is a small immutable :class:`~curvops.operator.CurvatureOperator` that
knows its own algebra and structure flags.  Build them with the operators' own syntax
(``A + B``, ``A - B``, ``c * A``, ``-A``, ``A @ B``, ``A ** k``, ``A.shift(mu)``,
``A.damp(delta)``, ``A.deflate(V)``) or the functions :func:`add`, :func:`scale`,
:func:`shift`, :func:`product`, :func:`power`, which fold what can be folded:

* scalars and shifts compose into one :class:`Affine` ``a * B + b * I`` whose base ``B``
  is never itself affine, so Ritz values map back exactly
  (:meth:`~curvops.operator.CurvatureOperator.to_base_values`);
* ``A + c * I`` (an :class:`~curvops.structured.Identity` multiple) becomes a shift;
* nested sums and products flatten; scalar factors move out of products;
  ``A @ A`` and products of powers of the same operator become a :class:`Power`.

Structure flags are conservative and correct:

* a sum is symmetric (psd) when every term is;
* :math:`aB + bI` is symmetric when ``B`` is, psd when ``B`` is psd and
  :math:`a, b \\ge 0` (or :math:`a = 0, b \\ge 0`);
* a product :math:`L_1 \\cdots L_k` is recognised as symmetric only when it reads the
  same backwards under transposition (:math:`L_i = L_{k+1-i}^\\top`, e.g. ``A @ A.T``,
  ``B @ C @ B`` with symmetric ``B``, ``C``), which makes it :math:`MM^\\top` (psd) or
  :math:`MCM^\\top` (psd when ``C`` is);
* :math:`A^k` is symmetric when ``A`` is, psd when moreover ``A`` is psd or ``k`` even.

>>> import numpy as np
>>> from curvops.structured import Dense
>>> A = Dense(np.array([[2.0, 1.0], [1.0, 3.0]]))
>>> B = 2.0 * (A - A.shift(1.0)) + A     # 2*(A - (A + I)) + A  ==  A - 2 I
>>> np.allclose(B.to_dense().numpy(), A.to_dense().numpy() - 2 * np.eye(2))
True
>>> B.affine_decomposition()[:2], B.symmetric, (A @ A.T).psd
((1.0, -2.0), True, True)
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch

from curvops._arrays import as_tensor_arg
from curvops.operator import CurvatureOperator, is_scalar, register_algebra
from curvops.structured import Identity
from spectral.errors import argument_error

__all__ = [
    "Adjoint",
    "Affine",
    "BlockDiagonal",
    "Power",
    "Product",
    "Projected",
    "Scaled",
    "Sum",
    "add",
    "check_same_parameters",
    "parameter_names_of",
    "parameter_shapes_of",
    "power",
    "product",
    "scale",
    "shift",
]


# ---------------------------------------------------------------------- checks
def _check_operator(op: Any, name: str) -> CurvatureOperator:
    if not isinstance(op, CurvatureOperator):
        raise argument_error(name, "a curvops CurvatureOperator", op, kind=TypeError)
    return op


def _check_compatible(first: CurvatureOperator, other: CurvatureOperator, name: str) -> None:
    if other.torch_dtype != first.torch_dtype or other.device != first.device:
        raise argument_error(
            name,
            f"an operator with dtype {first.dtype} on device {first.device} "
            f"(got dtype {other.dtype} on device {other.device})",
            other,
        )


def parameter_names_of(op: CurvatureOperator) -> tuple[str, ...] | None:
    """The model parameters that the rows and columns of ``op`` stand for, or None.

    A model curvature operator (Hessian, GGN, Fisher, K-FAC, ...) knows its parameters
    (``param_names``, in the model's order); an operator built from them (a shift, a
    scaling, a power, an inverse, a sum, a product, a projection) stands for the same
    ones, a block-diagonal operator for those of its blocks in order; a matrix given
    as numbers (``Dense``, ``Diagonal``, ``LowRank``, ``Identity``) for none in
    particular (None).

    Parameters
    ----------
    op : CurvatureOperator
        Any operator.

    Returns
    -------
    tuple of str or None
        The names, or None when unknown.

    Examples
    --------
    >>> import torch
    >>> from curvops import GGNOperator
    >>> from curvops.structured import Identity
    >>> net = torch.nn.Linear(2, 2)
    >>> G = GGNOperator(net, torch.nn.MSELoss(), (torch.ones(3, 2), torch.zeros(3, 2)))
    >>> parameter_names_of((2.0 * G).shift(1.0) @ G), parameter_names_of(Identity(6))
    (('weight', 'bias'), None)
    """
    names = getattr(type(op), "param_names", None)
    if isinstance(names, property) and op.param_names is not None:
        return tuple(op.param_names)
    if isinstance(op, BlockDiagonal) and op.positions is not None:
        return None  # blocks on scattered coordinates: their names are not in order
    if isinstance(op, BlockDiagonal):
        parts = [parameter_names_of(block) for block in op.blocks]
        if any(part is None for part in parts):
            return None
        return tuple(name for part in parts for name in cast(tuple[str, ...], part))
    if op.shape[0] != op.shape[1]:
        return None
    for arg in _operands(op):
        if arg.shape == op.shape:
            found = parameter_names_of(arg)
            if found is not None:
                return found
    return None


def _operands(op: CurvatureOperator) -> list[CurvatureOperator]:
    """The operators ``op`` is built from: its ``args``, then its ``base`` (an inverse's)."""
    found = [arg for arg in getattr(op, "args", ()) if isinstance(arg, CurvatureOperator)]
    base = getattr(op, "base", None)
    if isinstance(base, CurvatureOperator) and all(base is not arg for arg in found):
        found.append(base)
    return found


#: ``"name[k of m entries #digest]"``: part of a parameter (:func:`curvops.blocks.per_block`)
_PART_NAME = re.compile(r"^(?P<name>.*)\[\d+ of \d+ entries #[0-9a-f]+\]$")


def _own_shapes(op: CurvatureOperator) -> dict[str, tuple[int, ...]] | None:
    """``name -> shape`` of the parameters a model operator holds itself, or None.

    From its ``param_shapes`` (in the order of ``param_names``) or its
    ``(name, parameter)`` pairs ``params`` (the exact operators, looked up now).
    """
    names = getattr(type(op), "param_names", None)
    if not isinstance(names, property) or op.param_names is None:
        return None
    if isinstance(getattr(type(op), "param_shapes", None), property):
        shapes = cast(Any, op).param_shapes
        return {str(n): tuple(int(k) for k in s) for n, s in zip(op.param_names, shapes)}
    if isinstance(getattr(type(op), "params", None), property):
        pairs = cast(Any, op).params
        return {str(n): tuple(int(k) for k in p.shape) for n, p in pairs}
    return None


def _shapes_within(op: CurvatureOperator) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every model parameter that ``op`` or its operands hold."""
    table: dict[str, tuple[int, ...]] = {}
    stack, seen = [op], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for name, shape in (_own_shapes(current) or {}).items():
            table.setdefault(name, shape)
        blocks = getattr(current, "blocks", ())
        stack += [b for b in blocks if isinstance(b, CurvatureOperator)]
        stack += _operands(current)
    return table


def parameter_shapes_of(op: CurvatureOperator) -> tuple[tuple[int, ...], ...] | None:
    """The shapes of the parameters :func:`parameter_names_of` gives, or None if unknown.

    The names alone do not fix the coordinates: two models with parameters called
    ``weight`` and ``bias`` of shapes ``(6, 2), (6,)`` and ``(9, 1), (9,)`` have 18
    coordinates each, and adding their operators would pair weight rows of one with
    bias rows of the other.  A part of a parameter (``"name[k of m entries #...]"``)
    reports the whole parameter's shape.

    Parameters
    ----------
    op : CurvatureOperator
        Any operator.

    Returns
    -------
    tuple of tuple of int, or None
        One shape per name, or None when the names or a shape are unknown.

    Examples
    --------
    >>> import torch
    >>> from curvops import GGNOperator
    >>> net = torch.nn.Linear(2, 3)
    >>> G = GGNOperator(net, torch.nn.MSELoss(), (torch.ones(4, 2), torch.zeros(4, 3)))
    >>> parameter_shapes_of(G.shift(1.0) @ G)
    ((3, 2), (3,))
    """
    names = parameter_names_of(op)
    if names is None:
        return None
    table = _shapes_within(op)
    shapes = []
    for name in names:
        part = _PART_NAME.match(name)
        shape = table.get(part.group("name") if part else name)
        if shape is None:
            return None
        shapes.append(shape)
    return tuple(shapes)


def check_same_parameters(first: CurvatureOperator, other: CurvatureOperator, name: str) -> None:
    """Refuse to combine operators over different parameters (names and shapes).

    Adding, multiplying or comparing them would pair the rows of one parameter with
    those of another without an error when the sizes agree (``KFACOperator`` over
    ``"2.weight"`` graded against a Hessian over ``"0.weight"``; two models whose
    parameters share names but not shapes, ``Linear(2, 6)`` and ``Linear(1, 9)``).
    The coordinates of a curvature operator are the row-major entries of its
    parameters in order, so the names (:func:`parameter_names_of`, in order) and the
    shapes (:func:`parameter_shapes_of`) must agree; the dtypes are those of the
    operators, checked with the devices where they combine.  Operators whose
    parameters are unknown (numbers) combine with anything of the right shape, and
    operators of different models over the same names and shapes (two checkpoints)
    combine.

    Parameters
    ----------
    first, other : CurvatureOperator
        The operands.
    name : str
        The argument that ``other`` was passed as.

    Raises
    ------
    ValueError
        Naming ``name`` and both parameter lists (names, or shapes where the names agree).

    Examples
    --------
    >>> import torch
    >>> from curvops import HessianOperator
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> data = (torch.ones(3, 2), torch.zeros(3, 2))
    >>> H0 = HessianOperator(net, torch.nn.MSELoss(), data, params=["0.weight"])
    >>> H1 = HessianOperator(net, torch.nn.MSELoss(), data, params=["1.weight"])
    >>> check_same_parameters(H0, H1, "B")
    Traceback (most recent call last):
    ...
    ValueError: Argument 'B': expected an operator over the same parameters, in the same order, ...
    """
    a, b = parameter_names_of(first), parameter_names_of(other)
    if a is None or b is None:
        return
    if a != b:
        raise argument_error(
            name,
            "an operator over the same parameters, in the same order, as the first operand "
            "(the rows and columns of a curvature operator are parameters; the first "
            f"operand's are {_short_names(a)}, this one's {_short_names(b)})",
            other,
        )
    shapes_a, shapes_b = parameter_shapes_of(first), parameter_shapes_of(other)
    if shapes_a is None or shapes_b is None or shapes_a == shapes_b:
        return
    differ = [
        f"{n!r}: {tuple(sa)} vs {tuple(sb)}" for n, sa, sb in zip(a, shapes_a, shapes_b) if sa != sb
    ]
    shown = "; ".join(differ[:4]) + ("; ..." if len(differ) > 4 else "")
    raise argument_error(
        name,
        "an operator over parameters of the same shapes as the first operand's (the "
        "coordinates are the parameters' entries in row-major order; same names with "
        f"other shapes would pair unrelated entries: {shown}, first operand vs this one)",
        other,
    )


def _short_names(names: tuple[str, ...]) -> str:
    shown = ", ".join(repr(n) for n in names[:4])
    return f"[{shown}{', ...' if len(names) > 4 else ''}] ({len(names)} tensors)"


def _check_square(op: CurvatureOperator, name: str) -> None:
    if op.shape[0] != op.shape[1]:
        raise argument_error(name, "a square operator", op)


def _check_real(value: Any, name: str) -> float:
    if not is_scalar(value) or not math.isfinite(float(value)):
        raise argument_error(name, "a finite real scalar", value, kind=TypeError)
    return float(value)


def _identity_multiple(op: CurvatureOperator) -> float | None:
    """Return ``c`` when ``op`` is structurally ``c * I``, else None."""
    if type(op) is Identity:
        return 1.0
    if isinstance(op, Affine) and type(op.base) is Identity:
        return op.a + op.b
    return None


# ---------------------------------------------------------------------- affine forms
class Affine(CurvatureOperator):
    """:math:`aB + bI` for a (non-affine) base operator ``B``.

    ``b`` must be zero for a rectangular ``B``.  Usually built by :func:`scale` /
    :func:`shift`, which fold nested forms so that ``base`` is never an Affine.

    Parameters
    ----------
    base : CurvatureOperator
        The base operator :math:`B` (not itself an Affine).
    a : float
        The scale.
    b : float
        The shift (0 for a rectangular base).

    Examples
    --------
    >>> from curvops.structured import Diagonal
    >>> op = Affine(Diagonal([1.0, 2.0]), -1.0, 3.0)
    >>> op @ np.ones(2)
    array([2., 1.])
    """

    def __init__(self, base: CurvatureOperator, a: float, b: float = 0.0) -> None:
        _check_operator(base, "base")
        a = _check_real(a, "a")
        b = _check_real(b, "b")
        if b != 0.0:
            _check_square(base, "base")
        square = base.shape[0] == base.shape[1]
        symmetric = base.symmetric or (a == 0.0 and square)
        psd = symmetric and ((base.psd and a >= 0.0 and b >= 0.0) or (a == 0.0 and b >= 0.0))
        super().__init__(
            shape=base.shape,
            torch_dtype=base.torch_dtype,
            device=base.device,
            symmetric=symmetric,
            psd=psd,
        )
        self._base = base
        self._a = a
        self._b = b
        self.args = (base,)

    @property
    def base(self) -> CurvatureOperator:
        """The operator ``B``."""
        return self._base

    @property
    def a(self) -> float:
        """The scale ``a``."""
        return self._a

    @property
    def b(self) -> float:
        """The shift ``b``."""
        return self._b

    def _combine(self, Y: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        if self._a != 1.0:
            Y = Y * self._a
        if self._b != 0.0:
            Y = Y + self._b * X
        return Y

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._combine(self._base._apply(X), X)

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return self._matmat_torch(X)
        return self._combine(self._base._apply(X, adjoint=True), X)

    def affine_decomposition(self) -> tuple[float, float, CurvatureOperator]:
        """``(a, b, base)``."""
        return self._a, self._b, self._base

    def adjoint(self) -> CurvatureOperator:
        """:math:`aB^\\top + bI`."""
        if self.symmetric:
            return self
        return _make_affine(self._base.adjoint(), self._a, self._b)


class Scaled(Affine):
    """:math:`cB` (an :class:`Affine` with ``b = 0``).

    Parameters
    ----------
    base : CurvatureOperator
        The operator :math:`B`.
    c : float
        The scale.

    Examples
    --------
    >>> from curvops.structured import Identity
    >>> Scaled(Identity(2), 3.0) @ np.ones(2)
    array([3., 3.])
    """

    def __init__(self, base: CurvatureOperator, c: float) -> None:
        super().__init__(base, c, 0.0)


def _make_affine(base: CurvatureOperator, a: float, b: float) -> CurvatureOperator:
    if a == 1.0 and b == 0.0:
        return base
    if b == 0.0:
        return Scaled(base, a)
    return Affine(base, a, b)


def scale(A: CurvatureOperator, c: float) -> CurvatureOperator:
    """:math:`cA`, folding nested scalars and shifts: :math:`c(aB + bI) = (ca)B + (cb)I`.

    >>> from curvops.structured import Identity
    >>> scale(scale(Identity(2), 2.0), 0.5) is not None
    True
    """
    _check_operator(A, "A")
    c = _check_real(c, "c")
    if c == 1.0:
        return A
    a, b, base = A.affine_decomposition()
    return _make_affine(base, c * a, c * b)


def shift(A: CurvatureOperator, mu: float) -> CurvatureOperator:
    """:math:`A + \\mu I`, folding: :math:`(aB + bI) + \\mu I = aB + (b + \\mu)I`.

    >>> from curvops.structured import Diagonal
    >>> shift(Diagonal([1.0, 2.0]), 1.0) @ np.ones(2)
    array([2., 3.])
    """
    _check_operator(A, "A")
    mu = _check_real(mu, "mu")
    _check_square(A, "A")
    if mu == 0.0:
        return A
    a, b, base = A.affine_decomposition()
    return _make_affine(base, a, b + mu)


# ---------------------------------------------------------------------- sums
class Sum(CurvatureOperator):
    """:math:`\\sum_i A_i` of operators with equal shape, dtype and device.

    Parameters
    ----------
    terms : sequence of CurvatureOperator
        The operators :math:`A_i` (equal shape, dtype and device).

    Examples
    --------
    >>> from curvops.structured import Diagonal, Dense
    >>> S = Sum([Diagonal([1.0, 2.0]), Dense(np.ones((2, 2)))])
    >>> S @ np.ones(2)
    array([3., 4.])
    """

    def __init__(self, terms: Sequence[CurvatureOperator]) -> None:
        terms = tuple(terms)
        if len(terms) < 1:
            raise argument_error("terms", "at least one operator", terms)
        first = _check_operator(terms[0], "terms[0]")
        for i, t in enumerate(terms[1:], start=1):
            _check_operator(t, f"terms[{i}]")
            if t.shape != first.shape:
                raise argument_error(f"terms[{i}]", f"an operator of shape {first.shape}", t)
            _check_compatible(first, t, f"terms[{i}]")
            check_same_parameters(first, t, f"terms[{i}]")
        super().__init__(
            shape=first.shape,
            torch_dtype=first.torch_dtype,
            device=first.device,
            symmetric=all(t.symmetric for t in terms),
            psd=all(t.psd for t in terms),
        )
        self._terms = terms
        self.args = terms

    @property
    def terms(self) -> tuple[CurvatureOperator, ...]:
        """The summands."""
        return self._terms

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        Y = self._terms[0]._apply(X)
        for t in self._terms[1:]:
            Y = Y + t._apply(X)
        return Y

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        Y = self._terms[0]._apply(X, adjoint=True)
        for t in self._terms[1:]:
            Y = Y + t._apply(X, adjoint=True)
        return Y

    def adjoint(self) -> CurvatureOperator:
        """:math:`\\sum_i A_i^\\top`."""
        if self.symmetric:
            return self
        return Sum([t.adjoint() for t in self._terms])


def add(A: CurvatureOperator, B: CurvatureOperator) -> CurvatureOperator:
    """:math:`A + B` with folding (identity multiples become shifts, nested sums flatten).

    Raises ``ValueError`` for mismatched shapes, dtypes or devices.

    >>> from curvops.structured import Diagonal, Identity
    >>> add(Diagonal([1.0, 2.0]), Identity(2)).affine_decomposition()[:2]
    (1.0, 1.0)
    """
    _check_operator(A, "A")
    _check_operator(B, "B")
    if A.shape != B.shape:
        raise argument_error("B", f"an operator of shape {A.shape}", B)
    _check_compatible(A, B, "B")
    check_same_parameters(A, B, "B")
    cb = _identity_multiple(B)
    if cb is not None:
        return shift(A, cb)
    ca = _identity_multiple(A)
    if ca is not None:
        return shift(B, ca)
    a1, b1, base1 = A.affine_decomposition()
    a2, b2, base2 = B.affine_decomposition()
    if base1 is base2:
        return _make_affine(base1, a1 + a2, b1 + b2)
    terms: list[CurvatureOperator] = []
    for op in (A, B):
        terms.extend(op.terms if isinstance(op, Sum) else (op,))
    return Sum(terms)


# ---------------------------------------------------------------------- adjoint view
class Adjoint(CurvatureOperator):
    """:math:`A^\\top` of a non-symmetric operator (uses ``A._rmatmat_torch``).

    Parameters
    ----------
    base : CurvatureOperator
        The operator :math:`A` to transpose.

    Examples
    --------
    >>> from curvops.structured import Dense
    >>> Adjoint(Dense(np.array([[1.0, 2.0], [3.0, 4.0]]))) @ np.array([1.0, 0.0])
    array([1., 2.])
    """

    def __init__(self, base: CurvatureOperator) -> None:
        _check_operator(base, "base")
        super().__init__(
            shape=(base.shape[1], base.shape[0]),
            torch_dtype=base.torch_dtype,
            device=base.device,
            symmetric=base.symmetric,
            psd=base.psd,
        )
        self._base = base
        self.args = (base,)

    @property
    def base(self) -> CurvatureOperator:
        """The operator whose transpose this is."""
        return self._base

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._base._apply(X, adjoint=True)

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._base._apply(X)

    def adjoint(self) -> CurvatureOperator:
        """The base operator."""
        return self._base


# ---------------------------------------------------------------------- products
def _is_transpose_pair(X: CurvatureOperator, Y: CurvatureOperator) -> bool:
    """True when ``Y`` is structurally ``X^T``."""
    if X is Y:
        return X.symmetric
    return (isinstance(Y, Adjoint) and Y.base is X) or (isinstance(X, Adjoint) and X.base is Y)


class Product(CurvatureOperator):
    """:math:`L_1 L_2 \\cdots L_k` (applied right to left).

    Symmetric (and then psd) only when structurally palindromic under transposition;
    see the module docstring.

    Parameters
    ----------
    factors : sequence of CurvatureOperator
        The factors :math:`L_1, \\dots, L_k` with matching inner dimensions.

    Examples
    --------
    >>> from curvops.structured import Dense
    >>> L = Dense(np.array([[1.0, 2.0], [0.0, 1.0]]))
    >>> P = Product([L, L.T])
    >>> P.symmetric, P.psd
    (True, True)
    """

    def __init__(self, factors: Sequence[CurvatureOperator]) -> None:
        factors = tuple(factors)
        if len(factors) < 1:
            raise argument_error("factors", "at least one operator", factors)
        first = _check_operator(factors[0], "factors[0]")
        for i in range(1, len(factors)):
            f = _check_operator(factors[i], f"factors[{i}]")
            if factors[i - 1].shape[1] != f.shape[0]:
                raise argument_error(
                    f"factors[{i}]",
                    f"an operator with {factors[i - 1].shape[1]} rows",
                    f,
                )
            _check_compatible(first, f, f"factors[{i}]")
            check_same_parameters(factors[i - 1], f, f"factors[{i}]")
        k = len(factors)
        symmetric = all(_is_transpose_pair(factors[i], factors[k - 1 - i]) for i in range(k))
        psd = symmetric and (k % 2 == 0 or factors[k // 2].psd)
        super().__init__(
            shape=(first.shape[0], factors[-1].shape[1]),
            torch_dtype=first.torch_dtype,
            device=first.device,
            symmetric=symmetric,
            psd=psd,
        )
        self._factors = factors
        self.args = factors

    @property
    def factors(self) -> tuple[CurvatureOperator, ...]:
        """The factors, leftmost first."""
        return self._factors

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        for f in reversed(self._factors):
            X = f._apply(X)
        return X

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        for f in self._factors:
            X = f._apply(X, adjoint=True)
        return X

    def adjoint(self) -> CurvatureOperator:
        """:math:`L_k^\\top \\cdots L_1^\\top`."""
        if self.symmetric:
            return self
        return Product([f.adjoint() for f in reversed(self._factors)])


def _power_parts(op: CurvatureOperator) -> tuple[CurvatureOperator, int]:
    if isinstance(op, Power):
        return op.base, op.exponent
    return op, 1


def product(A: CurvatureOperator, B: CurvatureOperator) -> CurvatureOperator:
    """:math:`AB` with folding (identities drop, scalars move out, powers merge, products flatten).

    >>> from curvops.structured import Diagonal
    >>> D = Diagonal([1.0, 2.0])
    >>> type(product(D, 2.0 * D)).__name__, product(D, D).psd
    ('Scaled', True)
    """
    _check_operator(A, "A")
    _check_operator(B, "B")
    if A.shape[1] != B.shape[0]:
        raise argument_error("B", f"an operator with {A.shape[1]} rows (A is {A.shape})", B)
    _check_compatible(A, B, "B")
    check_same_parameters(A, B, "B")
    if type(A) is Identity:
        return B
    if type(B) is Identity:
        return A
    a1, b1, base1 = A.affine_decomposition()
    if b1 == 0.0 and a1 != 1.0:
        return scale(product(base1, B), a1)
    a2, b2, base2 = B.affine_decomposition()
    if b2 == 0.0 and a2 != 1.0:
        return scale(product(A, base2), a2)
    pa, ka = _power_parts(A)
    pb, kb = _power_parts(B)
    if pa is pb:
        return power(pa, ka + kb)
    factors: list[CurvatureOperator] = []
    for op in (A, B):
        factors.extend(op.factors if isinstance(op, Product) else (op,))
    return Product(factors)


class Power(CurvatureOperator):
    """:math:`A^k` for a square operator and an integer :math:`k \\ge 1`.

    Parameters
    ----------
    base : CurvatureOperator
        A square operator :math:`A`.
    exponent : int
        The power :math:`k \\ge 1`.

    Examples
    --------
    >>> from curvops.structured import Diagonal
    >>> Power(Diagonal([-1.0, 2.0]), 2) @ np.ones(2)
    array([1., 4.])
    """

    def __init__(self, base: CurvatureOperator, exponent: int) -> None:
        _check_operator(base, "base")
        _check_square(base, "base")
        if not isinstance(exponent, numbers.Integral) or isinstance(exponent, bool) or exponent < 1:
            raise argument_error("exponent", "an integer >= 1", exponent)
        k = int(exponent)
        super().__init__(
            shape=base.shape,
            torch_dtype=base.torch_dtype,
            device=base.device,
            symmetric=base.symmetric,
            psd=base.symmetric and (base.psd or k % 2 == 0),
        )
        self._base: CurvatureOperator = base
        self._k: int = k
        self.args = (base,)

    @property
    def base(self) -> CurvatureOperator:
        """The operator raised to the power."""
        return self._base

    @property
    def exponent(self) -> int:
        """The exponent ``k``."""
        return self._k

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        for _ in range(self._k):
            X = self._base._apply(X)
        return X

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        for _ in range(self._k):
            X = self._base._apply(X, adjoint=True)
        return X

    def adjoint(self) -> CurvatureOperator:
        """:math:`(A^\\top)^k`."""
        if self.symmetric:
            return self
        return Power(self._base.adjoint(), self._k)


def power(A: CurvatureOperator, k: Any) -> CurvatureOperator:
    """:math:`A^k` for an integer :math:`k \\ge 0` (``A ** 0`` is the identity).

    Folds :math:`(A^j)^k = A^{jk}` and :math:`(cA)^k = c^k A^k`.

    >>> from curvops.structured import Diagonal
    >>> (Diagonal([2.0, 3.0]) ** 3) @ np.ones(2)
    array([ 8., 27.])
    """
    _check_operator(A, "A")
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
        raise argument_error("k", "an integer >= 0", k)
    _check_square(A, "A")
    k = int(k)
    if k == 0:
        return Identity(A.shape[0], device=A.device, dtype=A.torch_dtype)
    if k == 1:
        return A
    a, b, base = A.affine_decomposition()
    if b == 0.0 and a != 1.0:
        return scale(power(base, k), a**k)
    if type(A) is Identity:
        return A
    inner, j = _power_parts(A)
    return Power(inner, j * k)


# ---------------------------------------------------------------------- deflation
class Projected(CurvatureOperator):
    """Deflation :math:`PAP`, :math:`P = I - VV^\\top`, ``V`` (``n x r``) with orthonormal columns.

    The eigenvectors in ``span(V)`` are mapped to eigenvalue 0; symmetric and psd
    when ``A`` is.  ``V`` (numpy, torch or cupy; a 1-D vector is one column) is copied to
    the operator's device and dtype and checked:
    :math:`\\max|V^\\top V - I| \\le` ``tol`` (default :math:`100\\sqrt{n}\\,\\varepsilon`).

    Parameters
    ----------
    base : CurvatureOperator
        The operator :math:`A`.
    V : array_like
        ``(n, r)`` (or ``(n,)``) with orthonormal columns.
    tol : float, optional
        Orthonormality tolerance on :math:`\\max|V^\\top V - I|`.

    Raises
    ------
    ValueError
        ``V`` with the wrong number of rows or columns that are not orthonormal.

    Examples
    --------
    >>> from curvops.structured import Diagonal
    >>> P = Projected(Diagonal([3.0, 1.0]), np.array([[1.0], [0.0]]))
    >>> P @ np.ones(2)
    array([0., 1.])
    """

    def __init__(self, base: CurvatureOperator, V: Any, *, tol: float | None = None) -> None:
        _check_operator(base, "base")
        _check_square(base, "base")
        n = base.shape[0]
        basis = as_tensor_arg(V, "V", device=base.device, dtype=base.torch_dtype)
        if basis.ndim == 1:
            basis = basis.reshape(-1, 1)
        if basis.ndim != 2 or basis.shape[0] != n or basis.shape[1] > n:
            raise argument_error("V", f"an array of shape ({n}, r) with r <= {n}", V)
        eps = float(torch.finfo(base.torch_dtype).eps)
        limit = 100.0 * math.sqrt(max(n, 1)) * eps if tol is None else float(tol)
        B64 = basis.to(torch.float64)
        gram_err = B64.mT @ B64 - torch.eye(basis.shape[1], dtype=torch.float64, device=B64.device)
        err = float(gram_err.abs().max()) if basis.shape[1] else 0.0
        if not err <= limit:
            raise argument_error(
                "V",
                f"orthonormal columns (max |V^T V - I| <= {limit:.3g}; got {err:.3g}; "
                "orthonormalise with torch.linalg.qr)",
                V,
            )
        super().__init__(
            shape=base.shape,
            torch_dtype=base.torch_dtype,
            device=base.device,
            symmetric=base.symmetric,
            psd=base.psd,
        )
        self._base = base
        self._V = basis
        self.args = (base,)

    @property
    def base(self) -> CurvatureOperator:
        """The deflated operator ``A``."""
        return self._base

    @property
    def basis(self) -> torch.Tensor:
        """A copy of ``V``."""
        return self._V.clone()

    def _project(self, X: torch.Tensor) -> torch.Tensor:
        return X - self._V @ (self._V.mT @ X)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._project(self._base._apply(self._project(X)))

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._project(self._base._apply(self._project(X), adjoint=True))

    def adjoint(self) -> CurvatureOperator:
        """:math:`PA^\\top P`."""
        if self.symmetric:
            return self
        return Projected(self._base.adjoint(), self._V, tol=float("inf"))


# ---------------------------------------------------------------------- block diagonal
class BlockDiagonal(CurvatureOperator):
    """:math:`\\mathrm{diag}(A_1, \\dots, A_p)`, acting blockwise on row ranges or index sets.

    Blocks must share dtype and device; symmetric (psd) when every block is.  By
    default block :math:`i` acts on the consecutive rows (and columns)
    ``offsets[i]:offsets[i + 1]``.  With ``positions`` (square blocks only) block
    :math:`i` acts on the coordinates :math:`I_i` = ``positions[i]`` instead, which
    together are a permutation of :math:`0, \\dots, n - 1`: the operator is
    :math:`P^\\top \\mathrm{diag}(A_1, \\dots, A_p) P` with :math:`(Px)_{\\text{block }i}
    = x_{I_i}`, the same eigenvalues with eigenvectors scattered to :math:`I_i`
    (the block-diagonal part of a matrix over the coordinates :math:`I_i` in place).

    Parameters
    ----------
    blocks : sequence of CurvatureOperator
        The diagonal blocks, in order (same dtype and device).
    positions : sequence of index arrays, optional
        The coordinates of each (square) block, in the block's own order.

    Raises
    ------
    ValueError
        No blocks, blocks of another dtype/device, or ``positions`` that are not one
        index set per block of its size forming a permutation.

    Examples
    --------
    >>> from curvops.structured import Diagonal, Dense
    >>> B = BlockDiagonal([Diagonal([1.0]), Dense(np.array([[0.0, 1.0], [1.0, 0.0]]))])
    >>> B @ np.array([1.0, 2.0, 3.0])
    array([1., 3., 2.])
    >>> P = BlockDiagonal(B.blocks, positions=[[1], [0, 2]])  # block 1 on coordinates 0, 2
    >>> P @ np.array([1.0, 2.0, 3.0])
    array([3., 2., 1.])
    """

    def __init__(
        self, blocks: Sequence[CurvatureOperator], positions: Sequence[Any] | None = None
    ) -> None:
        blocks = tuple(blocks)
        if len(blocks) < 1:
            raise argument_error("blocks", "at least one operator", blocks)
        first = _check_operator(blocks[0], "blocks[0]")
        for i, blk in enumerate(blocks[1:], start=1):
            _check_operator(blk, f"blocks[{i}]")
            _check_compatible(first, blk, f"blocks[{i}]")
        rows = np.cumsum([0] + [b.shape[0] for b in blocks]).tolist()
        cols = np.cumsum([0] + [b.shape[1] for b in blocks]).tolist()
        super().__init__(
            shape=(rows[-1], cols[-1]),
            torch_dtype=first.torch_dtype,
            device=first.device,
            symmetric=all(b.symmetric for b in blocks),
            psd=all(b.psd for b in blocks),
        )
        self._blocks = blocks
        self._rows = tuple(int(r) for r in rows)
        self._cols = tuple(int(c) for c in cols)
        self._perm = None if positions is None else _block_permutation(blocks, positions)
        self.args = blocks

    @property
    def blocks(self) -> tuple[CurvatureOperator, ...]:
        """The diagonal blocks."""
        return self._blocks

    @property
    def offsets(self) -> tuple[int, ...]:
        """Boundaries ``(0, m_1, m_1 + m_2, ..., m)`` of the blocks in block order."""
        return self._rows

    @property
    def positions(self) -> tuple[torch.Tensor, ...] | None:
        """The coordinates :math:`I_i` of each block, or None for consecutive ranges."""
        if self._perm is None:
            return None
        return tuple(self._perm[a:b] for a, b in zip(self._rows[:-1], self._rows[1:]))

    def block_index(self, i: int) -> torch.Tensor:
        """The row coordinates of block ``i`` (``positions[i]`` or its consecutive range)."""
        if self._perm is not None:
            return self._perm[self._rows[i] : self._rows[i + 1]]
        return torch.arange(self._rows[i], self._rows[i + 1], device=self.device)

    def _blockwise(self, X: torch.Tensor, *, adjoint: bool) -> torch.Tensor:
        starts = self._rows if adjoint else self._cols
        if self._perm is not None:
            X = X[self._perm]
        parts = [
            blk._apply(X[starts[i] : starts[i + 1]], adjoint=adjoint)
            for i, blk in enumerate(self._blocks)
        ]
        Y = torch.cat(parts, dim=0)
        if self._perm is None:
            return Y
        out = torch.empty_like(Y)
        out[self._perm] = Y
        return out

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._blockwise(X, adjoint=False)

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._blockwise(X, adjoint=True)

    def adjoint(self) -> CurvatureOperator:
        """:math:`\\mathrm{diag}(A_1^\\top, \\dots)` (on the same coordinates)."""
        if self.symmetric:
            return self
        return BlockDiagonal([b.adjoint() for b in self._blocks], positions=self.positions)


def _block_permutation(
    blocks: tuple[CurvatureOperator, ...], positions: Any
) -> torch.Tensor | None:
    """Concatenate ``positions`` after checking they permute the coordinates (None: identity)."""
    n = sum(b.shape[0] for b in blocks)
    if any(b.shape[0] != b.shape[1] for b in blocks):
        raise argument_error("positions", "None for non-square blocks", positions)
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
        raise argument_error("positions", "a sequence of index arrays", positions, kind=TypeError)
    if len(positions) != len(blocks):
        raise argument_error("positions", f"{len(blocks)} index arrays (one per block)", positions)
    device = blocks[0].device
    parts = []
    for i, (b, p) in enumerate(zip(blocks, positions)):
        idx = torch.as_tensor(p, device=device).reshape(-1)
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise argument_error(f"positions[{i}]", "integer indices", p, kind=TypeError)
        if idx.numel() != b.shape[0]:
            raise argument_error(f"positions[{i}]", f"{b.shape[0]} indices (the block's size)", p)
        parts.append(idx.to(torch.int64))
    perm = torch.cat(parts)
    if not torch.equal(torch.sort(perm).values, torch.arange(n, device=device)):
        raise argument_error(
            "positions", f"index sets that together hold each of 0..{n - 1} once", positions
        )
    return None if torch.equal(perm, torch.arange(n, device=device)) else perm


register_algebra(
    add=add,
    scale=scale,
    shift=shift,
    product=product,
    power=power,
    adjoint=Adjoint,
    deflate=Projected,
)
