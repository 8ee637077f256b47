"""Lean double backward for the layers that dominate CNN Hessian products.

A Hessian product by double backward, :math:`Hv = \\nabla_w (\\nabla_w L^\\top v)`,
differentiates the *gradient graph*: every backward formula of the forward pass
(``ConvolutionBackward0``, ``NativeBatchNormBackward0``, ``ReluBackward0``, ...) is
itself differentiated.  PyTorch's generic formulas for that second step do much
more work than the mathematics needs:

* ``batchnorm_double_backward`` runs about thirty elementwise passes per layer, and
  evaluates the full train-mode formula even for eval-mode BatchNorm, an affine map
  per channel;
* ``_convolution_double_backward`` builds two of its four convolutions from
  transposed, batch-and-channel-swapped ``_convolution`` calls instead of the
  dedicated input- and weight-gradient kernels;
* the backward formulas of ReLU and max pooling differentiate to zero with respect to
  the saved activations, but autograd materialises those zeros
  (``zeros_like``) and carries them back through the graph.

Measured on a 151k-parameter CIFAR-shaped CNN with BatchNorm (batch 256, one CPU
thread), the native double backward costs 2.0-2.6 gradient-times in eval mode (38% of
it in ``NativeBatchNormBackwardBackward0`` alone) and 3.2-4.7 in train mode; with
this module 1.0-1.2 and 1.0-1.4.

This module replaces those operations, *only while a Hessian's gradient graph is
recorded* (:func:`lean_double_backward`, a :class:`torch.overrides.TorchFunctionMode`),
by :class:`torch.autograd.Function` pairs ``Op``/``OpBackward`` whose second
derivatives use the fastest kernels and skip every exact zero.  With
:math:`\\delta` the output gradient and :math:`(u_x, U_W, u_b)` the cotangents of
the first backward's outputs:

**Convolution** :math:`z = W \\star x + b` (any dimension, stride, padding,
dilation, groups).  First backward: :math:`g_x = W^\\top \\star \\delta`,
:math:`g_W = \\delta \\otimes x`, :math:`g_b = \\sum \\delta`.  Second:

.. math::
    \\bar\\delta = W \\star u_x + U_W \\star x + u_b, \\qquad
    \\bar x = U_W^\\top \\star \\delta, \\qquad
    \\bar W = \\delta \\otimes u_x,

two forward convolutions, one input-gradient and one weight-gradient kernel, each
skipped when its operand is absent (``x`` of the first layer needs no gradient).

**Eval-mode BatchNorm** :math:`y = \\gamma \\hat x + \\beta`, :math:`\\hat x = (x -
\\mu) r`, :math:`r = (\\sigma^2 + \\epsilon)^{-1/2}` from the running statistics.
First backward: :math:`g_x = \\gamma r \\delta`, :math:`g_\\gamma = \\sum \\delta
\\hat x`, :math:`g_\\beta = \\sum \\delta` (one fused kernel).  Second:

.. math::
    \\bar\\delta = \\gamma r\\, u_x + \\hat x\\, u_\\gamma + u_\\beta, \\qquad
    \\bar x = r\\, u_\\gamma\\, \\delta, \\qquad
    \\bar\\gamma = r \\sum u_x \\delta.

**Train-mode BatchNorm** (batch statistics over the :math:`m` values of a channel,
:math:`\\hat x = (x - \\mu) r`, :math:`r = (\\sigma^2_B + \\epsilon)^{-1/2}`).  First
backward (fused kernel): :math:`g_x = \\gamma r (\\delta - a - b \\hat x)` with
:math:`a = \\overline{\\delta}`, :math:`b = \\overline{\\delta \\hat x}` (channel means),
:math:`g_\\gamma = m b`, :math:`g_\\beta = m a`.  With :math:`\\bar u = \\overline{u_x}`,
:math:`c = \\overline{u_x \\hat x}`, :math:`e = \\overline{u_x \\delta}`, the second is

.. math::
    \\bar\\delta &= \\gamma r (u_x - \\bar u - c \\hat x) + u_\\gamma \\hat x + u_\\beta, \\qquad
    \\bar\\gamma = r m (e - \\bar u a - c b), \\\\
    \\bar x &= r u_\\gamma (\\delta - a - b \\hat x)
      + \\gamma r^2 \\left[-b (u_x - \\bar u) - c (\\delta - a)
      + (3 c b - e + \\bar u a) \\hat x\\right],

one fused BatchNorm-backward kernel for the first term of :math:`\\bar\\delta` and
the sums :math:`\\bar u, c`, one reduction for :math:`e` and four in-place passes;
PyTorch's formula runs about thirty.

**ReLU** :math:`y = \\max(x, 0)`: :math:`g_x = 1[y > 0]\\, \\delta`, and
:math:`\\bar\\delta = 1[y > 0]\\, u_x` with no term for the (piecewise constant)
mask.  **Max pooling** (2-D): :math:`g_x` scatters :math:`\\delta` to the argmax
positions; :math:`\\bar\\delta` gathers :math:`u_x` from them.  Both only from
:data:`LEAN_MIN_ELEMENTS` elements on (below, PyTorch's formulas are as fast).

LayerNorm, GELU, softmax and ``F.scaled_dot_product_attention`` get their lean
second derivatives from :mod:`curvops.lean_transformer_ops` (through the same mode).

Every other operation, and every call these functions do not cover (in-place ReLU,
string padding, transposed convolutions, tensor subclasses, ...), runs natively.
The results are the same derivatives up to floating-point rounding (tests: against
dense float64 Hessians and ``torch.autograd.gradgradcheck``).  Under
``create_graph`` the formulas switch to differentiable composite operations, so
third derivatives stay correct -- for train-mode BatchNorm and LayerNorm more so than
PyTorch's own, which disagree with finite differences in torch 2.13 (see the tests).
Third derivatives are what a Hessian needs when the forward pass takes a gradient of
itself (physics-informed networks, gradient penalties, force fields); where such a
forward pass differentiates through a call that falls back to PyTorch's
``layer_norm`` or train-mode ``batch_norm``, :func:`curvops.products.hessian_linearization`
refuses it (:func:`curvops.derivative_repairs.check_third_derivatives`).  The mode only
changes how the graph is recorded: no module, parameter or buffer is touched.

>>> import torch
>>> conv = torch.nn.Conv2d(1, 2, 3).double()
>>> x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
>>> w = [p.detach().requires_grad_() for p in conv.parameters()]
>>> def loss(ps):
...     return torch.nn.functional.conv2d(x, ps[0], ps[1]).pow(2).mean()
>>> with lean_double_backward():
...     g = torch.autograd.grad(loss(w), w, create_graph=True)
>>> type(g[0].grad_fn).__name__
'_ConvolutionBackwardBackward'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from curvops.lean_transformer_ops import TRANSFORMER_FUNCTIONS, JacobianOnlyState, _constants

__all__ = ["LEAN_MIN_ELEMENTS", "LeanDoubleBackwardMode", "lean_double_backward"]

aten = torch.ops.aten

_ConvConfig = tuple[list[int], list[int], list[int], int]
_PoolConfig = tuple[list[int], list[int], list[int], list[int], bool]


# ---------------------------------------------------------------- convolution
def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cfg: _ConvConfig) -> Any:
    stride, padding, dilation, groups = cfg
    zeros = [0] * len(stride)
    return aten.convolution(x, w, b, stride, padding, dilation, False, zeros, groups)


def _conv_backward(
    gy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    cfg: _ConvConfig,
    mask: list[bool],
) -> Any:
    stride, padding, dilation, groups = cfg
    zeros = [0] * len(stride)
    bias_sizes = [w.shape[0]] if mask[2] else None
    return aten.convolution_backward(
        gy, x, w, bias_sizes, stride, padding, dilation, False, zeros, groups, mask
    )


def _add(acc: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``acc + term``, in place on ``acc`` (a fresh full-size result) unless recording.

    Allocating a large result costs more than the arithmetic on CPU (page faults:
    27 ms for ``x * s`` against 4 ms for ``acc.addcmul_(x, s)`` with 33 MB tensors),
    so the second-derivative formulas accumulate into tensors they own.  Under
    ``create_graph`` (grad mode on) the out-of-place form keeps the graph intact.
    """
    return acc + term if torch.is_grad_enabled() else acc.add_(term)


