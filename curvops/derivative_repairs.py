"""PyTorch functions whose derivatives are not the loss's, and what products do about them.

A Hessian product differentiates the model's backward pass, so it is exactly as right
as PyTorch's double-backward formulas, and every curvature is only as right as the
backward pass it is built on.  Two functions that networks use fail
``torch.autograd.gradgradcheck`` in float64 in torch 2.13 to 2.15 while their
gradients are right, one option changes the backward pass on purpose, and one function
has a wrong gradient where a clamp is active:

* ``torch._weight_norm``, the kernel behind weight normalisation
  (``nn.utils.parametrizations.weight_norm`` and the older ``nn.utils.weight_norm``;
  WaveNet/HiFi-GAN-style audio models, wav2vec 2.0's positional convolution).  Its
  fused kernel's differentiable backward gets :math:`\\partial^2/\\partial v^2` and
  :math:`\\partial^2/\\partial g\\,\\partial v` wrong: the Hessian of a three-layer MLP
  with one weight-normalised layer came out 30 % off.  During products it is replaced
  by :func:`weight_norm`, :math:`w = v\\, g / \\lVert v \\rVert` with the norm over every
  dimension but ``dim`` -- PyTorch's own non-fused formula, equal up to rounding, whose
  second derivatives are exact.
* ``F.linear_cross_entropy`` (and ``nn.LinearCrossEntropyLoss``) with chunking
  ``options``: the chunked path's second derivatives are wrong (35 % off in a Hessian
  through it).  Inside the model's ``forward`` it is evaluated with ``options=None``,
  PyTorch's reference implementation ``cross_entropy(linear(...))``: the same loss,
  exact derivatives.  A loss function that calls it chunked is refused when the
  operator is built (:func:`check_loss_second_derivatives`): the products evaluate the
  loss outside the model, where no replacement is made.
* ``nn.Embedding(scale_grad_by_freq=True)`` divides each row's gradient by the
  frequency of its index in the batch, a training heuristic: the result is not the
  derivative of the loss, and the Hessian, GGN and Fisher built on it came out
  non-symmetric (by 22 % of their norm on a small model) while the operators declare
  them symmetric.  During products embeddings are evaluated by :func:`embedding`,
  without the rescaling and with dense gradients (``sparse=True`` gives sparse ones,
  which the products cannot take): the same outputs, the loss's exact derivatives.
  Likewise the row of ``padding_idx``, to which PyTorch gives no gradient (a training
  convention, applied in reverse mode only), gets the loss's derivatives.
* ``F.cosine_similarity`` (``nn.CosineSimilarity``) clamps the norms to ``eps`` in
  place with gradients off, so where a norm is below ``eps`` even its gradient is not
  the function's (12 % off the loss's second differences).  During products it is
  evaluated by :func:`cosine_similarity`, the same operations with a recorded clamp
  (only inside the model: a loss that calls it is differentiated as PyTorch does).
* ``F.hardsigmoid`` (``nn.Hardsigmoid``: MobileNetV3's squeeze-excitation, PP-LCNet) has
  no double backward in PyTorch; it is evaluated as ``hardtanh(x + 3, 0, 6) / 6``
  (:func:`hardsigmoid`), the same values, whose derivatives PyTorch has.

Spectral normalisation (``nn.utils.parametrizations.spectral_norm`` and the older
``nn.utils.spectral_norm``; SN-GAN discriminators) computes
:math:`W / \\sigma(W)` with :math:`\\sigma = u^\\top W v`, where in training mode
``n_power_iterations`` power steps from the stored vectors produce :math:`u, v` under
``torch.no_grad``.  PyTorch's derivatives therefore hold :math:`u, v` constant
although they move with :math:`W`: the gradient is right only where the iteration has
converged (envelope theorem), and second derivatives never are -- a Hessian 12-26 %
away from the second differences of the train-mode loss on a fresh model, 50-70 % on
one whose power iteration has converged, silently.  During products the same power
steps run with gradients (:func:`spectral_norm_sigma`, the same operations, so the same
values): the derivatives are those of the function the train-mode forward pass
computes.  In evaluation mode no step runs, :math:`u, v` are constants, and PyTorch's
derivatives were already exact.

One kind of function has no exact replacement and is refused instead: **fake
quantisation** (quantisation-aware training: ``torch.ao.quantization.FakeQuantize``,
``FusedMovingAvgObsFakeQuantize``, the learnable LSQ variants, and the functions
``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` behind them).  Its
forward pass rounds to a grid, so the network is piecewise constant in everything
upstream and its true derivatives vanish almost everywhere; its backward pass is a
straight-through estimator (the identity inside the clipping range).  Products through
it would be the curvature of a surrogate network in which the rounding is not there
while the values are rounded -- a Hessian 4-5 % away from the full-precision
network's on the model of ``tests/curvops/test_fake_quantization.py``, and the
derivative of neither.  A forward pass that fake-quantises is refused
(:func:`refuse_fake_quantization`), naming the function and how to turn fake
quantisation off for the analysis: after
``model.apply(torch.ao.quantization.disable_fake_quant)`` the products are the
full-precision network's curvature.

Two functions have right second derivatives but wrong *third* ones in torch 2.13
(``gradgradcheck`` of their gradient fails in float64): ``layer_norm``
(``nn.LayerNorm``) and ``batch_norm`` in training mode (``nn.BatchNorm*`` in train
mode, ``F.instance_norm``).  Third derivatives matter to a Hessian whose forward pass
takes a gradient of itself -- physics-informed networks, gradient penalties,
energy-based force models: through ``nn.LayerNorm`` the Hessian came out 33 % off the
finite differences of the exact gradient, through train-mode BatchNorm 88 %.  The lean
kernels of :mod:`curvops.lean_ops` (the default, ``lean_kernels=True``) compute them
exactly; where such a forward pass goes through PyTorch's own kernels instead
(``lean_kernels=False``, or a call the lean kernels do not cover),
:func:`check_third_derivatives` refuses the Hessian.  The GGN and Fisher need only
second derivatives and are exact either way.

:data:`REPLACEMENTS` is applied by :class:`curvops.determinism.DropoutOffMode`, the
mode every forward pass of a product runs under.

>>> import torch
>>> v, g = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
>>> bool(torch.allclose(weight_norm(v, g, 0), torch._weight_norm(v, g, 0)))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from curvops.differentiability import graph_nodes
from curvops.inert_hooks import evaluate_loss
from spectral.errors import argument_error

__all__ = [
    "FAKE_QUANTIZATION_FUNCTIONS",
    "REPLACEMENTS",
    "as_strided_scatter",
    "check_loss_second_derivatives",
    "check_third_derivatives",
    "clamp_replacement",
    "cosine_similarity",
    "determinant",
    "embedding",
    "exact_spectral_norm_compute_weight",
    "exact_spectral_norm_forward",
    "fmax",
    "hardsigmoid",
    "linear_cross_entropy_reference",
    "polar",
    "prelu",
    "refuse_fake_quantization",
    "scatter_reduce_replacement",
    "spectral_norm_sigma",
    "weight_norm",
]

#: ``F.linear_cross_entropy`` where this torch has it (added in torch 2.13).
_LINEAR_CROSS_ENTROPY: Callable[..., torch.Tensor] | None = getattr(F, "linear_cross_entropy", None)


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Weight normalisation :math:`w = v\\, g / \\lVert v \\rVert`, exact to second order.

    The norm is over every dimension of ``v`` except ``dim`` (``dim=-1``: over all of
    ``v``), as in ``torch._weight_norm``, whose fused kernel has wrong second
    derivatives (module docstring).  This is PyTorch's non-fused formula.

    Parameters
    ----------
    v : torch.Tensor
        The direction.
    g : torch.Tensor
        The magnitude, broadcastable against ``v`` (size 1 except along ``dim``).
    dim : int
        The dimension that keeps one norm per slice; ``-1`` for one norm of all of ``v``.

    Returns
    -------
    torch.Tensor
        The normalised weight, shaped like ``v``.

    Examples
    --------
    >>> v = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    >>> weight_norm(v, torch.tensor([[10.0], [1.0]]), 0)
    tensor([[6., 8.],
            [0., 1.]])
    """
    return v * (g / torch.norm_except_dim(v, 2, dim))


def embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """``F.embedding`` with the loss's own derivatives: no gradient rescaling by index
    frequency, dense gradients, and derivatives for the row of ``padding_idx`` too
    (``scale_grad_by_freq``, ``sparse`` and ``padding_idx`` change no output value, only
    PyTorch's gradient, and are ignored).

    PyTorch gives the padding row no gradient, a training convention (the row is never
    updated), in reverse mode only: its forward-mode derivative does include the row,
    so the GGN of one cached batch and that of a list of batches differed (by 3 % on a
    small model, 46 % for a tiny BART question-answering head whose inputs held pad
    tokens).  Both now have the loss's derivatives, those the finite differences of the
    loss see.

    Examples
    --------
    >>> w = torch.randn(4, 2, requires_grad=True)
    >>> i = torch.tensor([1, 1, 3])
    >>> g_exact = torch.autograd.grad(embedding(i, w, scale_grad_by_freq=True).sum(), w)[0]
    >>> g_torch = torch.autograd.grad(F.embedding(i, w, scale_grad_by_freq=True).sum(), w)[0]
    >>> g_exact[1].tolist(), g_torch[1].tolist()  # index 1 is used twice
    ([2.0, 2.0], [1.0, 1.0])
    """
    return F.embedding(input, weight, None, max_norm, norm_type, False, False)


