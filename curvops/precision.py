"""Mixed precision: products in the model's low precision, everything around them in float64.

A curvature operator computes its products in the dtype of the model's parameters:
a ``bfloat16`` or ``float16`` model gives an operator with ``torch_dtype`` bfloat16 /
float16 (numpy callers see float32 for bfloat16, which numpy lacks; the widening is
lossless).  A float32 model used under ``torch.autocast`` computes the products' matrix
multiplications in the autocast dtype (graphs cached by an operator are recorded
again when the autocast state changes).

:func:`widen` wraps such an operator so that the vectors it takes and returns are
float64: the input is rounded to the model's dtype for the product and the result
widened.  Given the widened operator, :func:`spectral.lanczos` and :func:`spectral.slq`
run their recurrences, orthogonalisation and basis in float64, and everything they
return (``alpha``, ``beta``, Ritz values and weights) is float64; only the products
carry the low-precision error.

Accuracy to expect.  With unit roundoff :math:`u` (:math:`2^{-8}` for bfloat16,
:math:`2^{-11}` for float16, :math:`2^{-8}` for autocast to bfloat16), a product
:math:`\\hat y` of the Hessian or GGN :math:`A` of the low-precision model satisfies
:math:`\\|\\hat y - A v\\| \\lesssim c\\,u\\,\\|A\\|\\,\\|v\\|` with :math:`c` of order the
network depth; against a float64 copy of the same (rounded) weights we measured
relative errors :math:`\\|\\hat y - y\\|/\\|y\\|` of 1-2 :math:`u` on small MLPs and
transformers (``tests/curvops/test_mixed_precision.py`` asserts at most :math:`8u`).
By Weyl's inequality every Ritz value of the widened operator is then within
:math:`c\\,u\\,\\|A\\|` (plus the Lanczos residual) of an eigenvalue of :math:`A`:
the top of the spectrum is resolved to about 2-3 significant digits in bfloat16
and 3-4 in float16; eigenvalues below :math:`u\\|A\\|` (the bulk near zero) are
noise.  Losses and their normalisers are evaluated by the model's own code in its
dtype; mean reductions over many tokens in bfloat16 add their own rounding.

A model whose forward rounds tensors of its own dtype that vary with the parameters to a
lower precision outside ``torch.autocast`` -- Hugging Face's Llama, Mistral and Qwen2 take
their RMSNorm in float32 whatever the model's dtype -- computes a function, and so
products, only that precise: a float64 copy of such a model agrees with a float64
reference to about 1e-7, not 1e-15.  The operators' construction notes the first such
rounding and logs a warning naming the module and the operation
(:func:`precision_loss_noted`).  Rounded constants -- the same in every pass, computed
from buffers, positions or integer inputs, such as those models' float32 rotary
``cos``/``sin`` -- change nothing of the products' precision and are not reported (with
the RMSNorm kept in float64 a float64 Llama's products matched the dense reference to
2e-16).

Over several batches (a list, a DataLoader, the ranks of a process group) the weighted
sum of the batch products is accumulated in float32 (:func:`accumulation_dtype`; float64
and float32 models keep their own dtype) and the total weight -- a sample or token
count, or a sum of class weights -- in float64 (:func:`weight_dtype`; float32 on devices
without float64); only the final product is rounded to the model's dtype.  A list of
batches therefore has the accuracy of one batch (the rounding of the sum adds about
:math:`n_\text{batches}` float32 unit roundoffs), and a float16 model over more than
65504 counted tokens gets a finite total weight.

>>> import torch
>>> from curvops import HessianOperator
>>> net = torch.nn.Linear(3, 2).to(torch.bfloat16)
>>> data = (torch.ones(4, 3, dtype=torch.bfloat16), torch.tensor([0, 1, 0, 1]))
>>> H = HessianOperator(net, torch.nn.CrossEntropyLoss(), data)
>>> H.torch_dtype, H.dtype, widen(H).dtype
(torch.bfloat16, dtype('float32'), dtype('float64'))
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from curvops._arrays import torch_dtype_of
from curvops.op_provenance import (
    describe_module,
    first_matching_call,
    unsupported_higher_order,
)
from curvops.operator import CurvatureOperator
from spectral.errors import argument_error

__all__ = [
    "Widened",
    "accumulation_dtype",
    "precision_loss_noted",
    "rounds_below",
    "weight_dtype",
    "widen",
]

logger = logging.getLogger(__name__)


def _bits(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return torch.finfo(value.dtype).bits
    return None


def rounds_below(bits: int, args: Any, out: Any) -> bool:
    """Whether a call on ``args`` returning ``out`` rounds floating tensors of at least
    ``bits`` bits to fewer: some floating input has ``>= bits`` and some floating output
    ``< bits``.

    >>> x = torch.ones(2, dtype=torch.float64)
    >>> rounds_below(64, (x,), x.float()), rounds_below(64, (x,), x * 2)
    (True, False)
    """
    outs = [b for b in map(_bits, tree_leaves(out)) if b is not None]
    if not outs or min(outs) >= bits:
        return False
    return any(b is not None and b >= bits for b in map(_bits, tree_leaves(args)))


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(kind) for kind in ("cpu", "cuda"))


@contextmanager
def precision_loss_noted(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Log a warning if a forward pass of ``model`` run inside the context rounds tensors
    of the parameters' ``dtype`` that vary with the parameters (or the batch's floating
    inputs; not constants made from buffers, positions or integer inputs: :class:`_Variables`)
    to a lower precision (outside ``torch.autocast``, whose rounding is asked for): the
    products are then only as precise as that rounding.

    A higher-order operator in the forward pass (Hugging Face's
    ``attn_implementation="flex_attention"``, ``torch.cond``) is refused with a
    ``ValueError`` naming ``model`` (:func:`curvops.op_provenance.unsupported_higher_order`):
    curvature products cannot differentiate through it.

    >>> net = torch.nn.Linear(2, 2).double()
    >>> with precision_loss_noted(net, torch.float64):
    ...     _ = net(torch.ones(1, 2, dtype=torch.float64))
    """
    watch = dtype.is_floating_point and torch.finfo(dtype).bits >= 32 and not _autocast_on()
    bits = torch.finfo(dtype).bits if dtype.is_floating_point else 0
    lowered: list[torch.dtype] = []
    variable = _Variables(model)

    def lowers(func: Any, args: Any, kwargs: Any, out: Any) -> bool:
        if not watch:
            return False
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        varying = [t for t in inputs if variable(t)]
        variable.update(func, args, kwargs, out, inputs, bool(varying))
        if not rounds_below(bits, varying, out):
            return False
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        lowered.append(min((t.dtype for t in outs if t.is_floating_point()), key=_finfo_bits))
        return True

    def refuse(module: str, name: str) -> None:
        raise unsupported_higher_order(model, module, name)

    with first_matching_call(model, lowers, on_higher_order=refuse) as call:
        yield
    if call.found is not None:
        low = lowered[0]
        logger.warning(
            "curvops: the forward pass of %s rounds %s tensors to %s (first in %s, "
            "aten::%s): the curvature products are only as precise as %s (unit roundoff "
            "%.1e), not %s",
            type(model).__name__,
            dtype,
            low,
            describe_module(model, call.found),
            call.op,
            low,
            torch.finfo(low).eps / 2,
            dtype,
        )