def _addcmul(acc: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``acc + t * s``, in place on ``acc`` unless recording (see :func:`_add`)."""
    return torch.addcmul(acc, t, s) if torch.is_grad_enabled() else acc.addcmul_(t, s)


class _ConvolutionBackward(torch.autograd.Function):
    """:math:`(\\delta, x, W) \\mapsto (g_x, g_W, g_b)`, differentiable (see module)."""

    @staticmethod
    def forward(
        ctx: Any,
        gy: torch.Tensor,
        x: torch.Tensor,
        w: torch.Tensor,
        cfg: _ConvConfig,
        mask: list[bool],
    ) -> tuple[Any, Any, Any]:
        ctx.save_for_backward(gy, x, w)
        ctx.cfg = cfg
        ctx.has_bias = mask[2]
        ctx.set_materialize_grads(False)
        gx, gw, gb = _conv_backward(gy, x, w, cfg, mask)
        return gx, gw, gb

    @staticmethod
    def backward(
        ctx: Any, ux: torch.Tensor | None, uw: torch.Tensor | None, ub: torch.Tensor | None
    ) -> tuple[Any, ...]:
        gy, x, w = ctx.saved_tensors
        cfg = ctx.cfg
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        if not ctx.has_bias:
            ub = None
        d_gy = d_x = d_w = None
        if ux is not None:
            if need_gy:
                d_gy = _conv(ux, w, None, cfg)
            if need_w:
                d_w = _conv_backward(gy, ux, w, cfg, [False, True, False])[1]
        if uw is not None:
            if need_gy:
                term = _conv(x, uw, ub, cfg)
                d_gy = term if d_gy is None else _add(d_gy, term)
            if need_x:
                d_x = _conv_backward(gy, x, uw, cfg, [True, False, False])[0]
        elif ub is not None and need_gy:
            term = ub.view((1, -1) + (1,) * (gy.ndim - 2))
            d_gy = term.expand_as(gy) if d_gy is None else _add(d_gy, term)
        return d_gy, d_x, d_w, None, None


class _Convolution(torch.autograd.Function):
    """:math:`z = W \\star x + b` whose backward is :class:`_ConvolutionBackward`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        cfg: _ConvConfig,
        jacobian_only: JacobianOnlyState | None,
    ) -> Any:
        ctx.save_for_backward(x, w)
        ctx.cfg = cfg
        ctx.has_bias = b is not None
        ctx.jacobian_only = jacobian_only
        return _conv(x, w, b, cfg)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, w = _constants(ctx, ctx.saved_tensors)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, need_w, bool(need_b and ctx.has_bias)]
        gx, gw, gb = _ConvolutionBackward.apply(gy, x, w, ctx.cfg, mask)
        return gx, gw, gb, None, None