def cosine_similarity(
    x1: torch.Tensor, x2: torch.Tensor, dim: int = 1, eps: float = 1e-8
) -> torch.Tensor:
    """``F.cosine_similarity`` with the derivatives of the function it computes.

    PyTorch computes :math:`\\sum (x_1 / \\max(\\lVert x_1 \\rVert, \\epsilon))
    (x_2 / \\max(\\lVert x_2 \\rVert, \\epsilon))` along ``dim``, but clamps the norms
    in place with gradients off: where a norm is below ``eps`` its gradient is that of
    the unclamped norm, so even the first derivative is not the function's (12 % off
    the second differences of a loss whose vectors had norms below ``eps``).  The same
    operations with a recorded clamp: the same values, exact derivatives.

    Examples
    --------
    >>> x = torch.tensor([[0.3, 0.4]], dtype=torch.float64, requires_grad=True)
    >>> y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    >>> cosine_similarity(x, y, eps=1.0).item() == F.cosine_similarity(x, y, eps=1.0).item()
    True
    >>> torch.autograd.grad(cosine_similarity(x, y, eps=1.0).sum(), x)[0].tolist()  # = y / 1
    [[1.0, 0.0]]
    >>> g_torch = torch.autograd.grad(F.cosine_similarity(x, y, eps=1.0).sum(), x)[0]
    >>> g_torch.round(decimals=2).tolist()  # differentiates the norm, not the clamp
    [[0.82, -0.24]]
    """
    n1 = torch.linalg.vector_norm(x1, dim=dim, keepdim=True).clamp_min(eps)
    n2 = torch.linalg.vector_norm(x2, dim=dim, keepdim=True).clamp_min(eps)
    return ((x1 / n1) * (x2 / n2)).sum(dim)


def hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.hardsigmoid`` as ``hardtanh(x + 3, 0, 6) / 6``: the same values, with a
    double backward (PyTorch has none for ``hardsigmoid_backward``, so every Hessian
    product through MobileNetV3's squeeze-excitation blocks or PP-LCNet failed).
    ``inplace`` is ignored: the result is a new tensor.

    Examples
    --------
    >>> x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    >>> bool(torch.equal(hardsigmoid(x), F.hardsigmoid(x)))
    True
    """
    return F.hardtanh(input + 3.0, 0.0, 6.0) / 6.0


def fmax(input: torch.Tensor, other: torch.Tensor, *, out: torch.Tensor | None = None) -> Any:
    """``torch.fmax`` whose forward-mode derivative is the transpose of its reverse-mode one.

    At exact ties torch 2.13's forward mode gives the tangent to ``other`` while its
    backward pass gives the gradient to ``input``, so a GGN with :math:`Jv` from forward
    mode and :math:`J^\\top u` from reverse mode (lists of batches, DataLoaders,
    ``cache=False``) came out non-symmetric.  Evaluated as ``torch.maximum`` where neither
    argument is NaN (the NaN-ignoring selection of ``fmax`` elsewhere): the same values,
    and at ties the even split that ``torch.maximum`` uses in both modes -- the convention
    of ``torch.fmax`` itself from torch 2.14.

    Examples
    --------
    >>> a = torch.tensor([1.0, float("nan"), 2.0, 0.0])
    >>> b = torch.tensor([1.0, 3.0, float("nan"), 5.0])
    >>> bool(torch.equal(fmax(a, b), torch.fmax(a, b)))
    True
    """
    if out is not None or not isinstance(other, torch.Tensor):
        return torch.fmax(input, other, out=out)
    larger = torch.maximum(input, other)
    return torch.where(other.isnan(), input, torch.where(input.isnan(), other, larger))


def _at_least(input: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``clamp(input, min=low)`` for a tensor ``low`` (see :func:`clamp_replacement`)."""
    return torch.maximum(input, low)


def _at_most(input: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``clamp(input, max=high)`` for a tensor ``high``."""
    return torch.minimum(input, high)


def clamp_replacement(
    original: Callable[..., Any], bounds: tuple[str, ...], *, inplace: bool = False
) -> Callable[..., Any]:
    """A clamp function of PyTorch (``torch.clamp``, ``Tensor.clip_``, ...) whose
    forward-mode derivative at a value exactly on a one-sided tensor bound is the
    transpose of its reverse-mode one.

    ``clamp(x, min=t)`` with a *tensor* ``t`` (and no ``max``), and likewise a tensor
    ``max`` alone, has in torch 2.13 a forward-mode derivative that at ``x == t`` gives the
    tangent to ``t`` while its backward pass gives the gradient to ``x``, so the
    forward-mode GGN paths came out non-symmetric (``clamp_min``/``clamp_max`` with a
    tensor, and two bounds, agree in both modes and are left alone).  Such calls are
    evaluated as ``torch.maximum(x, t)`` (``torch.minimum(x, t)``): the same values, and
    at ties the even split that these use in both modes -- the convention of
    ``torch.clamp`` itself from torch 2.14.  Every other call (scalar bounds, two bounds,
    ``out=``) is PyTorch's own.

    Parameters
    ----------
    original : callable
        The PyTorch function or ``Tensor`` method.
    bounds : tuple of str
        The names of its bound arguments, in positional order (``("min", "max")``).
    inplace : bool
        Whether ``original`` writes into its input (``clamp_``, ``clip_``).

    Examples
    --------
    >>> x, t = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 1.0])
    >>> clamp = clamp_replacement(torch.clamp, ("min", "max"))
    >>> bool(torch.equal(clamp(x, min=t), torch.clamp(x, min=t)))
    True
    """

    def replacement(input: Any, *args: Any, **kwargs: Any) -> Any:
        given = dict(zip(bounds, args))
        if len(args) > len(bounds) or given.keys() & kwargs.keys():
            return original(input, *args, **kwargs)  # PyTorch's own error message
        given.update(kwargs)
        low, high = given.get("min"), given.get("max")
        if not isinstance(input, torch.Tensor) or given.keys() - {"min", "max"}:
            return original(input, *args, **kwargs)  # out=, or not ours to handle
        # in place: the comparison keeps its inputs for the backward pass, so it gets a copy
        source = input.clone() if inplace else input
        if isinstance(low, torch.Tensor) and high is None:
            result = _at_least(source, low)
        elif isinstance(high, torch.Tensor) and low is None:
            result = _at_most(source, high)
        else:
            return original(input, *args, **kwargs)
        return input.copy_(result) if inplace else result

    return replacement


def prelu(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.prelu`` whose forward-mode derivative at ``x == 0`` is the transpose of its
    reverse-mode one.

    At ``x == 0`` PyTorch's backward pass uses the slope ``weight`` and its forward mode
    the slope 1, so the forward-mode GGN paths came out non-symmetric wherever a
    PReLU input was exactly zero (zero padding, a ReLU upstream).  Evaluated as
    ``where(x > 0, x, weight * x)`` with PyTorch's channel broadcasting (dimension 1;
    one slope for inputs of fewer than two dimensions): the same values and backward
    pass, and a forward mode that agrees.

    Examples
    --------
    >>> x = torch.tensor([[-2.0, 0.0], [1.0, -1.0]])
    >>> w = torch.tensor([0.25, 0.5])
    >>> bool(torch.equal(prelu(x, w), F.prelu(x, w)))
    True
    """
    if weight.numel() != 1 and input.ndim >= 2:
        weight = weight.reshape(weight.numel(), *([1] * (input.ndim - 2)))
    elif weight.numel() == 1:
        weight = weight.reshape(())
    return torch.where(input > 0, input, weight * input)