class _Variables:
    """Which tensors of a forward pass may vary with the parameters (or the batch's
    floating inputs): rounding only those limits the products' precision.

    A tensor from outside the pass is variable when it is floating and not one of the
    model's buffers (parameters, their copies, floating inputs, tensor attributes); a
    tensor an operation returns or writes to is variable when one of the operation's
    tensor arguments is (a written view's base too).  Constants -- made by factory calls
    (``arange`` positions), from integer inputs or from buffers (a rotary embedding's
    ``inv_freq``, Hugging Face's float32 ``cos``/``sin``) -- are rounded the same way in
    every pass: the model computes a float64-precise function of its parameters all the
    same.
    """

    def __init__(self, model: nn.Module) -> None:
        self._buffers = {id(b) for b in model.buffers()}  # alive as long as the model
        self._flags: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __call__(self, tensor: torch.Tensor) -> bool:
        flag = self._flags.get(tensor)
        if flag is None:  # from outside the pass
            return tensor.is_floating_point() and id(tensor) not in self._buffers
        return bool(flag)

    def update(
        self, func: Any, args: Any, kwargs: Any, out: Any, inputs: list[Any], flag: bool
    ) -> None:
        """Flag what ``func`` returned or wrote: variable iff ``flag`` (an argument was);
        a tensor written in place keeps being variable if it was, and a variable write
        into a view (``out[:, i] = h``) makes the view's base variable too."""
        results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        for tensor in results + _written(func, args, kwargs):
            in_place = any(tensor is t for t in inputs)
            self._flags[tensor] = flag or (in_place and self(tensor))
            base = tensor._base if in_place and flag else None
            if isinstance(base, torch.Tensor):
                self._flags[base] = True