# ---------------------------------------------------------- eval BatchNorm
def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


class _BatchNormEvalBackward(torch.autograd.Function):
    """:math:`(\\delta, x, \\gamma) \\mapsto (g_x, g_\\gamma, g_\\beta)` with running statistics."""

    @staticmethod
    def forward(
        ctx: Any,
        gy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        eps: float,
        mask: list[bool],
    ) -> tuple[Any, Any, Any]:
        ctx.save_for_backward(gy, x, weight, mean, var)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        gx, gw, gb = aten.native_batch_norm_backward(
            gy, x, weight, mean, var, None, None, False, eps, mask
        )
        return gx, gw, gb

    @staticmethod
    def backward(
        ctx: Any, ux: torch.Tensor | None, uw: torch.Tensor | None, ub: torch.Tensor | None
    ) -> tuple[Any, ...]:
        gy, x, weight, mean, var = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        rstd = torch.rsqrt(var + ctx.eps)
        d_gy = d_x = d_w = None
        if need_gy:
            scale = _channel_view(rstd if weight is None else weight * rstd, gy.ndim)
            if uw is not None:  # x_hat u_gamma + u_beta: an eval BatchNorm of x with weight u_gamma
                d_gy = aten.native_batch_norm(x, uw, ub, mean, var, False, 0.0, ctx.eps)[0]
                if ux is not None:
                    d_gy = _addcmul(d_gy, ux, scale)
            elif ub is not None:
                ub_view = _channel_view(ub, gy.ndim)
                d_gy = ub_view.expand_as(gy) if ux is None else torch.addcmul(ub_view, ux, scale)
            elif ux is not None:
                d_gy = ux * scale
        if ux is not None and need_w and weight is not None:
            if torch.is_grad_enabled():  # create_graph: differentiable composite
                d_w = (ux * gy).sum([0, *range(2, gy.ndim)]) * rstd
            else:  # r * sum(u_x delta): the fused weight-gradient reduction, "input" u_x, mean 0
                d_w = aten.native_batch_norm_backward(
                    gy,
                    ux,
                    None,
                    torch.zeros_like(mean),
                    var,
                    None,
                    None,
                    False,
                    ctx.eps,
                    [False, True, False],
                )[1]
        if uw is not None and need_x:
            d_x = gy * _channel_view(uw * rstd, gy.ndim)
        return d_gy, d_x, d_w, None, None, None, None