def scatter_reduce_replacement(
    original: Callable[..., Any], *, inplace: bool = False
) -> Callable[..., Any]:
    """``scatter_reduce`` whose ``"amax"``/``"amin"`` with ``include_self=False`` has the
    function's derivatives.

    PyTorch's backward pass of that call still counts the excluded ``self`` value as a
    tie when it equals the result: a source that alone attains the maximum gets half
    its gradient where ``self`` holds the same value (a zero-initialised output and a
    zero source: graph networks' max aggregation); forward mode and finite differences
    give all of it.  Evaluated as the same reduction with ``include_self=True`` over
    ``self`` with the written positions filled with :math:`\\mp\\infty`: the same values,
    the true derivatives in both modes.  Every other call is PyTorch's own.

    Examples
    --------
    >>> out = torch.zeros(2)
    >>> idx, src = torch.tensor([0, 0, 1]), torch.tensor([0.0, -1.0, 3.0], requires_grad=True)
    >>> reduce = scatter_reduce_replacement(torch.Tensor.scatter_reduce)
    >>> torch.autograd.grad(reduce(out, 0, idx, src, "amax", include_self=False).sum(), src)
    (tensor([1., 0., 1.]),)
    >>> torch.autograd.grad(out.scatter_reduce(0, idx, src, "amax", include_self=False).sum(), src)
    (tensor([0.5000, 0.0000, 1.0000]),)
    """

    def replacement(input: Any, *args: Any, **kwargs: Any) -> Any:
        names = ("dim", "index", "src", "reduce")
        given = dict(zip(names, args))
        if len(args) > len(names) or given.keys() & kwargs.keys():
            return original(input, *args, **kwargs)
        given.update(kwargs)
        reduce, include_self = given.get("reduce"), given.get("include_self", True)
        index, src = given.get("index"), given.get("src")
        if (
            include_self
            or reduce not in ("amax", "amin")
            or given.keys() - {*names, "include_self"}
            or not (isinstance(input, torch.Tensor) and input.is_floating_point())
            or not (isinstance(index, torch.Tensor) and isinstance(src, torch.Tensor))
        ):
            return original(input, *args, **kwargs)
        dim = given["dim"]
        written = torch.zeros(input.shape, dtype=torch.bool, device=input.device)
        written.scatter_(dim, index, True)
        fill = -math.inf if reduce == "amax" else math.inf
        base = input.masked_fill(written, fill)
        result = base.scatter_reduce(dim, index, src, reduce, include_self=True)
        return input.copy_(result) if inplace else result

    return replacement