def _written(func: Any, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensor arguments an ATen operation writes to (``add_``'s ``self``, ``out=``)."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    written: list[torch.Tensor] = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        written += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    return written


def _finfo_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of products in ``dtype`` are accumulated in: float32 for 16-bit floats.

    Parameters
    ----------
    dtype : torch.dtype
        The products' (the model's) floating dtype.

    Returns
    -------
    torch.dtype
        float32 for float16 and bfloat16, ``dtype`` itself otherwise.

    Examples
    --------
    >>> accumulation_dtype(torch.bfloat16), accumulation_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def weight_dtype(device: torch.device) -> torch.dtype:
    """The dtype total weights (counts, class-weight sums) are summed in on ``device``.

    Parameters
    ----------
    device : torch.device
        Where the weights are counted.

    Returns
    -------
    torch.dtype
        float64, except on Apple's ``mps`` devices, which have no float64 (float32 there).

    Examples
    --------
    >>> weight_dtype(torch.device("cpu"))
    torch.float64
    """
    return torch.float32 if device.type == "mps" else torch.float64


class Widened(CurvatureOperator):
    """``base`` with a wider interface dtype: inputs rounded to ``base``'s, results widened.

    Parameters
    ----------
    base:
        Any :class:`~curvops.CurvatureOperator`.
    dtype:
        The interface dtype (default ``torch.float64``); at least as wide as ``base``'s.

    Raises
    ------
    TypeError
        If ``base`` is not an operator or ``dtype`` is not a floating dtype.
    """

    def __init__(self, base: CurvatureOperator, dtype: Any = torch.float64) -> None:
        if not isinstance(base, CurvatureOperator):
            raise argument_error("base", "a CurvatureOperator", base, kind=TypeError)
        wide = torch_dtype_of(dtype)
        if torch.finfo(wide).bits < torch.finfo(base.torch_dtype).bits:
            raise argument_error(
                "dtype", f"a dtype at least as wide as the operator's {base.torch_dtype}", dtype
            )
        super().__init__(
            shape=base.shape,
            torch_dtype=wide,
            device=base.device,
            symmetric=base.symmetric,
            psd=base.psd,
        )
        self._base = base
        self.args = (base,)

    @property
    def base(self) -> CurvatureOperator:
        """The operator computing the products."""
        return self._base

    def _product(self, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
        Y = self._base._apply(X.to(self._base.torch_dtype), adjoint=adjoint)
        return Y.to(self.torch_dtype)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._product(X, adjoint=False)

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._product(X, adjoint=True)


def widen(A: CurvatureOperator, dtype: Any = torch.float64) -> Widened:
    """``A`` taking and returning ``dtype`` (default float64) vectors; see :class:`Widened`.

    >>> from curvops.structured import Diagonal
    >>> import numpy as np
    >>> widen(Diagonal(np.ones(2, dtype=np.float32))) @ np.array([1.0, 2.0])
    array([1., 2.])
    """
    return Widened(A, dtype)