class _BatchNormEval(torch.autograd.Function):
    """Eval-mode BatchNorm whose backward is :class:`_BatchNormEvalBackward`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        eps: float,
        jacobian_only: JacobianOnlyState | None,
    ) -> Any:
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.jacobian_only = jacobian_only
        return aten.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, mean, var = _constants(ctx, ctx.saved_tensors)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, bool(need_w and weight is not None), bool(need_b and ctx.has_bias)]
        gx, gw, gb = _BatchNormEvalBackward.apply(gy, x, weight, mean, var, ctx.eps, mask)
        return gx, gw, gb, None, None, None, None


# ------------------------------------------------------ train BatchNorm
def _fused_cotangent_moments(
    gy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    batch_stats: tuple[torch.Tensor, torch.Tensor],
    ux: torch.Tensor,
    needs: tuple[bool, bool],
    eps: float,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t1, mean u_x, mean u_x x_hat, mean u_x delta)`` from BatchNorm's fused backward kernel.

    ``t1 = gamma r (u_x - mean u_x - x_hat mean(u_x x_hat))`` when ``needs[0]`` (the
    first term of the output-gradient cotangent); ``mean(u_x delta)`` only when
    ``needs[1]`` (the input and weight cotangents use it; zero otherwise), from the
    same kernel run with mean 0 and invstd 1.
    """
    mean, invstd = batch_stats
    m = x.numel() // x.shape[1]
    t1, sum_ux_xhat, sum_ux = aten.native_batch_norm_backward(
        ux, x, weight, None, None, mean, invstd, True, eps, [needs[0], True, True]
    )
    zeros, ones = torch.zeros_like(invstd), torch.ones_like(invstd)
    e = zeros
    if needs[1]:
        e = (
            aten.native_batch_norm_backward(
                gy, ux, None, None, None, zeros, ones, True, eps, [False, True, False]
            )[1]
            / m
        )
    return t1, sum_ux / m, sum_ux_xhat / m, e