def as_strided_scatter(
    input: torch.Tensor,
    src: torch.Tensor,
    size: Any,
    stride: Any,
    storage_offset: int | None = None,
) -> torch.Tensor:
    """``torch.as_strided_scatter`` with the function's derivatives.

    PyTorch's backward pass gives ``input`` the gradient of the overwritten positions
    instead of the kept ones (checked against finite differences in torch 2.13).
    Evaluated as a copy of ``input`` whose strided view is overwritten in place, which
    autograd differentiates correctly; for an input that is not contiguous from the
    start of its storage (where the strides would mean something else in the copy)
    the call is refused.

    Examples
    --------
    >>> a, b = torch.zeros(4), torch.ones(2)
    >>> as_strided_scatter(a, b, (2,), (2,))
    tensor([1., 0., 1., 0.])
    """
    if not input.is_contiguous() or input.storage_offset() != 0:
        raise argument_error(
            "model",
            "a forward pass whose functions have true derivatives: PyTorch's backward "
            "pass of torch.as_strided_scatter credits the overwritten positions of its "
            "input instead of the kept ones; products evaluate it exactly on contiguous "
            "inputs only. Make the input contiguous (x.contiguous()) before the call",
            "torch.as_strided_scatter of a non-contiguous input",
        )
    out = input.clone()
    out.as_strided(size, stride, storage_offset).copy_(src)
    return out


def polar(
    abs: torch.Tensor, angle: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.polar`` with the function's derivatives at a zero or negative magnitude.

    :math:`z = r (\\cos t + i \\sin t)`, so :math:`\\partial z / \\partial r =
    \\cos t + i \\sin t` everywhere; PyTorch's backward pass gives 0 at :math:`r = 0`
    and the opposite sign at :math:`r < 0` (in torch 2.13 to 2.15; its forward mode is
    right), so a magnitude computed by the model that reaches zero (a ReLU, a masked
    amplitude) had a wrong gradient and a non-symmetric GGN.  Where ``abs > 0``
    PyTorch's values and derivatives are kept; elsewhere ``abs * cos(angle) + i abs *
    sin(angle)`` gives them (the same value up to rounding: ``0`` at ``abs == 0``).

    Examples
    --------
    >>> r = torch.tensor([0.0, 2.0], dtype=torch.float64, requires_grad=True)
    >>> t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    >>> torch.autograd.grad(polar(r, t).real.sum(), r)[0]
    tensor([1.0000, 0.5403], dtype=torch.float64)
    >>> bool(torch.equal(polar(r, t)[1], torch.polar(r, t)[1]))
    True
    """
    if out is not None:
        return torch.polar(abs, angle, out=out)
    value = torch.polar(abs, angle)
    exact = torch.complex(abs * torch.cos(angle), abs * torch.sin(angle))
    return torch.where(abs > 0, value, exact)


def determinant(original: Callable[..., Any]) -> Callable[..., Any]:
    """``det`` whose forward-mode derivative of a 1 x 1 matrix is the right one.

    The derivative of :math:`\\det [a] = a` is 1, which PyTorch's backward pass gives;
    its forward mode gives 0 at :math:`a = 0` (in torch 2.13 to 2.15), so the
    forward-mode GGN paths disagreed with the others there.  A ``1 x 1`` matrix (or a
    batch of them) is evaluated as its entry, bitwise the same value; every other
    call is PyTorch's own.

    Examples
    --------
    >>> det = determinant(torch.linalg.det)
    >>> a = torch.zeros(1, 1, dtype=torch.float64)
    >>> import torch.autograd.forward_ad as fwAD
    >>> with fwAD.dual_level():
    ...     d = det(fwAD.make_dual(a, torch.ones_like(a)))
    ...     fwAD.unpack_dual(d).tangent
    tensor(1., dtype=torch.float64)
    """

    def replacement(A: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not isinstance(A, torch.Tensor) or tuple(A.shape[-2:]) != (1, 1):
            return original(A, *args, **kwargs)
        return A[..., 0, 0].clone()

    return replacement


def linear_cross_entropy_reference(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``F.linear_cross_entropy`` without chunking (``options=None``): the same loss,
    computed as ``cross_entropy(linear(input, weight, bias), target, ...)``, whose
    second derivatives are exact.

    Examples
    --------
    >>> x, W = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    >>> y = torch.tensor([0, 4, 2, 1])
    >>> ref = F.cross_entropy(F.linear(x, W), y)
    >>> bool(torch.allclose(linear_cross_entropy_reference(x, W, y), ref))
    True
    """
    assert _LINEAR_CROSS_ENTROPY is not None  # registered only where torch has it
    return _LINEAR_CROSS_ENTROPY(*args, **{**kwargs, "options": None})


def spectral_norm_sigma(
    weight_mat: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    steps: int,
    eps: float,
    *,
    left_first: bool = True,
) -> torch.Tensor:
    """The spectral-norm estimate :math:`\\sigma = u^\\top W v` after ``steps`` power
    steps from ``u, v``, differentiable in ``weight_mat`` (the vectors move with it).

    ``left_first`` is the order of ``nn.utils.parametrizations.spectral_norm``
    (:math:`u \\leftarrow Wv/\\lVert Wv\\rVert`, then
    :math:`v \\leftarrow W^{\\mathsf H} u/\\lVert\\cdot\\rVert`, :math:`\\sigma` by
    ``vdot``); ``left_first=False`` that of the older ``nn.utils.spectral_norm``
    (:math:`v` first, :math:`\\sigma` by ``dot``).  The operations are PyTorch's, so
    the value is the one its training-mode forward pass computes; only the derivatives
    differ (PyTorch's hold the vectors constant).

    Examples
    --------
    >>> W = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    >>> u, v = torch.tensor([1.0, 1.0]) / 2**0.5, torch.tensor([1.0, 1.0]) / 2**0.5
    >>> round(float(spectral_norm_sigma(W, u, v, 30, 1e-12)), 6)  # the largest singular value
    3.0
    """
    for _ in range(steps):
        if left_first:
            u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=eps)
            v = F.normalize(torch.mv(weight_mat.H, u), dim=0, eps=eps)
        else:
            v = F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=eps)
            u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=eps)
    if left_first:
        return torch.vdot(u, torch.mv(weight_mat, v))
    return torch.dot(u, torch.mv(weight_mat, v))