def _train_bn_double_backward(
    gy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    cotangents: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    needs: tuple[bool, bool, bool],
    eps: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Second derivatives of batch-statistics BatchNorm (formulas in the class docstring).

    ``stats = (mean, invstd, a, b)`` per channel from the forward and first backward
    (fused kernels, no graph); ``None`` recomputes them with differentiable operations
    (``create_graph``: third derivatives).
    """
    ux, uw, ub = cotangents
    need_gy, need_x, need_w = needs
    dims = [0, *range(2, x.ndim)]
    m = x.numel() // x.shape[1]

    def view(t: torch.Tensor) -> torch.Tensor:
        return _channel_view(t, x.ndim)

    if stats is None:
        mean = x.mean(dims)
        invstd = torch.rsqrt((x - view(mean)).square().mean(dims) + eps)
        xhat = (x - view(mean)) * view(invstd)
        a, b = gy.mean(dims), (gy * xhat).mean(dims)
    else:
        mean, invstd, a, b = stats
    gamma = torch.ones_like(invstd) if weight is None else weight
    zero = torch.zeros_like(invstd)
    t1 = None
    u_mean = c = e = zero
    if ux is not None and stats is None:
        u_mean, c, e = ux.mean(dims), (ux * xhat).mean(dims), (ux * gy).mean(dims)
        if need_gy:
            t1 = view(gamma * invstd) * (ux - view(u_mean) - view(c) * xhat)
    elif ux is not None:
        t1, u_mean, c, e = _fused_cotangent_moments(
            gy, x, weight, (mean, invstd), ux, (need_gy, need_x or need_w), eps
        )
    d_gy = d_x = d_w = None
    if need_gy:
        k = zero if uw is None else invstd * uw  # x_hat u_gamma + u_beta = k x + shift
        shift = -mean * k if ub is None else ub - mean * k
        if t1 is None:
            if uw is not None or ub is not None:
                d_gy = torch.addcmul(view(shift), x, view(k)).expand_as(gy)
        elif uw is not None or ub is not None:
            d_gy = _add(_addcmul(t1, x, view(k)), view(shift))
        else:
            d_gy = t1
    if need_x and (ux is not None or uw is not None):
        u_gamma = zero if uw is None else uw
        g_r2 = gamma * invstd * invstd
        alpha = invstd * u_gamma - g_r2 * c
        kappa = -invstd * u_gamma * b + g_r2 * (3 * c * b - e + u_mean * a)
        const = -invstd * u_gamma * a + g_r2 * (b * u_mean + c * a)
        # alpha delta + beta u_x + kappa x_hat + const, x_hat = (x - mean) invstd
        d_x = _add(
            _addcmul(gy * view(alpha), x, view(kappa * invstd)), view(const - kappa * invstd * mean)
        )
        if ux is not None:
            d_x = _addcmul(d_x, ux, view(-g_r2 * b))
    if need_w and weight is not None and ux is not None:
        d_w = invstd * m * (e - u_mean * a - c * b)
    return d_gy, d_x, d_w


class _BatchNormTrainBackward(torch.autograd.Function):
    """:math:`(\\delta, x, \\gamma) \\mapsto (g_x, g_\\gamma, g_\\beta)` with batch statistics."""

    @staticmethod
    def forward(
        ctx: Any,
        gy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        eps: float,
        mask: list[bool],
    ) -> tuple[Any, Any, Any]:
        gx, gw, gb = aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, eps, [mask[0], True, True]
        )
        m = x.numel() // x.shape[1]
        ctx.save_for_backward(gy, x, weight, mean, invstd, gb / m, gw / m)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return gx, (gw if mask[1] else None), (gb if mask[2] else None)

    @staticmethod
    def backward(
        ctx: Any, ux: torch.Tensor | None, uw: torch.Tensor | None, ub: torch.Tensor | None
    ) -> tuple[Any, ...]:
        gy, x, weight, mean, invstd, a, b = ctx.saved_tensors
        stats = None if torch.is_grad_enabled() else (mean, invstd, a, b)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        d_gy, d_x, d_w = _train_bn_double_backward(
            gy, x, weight, stats, (ux, uw, ub), needs, ctx.eps
        )
        return d_gy, d_x, d_w, None, None, None, None


class _BatchNormTrain(torch.autograd.Function):
    """Batch-statistics BatchNorm whose backward is :class:`_BatchNormTrainBackward`.

    Running statistics, when given, are updated exactly as by ``F.batch_norm``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
        jacobian_only: JacobianOnlyState | None,
    ) -> Any:
        y, mean, invstd = aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.jacobian_only = jacobian_only
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, mean, invstd = _constants(ctx, ctx.saved_tensors)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, bool(need_w and weight is not None), bool(need_b and ctx.has_bias)]
        gx, gw, gb = _BatchNormTrainBackward.apply(gy, x, weight, mean, invstd, ctx.eps, mask)
        return gx, gw, gb, None, None, None, None, None


# ------------------------------------------------------------------- ReLU
class _ReLUBackward(torch.autograd.Function):
    """:math:`\\delta \\mapsto 1[y > 0]\\, \\delta`; linear in :math:`\\delta`, mask constant."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, y: torch.Tensor) -> Any:
        ctx.save_for_backward(y)
        ctx.set_materialize_grads(False)
        return aten.threshold_backward(gy, y, 0)

    @staticmethod
    def backward(ctx: Any, u: torch.Tensor | None) -> tuple[Any, None]:
        (y,) = ctx.saved_tensors
        return (None if u is None else aten.threshold_backward(u, y, 0)), None


class _ReLU(torch.autograd.Function):
    """:math:`\\max(x, 0)` whose backward is :class:`_ReLUBackward`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> Any:
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> Any:
        (y,) = ctx.saved_tensors
        return _ReLUBackward.apply(gy, y)


# ------------------------------------------------------------ max pooling
class _MaxPool2dBackward(torch.autograd.Function):
    """Scatter :math:`\\delta` to the argmax positions; its adjoint gathers."""

    @staticmethod
    def forward(
        ctx: Any, gy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, cfg: _PoolConfig
    ) -> Any:
        ctx.save_for_backward(indices)
        ctx.set_materialize_grads(False)
        return aten.max_pool2d_with_indices_backward(gy, x, *cfg, indices)

    @staticmethod
    def backward(ctx: Any, u: torch.Tensor | None) -> tuple[Any, ...]:
        (indices,) = ctx.saved_tensors
        if u is None:
            return None, None, None, None
        gathered = u.flatten(-2).gather(-1, indices.flatten(-2)).view_as(indices)
        return gathered, None, None, None