def exact_spectral_norm_forward(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``forward`` of a ``parametrizations.spectral_norm`` module (``_SpectralNorm``)
    with exact derivatives: its power steps (training mode) run through
    :func:`spectral_norm_sigma`; the stored vectors are read, not written.

    Examples
    --------
    >>> from torch.nn.utils.parametrizations import spectral_norm
    >>> lin = torch.nn.Linear(3, 2)
    >>> with torch.no_grad():  # singular values 1 and 0.99: a slowly converging iteration
    ...     _ = lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.99, 0.0]]))
    >>> lin = spectral_norm(lin)
    >>> sn = lin.parametrizations.weight[0]
    >>> w = lin.parametrizations.weight.original
    >>> u = sn._u.clone()
    >>> bool(torch.equal(exact_spectral_norm_forward(sn)(w), sn(w)))  # same value
    True
    >>> bool(torch.equal(sn._u, u))  # PyTorch's forward advanced the stored vector
    False
    """

    def forward(weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=module.eps)
        weight_mat = module._reshape_weight_to_matrix(weight)
        steps = module.n_power_iterations if module.training else 0
        return weight / spectral_norm_sigma(weight_mat, module._u, module._v, steps, module.eps)

    return forward


def exact_spectral_norm_compute_weight(hook: Any) -> Callable[[Any, bool], torch.Tensor]:
    """``compute_weight`` of an ``nn.utils.spectral_norm`` hook (``SpectralNorm``) with
    exact derivatives (:func:`spectral_norm_sigma`, ``left_first=False``).

    Examples
    --------
    >>> lin = torch.nn.utils.spectral_norm(torch.nn.Linear(3, 2))
    >>> hook = next(iter(lin._forward_pre_hooks.values()))
    >>> a = exact_spectral_norm_compute_weight(hook)(lin, True)
    >>> bool(torch.equal(a, hook.compute_weight(lin, True)))
    True
    """

    def compute_weight(module: Any, do_power_iteration: bool) -> torch.Tensor:
        weight = getattr(module, hook.name + "_orig")
        u = getattr(module, hook.name + "_u")
        v = getattr(module, hook.name + "_v")
        weight_mat = hook.reshape_weight_to_matrix(weight)
        steps = hook.n_power_iterations if do_power_iteration else 0
        sigma = spectral_norm_sigma(weight_mat, u, v, steps, hook.eps, left_first=False)
        return weight / sigma

    return compute_weight


#: The fake-quantisation functions (straight-through backward) that products refuse.
FAKE_QUANTIZATION_FUNCTIONS: tuple[Callable[..., Any], ...] = tuple(
    f
    for f in (
        getattr(torch, name, None)
        for name in (
            "fake_quantize_per_tensor_affine",
            "fake_quantize_per_channel_affine",
            "_fake_quantize_learnable_per_tensor_affine",
            "_fake_quantize_learnable_per_channel_affine",
            "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
            "fused_moving_avg_obs_fake_quant",
        )
    )
    if f is not None
)


def refuse_fake_quantization(function: Callable[..., Any]) -> Callable[..., Any]:
    """The stand-in for a fake-quantisation ``function`` inside products: it raises.

    ``torch.fused_moving_avg_obs_fake_quant`` is called by
    ``FusedMovingAvgObsFakeQuantize`` also while fake quantisation is off (its
    ``fake_quant_on`` flag is 0: the identity, with the identity's exact derivative),
    so that call goes through; every other call raises ``ValueError`` naming ``model``.

    Examples
    --------
    >>> fake = refuse_fake_quantization(torch.fake_quantize_per_tensor_affine)
    >>> fake(torch.ones(2), 0.1, 0, -128, 127)
    Traceback (most recent call last):
    ...
    ValueError: Argument 'model': expected a forward pass whose functions have true derivatives...
    """
    name = f"torch.{function.__name__}"

    def refused(*args: Any, **kwargs: Any) -> Any:
        if function is getattr(torch, "fused_moving_avg_obs_fake_quant", None):
            on = args[2] if len(args) > 2 else kwargs.get("fake_quant_on")
            if isinstance(on, torch.Tensor) and on.numel() > 0 and not bool(on.reshape(-1)[0]):
                return function(*args, **kwargs)
        raise argument_error(
            "model",
            "a forward pass whose functions have true derivatives: fake quantisation "
            "(quantisation-aware training) rounds to a grid, so the network's true "
            "derivatives vanish almost everywhere, and back-propagates a "
            "straight-through estimator instead; curvature products through it would "
            "be those of a surrogate, silently. For the full-precision network's "
            "curvature turn fake quantisation off during the analysis "
            "(model.apply(torch.ao.quantization.disable_fake_quant), and "
            "enable_fake_quant afterwards)",
            f"a forward pass that calls {name} with fake quantisation on",
        )

    return refused


#: function -> its replacement inside the forward passes of products.
REPLACEMENTS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch._weight_norm: weight_norm,
    F.embedding: embedding,
    F.cosine_similarity: cosine_similarity,
    F.hardsigmoid: hardsigmoid,
    torch.fmax: fmax,
    torch.prelu: prelu,
    torch.as_strided_scatter: as_strided_scatter,
    torch.Tensor.as_strided_scatter: as_strided_scatter,
    torch.scatter_reduce: scatter_reduce_replacement(torch.scatter_reduce),
    torch.Tensor.scatter_reduce: scatter_reduce_replacement(torch.Tensor.scatter_reduce),
    torch.Tensor.scatter_reduce_: scatter_reduce_replacement(
        torch.Tensor.scatter_reduce_, inplace=True
    ),
    torch.Tensor.fmax: fmax,
    torch.polar: polar,
    **{f: determinant(f) for f in (torch.det, torch.linalg.det, torch.Tensor.det)},
    **{
        f: clamp_replacement(f, ("min", "max"))
        for f in (torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip)
    },
    **{
        f: clamp_replacement(f, ("min", "max"), inplace=True)
        for f in (torch.clamp_, torch.clip_, torch.Tensor.clamp_, torch.Tensor.clip_)
    },
    **{f: refuse_fake_quantization(f) for f in FAKE_QUANTIZATION_FUNCTIONS},
}
if _LINEAR_CROSS_ENTROPY is not None:
    REPLACEMENTS[_LINEAR_CROSS_ENTROPY] = linear_cross_entropy_reference


class _WrongSecondDerivatives(TorchFunctionMode):
    """Record the calls of functions with wrong second derivatives (no replacement)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            self.found.append(
                "torch._weight_norm (weight normalisation); normalise the weights inside "
                "the model, where products replace it by an exact formula"
            )
        elif func is _LINEAR_CROSS_ENTROPY and kwargs.get("options") is not None:
            self.found.append(
                "F.linear_cross_entropy with chunking options; evaluate it without chunking "
                "(options=None, the reference implementation of the same loss), or compute "
                "the logits in the model and use nn.CrossEntropyLoss"
            )
        return func(*args, **kwargs)


def check_loss_second_derivatives(
    loss_fn: Callable[..., Any], outputs: Any, targets: torch.Tensor
) -> Any:
    """Evaluate ``loss_fn(outputs, targets)``, refusing a loss that calls a function with
    wrong second derivatives (module docstring).

    Parameters
    ----------
    loss_fn : callable
        The loss.
    outputs, targets
        A batch's model outputs and targets.

    Returns
    -------
    Any
        The loss value.

    Raises
    ------
    ValueError
        Naming ``loss_fn``, the function and the remedy.

    Examples
    --------
    >>> out, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    >>> float(check_loss_second_derivatives(F.cross_entropy, out, y)) > 0
    True
    """
    with _WrongSecondDerivatives() as mode:
        value = evaluate_loss(loss_fn, outputs, targets)
    if mode.found:
        function, remedy = mode.found[0].split("; ", 1)
        raise argument_error(
            "loss_fn",
            f"a loss whose second derivatives PyTorch computes correctly: it calls "
            f"{function}, whose double backward is wrong in torch {torch.__version__}, so "
            f"curvature products through it would be silently wrong; {remedy}",
            loss_fn,
        )
    return value


#: The native functions whose third derivatives PyTorch gets wrong, by the class name
#: of the node their backward leaves in a graph that differentiates through them
#: (batch-norm nodes only in training mode), with the remedy under the lean kernels.
_WRONG_THIRD_DERIVATIVES: dict[str, tuple[str, str]] = {
    "NativeLayerNormBackwardBackward0": (
        "layer_norm (nn.LayerNorm)",
        "call it as nn.LayerNorm or F.layer_norm on plain tensors (torch.layer_norm, "
        "torch.native_layer_norm and tensor subclasses run natively)",
    ),
    "BatchNormBackwardBackward0": (
        "batch_norm in training mode (nn.BatchNorm*, F.instance_norm)",
        "call it as nn.BatchNorm* or F.batch_norm with a numeric momentum, or in eval "
        "mode; for F.instance_norm / nn.InstanceNorm* use nn.GroupNorm(C, C), the same "
        "normalisation",
    ),
}


def _wrong_third_derivative(roots: Sequence[torch.Tensor]) -> tuple[str, str] | None:
    """``(function, remedy)`` of the first native function of :data:`_WRONG_THIRD_DERIVATIVES`
    that the graph of ``roots`` differentiates through, or ``None``."""
    for node in graph_nodes(roots):
        name = type(node).__name__
        if name == "NativeLayerNormBackwardBackward0":
            return _WRONG_THIRD_DERIVATIVES[name]
        # native, cuDNN and MIOpen batch norm; the last two only ever in training mode
        if name.endswith("BatchNormBackwardBackward0") and getattr(node, "_saved_train", True):
            return _WRONG_THIRD_DERIVATIVES["BatchNormBackwardBackward0"]
    return None


def check_third_derivatives(roots: Sequence[torch.Tensor], *, lean_kernels: bool) -> None:
    """Refuse a Hessian that needs PyTorch's wrong third derivatives (module docstring).

    Call with the loss of a forward pass recorded for a Hessian (under the lean kernels
    when ``lean_kernels``).  Its graph holds the backward node of ``layer_norm`` or
    train-mode ``batch_norm`` only where the forward pass took a gradient through
    PyTorch's own kernel of them; differentiating the loss twice then differentiates
    that backward twice, with formulas that are wrong in torch 2.13.  One walk of the
    forward graph (a fraction of a millisecond for a few hundred nodes).

    Parameters
    ----------
    roots : sequence of torch.Tensor
        The loss (or outputs) whose graph is searched.
    lean_kernels : bool
        Whether the graph was recorded with the lean kernels (for the message: without
        them the remedy is ``lean_kernels=True``).

    Raises
    ------
    ValueError
        Naming ``lean_kernels`` (or ``model``, for a call the lean kernels do not
        cover), the function and the remedy.

    Examples
    --------
    >>> x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    >>> w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    >>> (g,) = torch.autograd.grad(F.layer_norm(x, (3,), w).pow(3).sum(), x, create_graph=True)
    >>> check_third_derivatives([g.square().sum()], lean_kernels=False)
    Traceback (most recent call last):
    ...
    ValueError: Argument 'lean_kernels': expected True (the default) for this model...
    >>> check_third_derivatives([F.layer_norm(x, (3,), w).sum()], lean_kernels=False)
    """
    found = _wrong_third_derivative(roots)
    if found is None:
        return
    function, remedy = found
    wrong = (
        f"its forward pass takes a gradient through {function}, so its Hessian needs third "
        f"derivatives of {function}, which PyTorch computes wrongly (torch "
        f"{torch.__version__}: gradgradcheck of its gradient fails), and every Hessian "
        "product would be silently wrong"
    )
    if not lean_kernels:
        raise argument_error(
            "lean_kernels",
            f"True (the default) for this model: {wrong}; the lean kernels compute them "
            "exactly (the GGN and Fisher need no third derivatives and take either)",
            False,
        )
    raise argument_error(
        "model",
        f"a forward pass whose own gradients go through the lean kernels: {wrong}; the "
        f"lean kernels compute them exactly but do not cover this call: {remedy}",
        f"a forward pass that differentiates through PyTorch's own {function}",
    )