class _MaxPool2d(torch.autograd.Function):
    """2-D max pooling whose backward is :class:`_MaxPool2dBackward`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cfg: _PoolConfig) -> Any:
        y, indices = aten.max_pool2d_with_indices(x, *cfg)
        ctx.save_for_backward(x, indices)
        ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, None]:
        x, indices = ctx.saved_tensors
        return _MaxPool2dBackward.apply(gy, x, indices, ctx.cfg), None


# ------------------------------------------------------------ the dispatch
def _expand(value: Any, dims: int) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * dims
    if isinstance(value, tuple | list) and len(value) == dims:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
    return None


def _plain(*tensors: Any) -> bool:
    """Only plain tensors (no subclasses, no functorch wrappers) take the lean path."""
    return all(
        t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided)
        for t in tensors
    )


#: ReLU and max pooling take the lean path from this many elements on: below it the
#: Python overhead of the two ``autograd.Function`` nodes (~40 us per layer and
#: product) outweighs the zeros they save (measured: a ReLU MLP's Hessian product
#: 1.13x slower at 8,192 elements per activation, 1.01x at 65,536, 0.90x at 262,144).
LEAN_MIN_ELEMENTS = 1 << 16

_CONV_DIMS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)
_MAX_POOL_SIGNATURE = inspect.signature(F.max_pool2d_with_indices)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.Tensor.relu)


def _lean_conv(
    dims: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    jacobian_only: JacobianOnlyState | None,
) -> Any:
    if len(args) > len(_CONV_ARGS) or set(kwargs) - set(_CONV_ARGS):
        return NotImplemented
    call = dict(_CONV_DEFAULTS)
    call.update(zip(_CONV_ARGS, args))
    call.update(kwargs)
    x, w, b = call.get("input"), call.get("weight"), call["bias"]
    stride, padding = _expand(call["stride"], dims), _expand(call["padding"], dims)
    dilation, groups = _expand(call["dilation"], dims), call["groups"]
    if (
        stride is None
        or padding is None
        or dilation is None
        or not isinstance(groups, int)
        or not isinstance(x, torch.Tensor)
        or not isinstance(w, torch.Tensor)
        or not _plain(x, w, b)
        or x.ndim != dims + 2
        or w.ndim != dims + 2
    ):
        return NotImplemented
    return _Convolution.apply(x, w, b, (stride, padding, dilation, groups), jacobian_only)


def _lean_batch_norm(
    args: tuple[Any, ...], kwargs: dict[str, Any], jacobian_only: JacobianOnlyState | None
) -> Any:
    try:
        call = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return NotImplemented
    call.apply_defaults()
    a = call.arguments
    x, mean, var = a["input"], a["running_mean"], a["running_var"]
    weight, bias, eps = a["weight"], a["bias"], float(a["eps"])
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not _plain(x, mean, var, weight, bias):
        return NotImplemented
    if any(t is not None and t.requires_grad for t in (mean, var)):
        return NotImplemented
    if a["training"]:
        if x.numel() <= x.shape[1]:  # one value per channel: let F.batch_norm raise
            return NotImplemented
        if not isinstance(a["momentum"], float | int):  # let F.batch_norm judge it
            return NotImplemented
        momentum = float(a["momentum"])
        return _BatchNormTrain.apply(x, weight, bias, mean, var, momentum, eps, jacobian_only)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return NotImplemented
    return _BatchNormEval.apply(x, weight, bias, mean, var, eps, jacobian_only)


def _lean_relu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) != 1 or kwargs.get("inplace", False) or set(kwargs) - {"inplace"}:
        return NotImplemented
    (x,) = args
    if not isinstance(x, torch.Tensor) or not _plain(x) or x.numel() < LEAN_MIN_ELEMENTS:
        return NotImplemented
    return _ReLU.apply(x)


def _lean_max_pool2d(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        call = _MAX_POOL_SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return NotImplemented
    call.apply_defaults()
    a = call.arguments
    x = a["input"]
    kernel = _expand(a["kernel_size"], 2)
    stride = kernel if a["stride"] in (None, [], ()) else _expand(a["stride"], 2)
    padding, dilation = _expand(a["padding"], 2), _expand(a["dilation"], 2)
    if (
        a["return_indices"]
        or kernel is None
        or stride is None
        or padding is None
        or dilation is None
        or not isinstance(x, torch.Tensor)
        or not _plain(x)
        or x.ndim not in (3, 4)
        or x.numel() < LEAN_MIN_ELEMENTS
    ):
        return NotImplemented
    return _MaxPool2d.apply(x, (kernel, stride, padding, dilation, bool(a["ceil_mode"])))


#: The calls by which a forward pass differentiates itself (counted by the mode).
_GRADIENT_CALLS = frozenset({torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward})


class LeanDoubleBackwardMode(TorchFunctionMode):
    """Route convolutions, BatchNorm, ReLU and 2-D max pooling to the lean functions.

    LayerNorm, GELU, softmax and scaled dot-product attention go to
    :mod:`curvops.lean_transformer_ops`.

    Prefer the context manager :func:`lean_double_backward`.

    Parameters
    ----------
    jacobian_only:
        See :func:`lean_double_backward`.

    Attributes
    ----------
    gradient_calls:
        How many ``torch.autograd.grad`` / ``backward`` calls ran inside the mode so far:
        read after a forward pass, nonzero when that forward pass took a gradient of
        itself (a physics-informed network, a gradient penalty, a force model).
    """

    def __init__(self, jacobian_only: bool = False) -> None:
        super().__init__()
        self.jacobian_only = bool(jacobian_only)
        self.gradient_calls = 0
        self._state = JacobianOnlyState() if jacobian_only else None

    @contextmanager
    def jacobian_backward(self) -> Iterator[None]:
        """Run the :math:`J^\\top u` backward pass of a ``jacobian_only`` graph in here.

        Inside, the kernels recorded by this mode take their saved tensors as
        constants (see :func:`lean_double_backward`); a no-op without ``jacobian_only``.
        """
        state = self._state
        if state is None:
            yield
            return
        previous, state.constants = state.constants, True
        try:
            yield
        finally:
            state.constants = previous

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result: Any = NotImplemented
        if func in _CONV_DIMS:
            result = _lean_conv(_CONV_DIMS[func], args, kwargs, self._state)
        elif func is F.batch_norm:
            result = _lean_batch_norm(args, kwargs, self._state)
        elif func in _RELU_FUNCTIONS:
            result = _lean_relu(args, kwargs)
        elif func is F.max_pool2d:
            result = _lean_max_pool2d(args, kwargs)
        elif func in TRANSFORMER_FUNCTIONS:
            result = TRANSFORMER_FUNCTIONS[func](args, kwargs, self._state)
        elif func in _GRADIENT_CALLS:
            self.gradient_calls += 1
        if result is NotImplemented:
            return func(*args, **kwargs)
        return result


@contextmanager
def lean_double_backward(
    enabled: bool = True, *, jacobian_only: bool = False
) -> Iterator[LeanDoubleBackwardMode | None]:
    """Record graphs with the lean double-backward functions of this module.

    Wrap the forward pass *and* the ``create_graph=True`` gradient; the second
    backward can run anywhere afterwards.  ``enabled=False`` is a no-op (native
    formulas).  A forward pass may take gradients of itself with ``create_graph=True``
    (physics-informed networks, gradient penalties): the lean kernels' derivatives
    are then differentiated in turn, exactly.

    ``jacobian_only=True`` records the first backward of the lean layers, in the
    backward pass run inside the mode's :meth:`~LeanDoubleBackwardMode.jacobian_backward`,
    as a linear map of the output gradient alone: their saved activations and weights
    enter that recorded backward as constants.  Then for outputs :math:`f` and
    :math:`g(u) = J^\\top u` (``torch.autograd.grad(f, w, u, create_graph=True)`` inside
    ``jacobian_backward()``), differentiating :math:`g` with respect to :math:`u` gives
    :math:`J v` at the cost of one tangent forward pass (two convolutions per
    convolution), without the second-order terms a Hessian needs -- the GGN's
    Jacobian products (:func:`curvops.products.jacobian_graph`).  Second derivatives
    with respect to the parameters through such a graph miss those terms: never use it
    for Hessians.  Gradients taken anywhere else, in particular by the forward pass
    itself, keep the saved tensors differentiable: with them constant, the outputs of
    a forward pass that differentiates itself would lose their dependence on the
    weights there (a GGN 2-30 % off).

    Parameters
    ----------
    enabled : bool
        ``False`` makes the context a no-op (PyTorch's formulas).
    jacobian_only : bool
        Record the first backward run inside ``jacobian_backward()`` as a linear map of
        the output gradient only (for Jacobian products).

    Yields
    ------
    LeanDoubleBackwardMode or None
        The active mode (``None`` when not ``enabled``).

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> x = torch.randn(5, 3)
    >>> with lean_double_backward():
    ...     loss = net(x).square().mean()
    ...     grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
    >>> len(grads)
    4
    """
    if not enabled:
        yield None
        return
    with LeanDoubleBackwardMode(jacobian_only=jacobian_only) as mode:
        yield mode
