"""Lean double backward for the layers that dominate transformer Hessian products.

The sibling of :mod:`curvops.lean_ops` (convolutions, BatchNorm, ReLU, pooling) for
transformers: LayerNorm, GELU (both approximations), softmax and the attention of
``F.scaled_dot_product_attention``.  PyTorch's second derivatives of these are
composites of many elementwise passes: on ``gpt-tiny`` (batch 16 x 64 tokens, one
CPU thread) ``GeluBackwardBackward0`` alone took 31 % of a Hessian product (65 ms for
its two layers, against 75 ms for a whole gradient), ``NativeLayerNormBackwardBackward0``
8 % and ``SoftmaxBackwardDataBackward0`` (the attention probabilities) 6 %.  While
a Hessian's gradient graph is recorded (:func:`curvops.lean_ops.lean_double_backward`,
which dispatches here) these calls become :class:`torch.autograd.Function` pairs
``Op``/``OpBackward`` whose second derivatives are a few fused passes.  With
:math:`\\delta` the output gradient and :math:`u` the cotangents of the first
backward's outputs:

**GELU** :math:`y = \\mathrm{gelu}(x)`.  First backward
:math:`g_x = \\mathrm{gelu}'(x)\\,\\delta`; second
:math:`\\bar\\delta = \\mathrm{gelu}'(x)\\,u`, :math:`\\bar x = \\mathrm{gelu}''(x)\\,\\delta\\,u`,
with, for the exact form :math:`x\\Phi(x)`, :math:`\\mathrm{gelu}'' = \\varphi(x)(2 - x^2)`,
and for the tanh form :math:`\\tfrac12 x(1 + \\tanh s)`, :math:`s = k(x + c x^3)`,
:math:`k = \\sqrt{2/\\pi}`, :math:`c = 0.044715`, :math:`t = \\tanh s`,
:math:`s' = k(1 + 3 c x^2)`:

.. math::
    \\mathrm{gelu}''(x) = (1 - t^2)\\left[s' + 3 k c x^2 - x\\, t\\, s'^2\\right].

**LayerNorm** over the last :math:`D` values of each row, :math:`\\hat x = (x - \\mu) r`,
:math:`r = (\\sigma^2 + \\epsilon)^{-1/2}`, :math:`y = \\gamma \\odot \\hat x + \\beta`
(:math:`\\gamma, \\beta` per feature).  With :math:`P = r(I - \\tfrac1D 11^\\top -
\\tfrac1D \\hat x \\hat x^\\top)` (symmetric; the Jacobian of :math:`\\hat x`) and
:math:`\\hat g = \\gamma \\odot \\delta`, the first backward is :math:`g_x = P \\hat g`,
:math:`g_\\gamma = \\sum_{\\text{rows}} \\delta \\odot \\hat x`, :math:`g_\\beta =
\\sum_{\\text{rows}} \\delta`.  With the row means :math:`\\bar u = \\overline{u_x}`,
:math:`c = \\overline{u_x \\hat x}`, :math:`\\bar g = \\overline{\\hat g}`,
:math:`b = \\overline{\\hat g \\hat x}`, :math:`e = \\overline{u_x \\hat g}`:

.. math::
    \\bar\\delta &= \\gamma \\odot P u_x + u_\\gamma \\odot \\hat x + u_\\beta, \\qquad
    \\bar\\gamma = \\sum_{\\text{rows}} \\delta \\odot P u_x, \\\\
    \\bar x &= P(u_\\gamma \\odot \\delta)
      - r^2\\left[b (u_x - \\bar u) + c (\\hat g - \\bar g)
      + (e - \\bar u \\bar g - 3 c b)\\, \\hat x\\right]

(for a scalar :math:`\\gamma` these are the train-mode BatchNorm formulas of
:mod:`curvops.lean_ops`).  :math:`P u_x` and :math:`P(u_\\gamma \\odot \\delta)` are
``native_layer_norm_backward`` kernels (without weight, and with weight
:math:`u_\\gamma`), :math:`u_\\gamma \\odot \\hat x + u_\\beta` a ``native_layer_norm``
kernel with weight :math:`u_\\gamma` and bias :math:`u_\\beta`.

**Softmax** :math:`y = \\mathrm{softmax}(x)` along one dimension.  First backward
:math:`g_x = y \\odot (\\delta - \\langle \\delta, y \\rangle)`; its Jacobian in
:math:`\\delta` is symmetric, so :math:`\\bar\\delta = y \\odot (u - \\langle u, y\\rangle)`
(the same kernel), and with respect to the saved output

.. math::
    \\bar y = u \\odot (\\delta - \\langle \\delta, y \\rangle) - \\delta\\, \\langle u, y \\rangle,

which autograd carries back to :math:`x` through the softmax's own backward.

**Attention** ``F.scaled_dot_product_attention(q, k, v, attn_mask, 0, is_causal, scale)``
runs as its MATH-backend composite :math:`\\mathrm{softmax}(s Q K^\\top + M) V` with the
lean softmax (:math:`s` the scale, :math:`M` the causal or given mask), so the
matrix products keep PyTorch's (already minimal) formulas.  A mask that hides every
key of a query (the MATH backend's "safe softmax" returns zeros there), dropout,
grouped-query attention and other unusual calls run natively.

Under ``create_graph`` (third derivatives: a Hessian or GGN of a model whose forward
pass takes a gradient of itself) the second-derivative formulas are evaluated with
differentiable operations instead: PyTorch's own for GELU and softmax, and for
LayerNorm the first backward written in primitive operations
(:func:`_layer_norm_backward_composite`), because PyTorch's derivative of
``native_layer_norm_backward`` is wrong (``gradgradcheck`` of LayerNorm's gradient
fails in torch 2.13).  Every call these functions do not cover (tensor subclasses,
``dtype=`` of softmax, ...) runs natively, and the results are the same derivatives up
to floating-point rounding -- to third order more exactly than PyTorch's for
LayerNorm (tests against dense float64 Hessians, finite differences of exact
gradients and ``torch.autograd.gradgradcheck``).

>>> import torch
>>> from curvops.lean_ops import lean_double_backward
>>> x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
>>> with lean_double_backward():
...     y = torch.nn.functional.gelu(x, approximate="tanh")
...     (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
>>> type(g.grad_fn).__name__
'_GeluBackwardBackward'
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["TRANSFORMER_FUNCTIONS", "JacobianOnlyState"]

aten = torch.ops.aten

_TANH_K = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class JacobianOnlyState:
    """Whether the backward pass running now takes saved tensors as constants.

    One per :class:`curvops.lean_ops.LeanDoubleBackwardMode` with ``jacobian_only``,
    shared by the contexts of every kernel recorded under it.  ``constants`` is true
    only inside :meth:`~curvops.lean_ops.LeanDoubleBackwardMode.jacobian_backward`
    (the :math:`J^\\top u` pass): a gradient the forward pass takes of itself
    (physics-informed networks, gradient penalties, force models) keeps the saved
    activations and weights differentiable, so the outputs' derivatives are exact.
    """

    __slots__ = ("constants",)

    def __init__(self) -> None:
        self.constants = False


def _constants(ctx: Any, saved: tuple[Any, ...]) -> tuple[Any, ...]:
    """The saved tensors, detached in the :math:`J^\\top u` pass of a ``jacobian_only`` graph.

    ``ctx.jacobian_only`` is the recording mode's :class:`JacobianOnlyState` (``None``
    outside ``jacobian_only`` recording).
    """
    state = ctx.jacobian_only
    if state is None or not state.constants:
        return saved
    return tuple(None if t is None else t.detach() for t in saved)


def _plain(*tensors: Any) -> bool:
    """Only plain strided tensors (no subclasses, no functorch wrappers) go lean."""
    return all(
        t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided)
        for t in tensors
    )


def _differentiable_vjp(
    fn: Callable[..., Sequence[torch.Tensor | None]],
    inputs: Sequence[torch.Tensor | None],
    needs: Sequence[bool],
    cotangents: Sequence[torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """The vector-Jacobian product of ``fn``, differentiably (autograd of ``fn``'s operations).

    Used under ``create_graph`` (grad mode on in a backward), where the lean formulas
    would have to be written with differentiable operations: ``fn`` is re-run on the
    saved inputs and differentiated with ``create_graph=True``, so third derivatives
    are those of ``fn``'s operations -- PyTorch's backward kernels for GELU and softmax,
    whose derivatives pass ``gradgradcheck``, and primitive operations for LayerNorm
    (:func:`_layer_norm_backward_composite`), whose kernel's do not.
    """
    with torch.enable_grad():
        # fresh aliases: derivatives with respect to them are partial ones, even where one
        # input depends on another (delta on x), and their graphs lead back to the inputs
        args = [
            None
            if t is None
            else (t.view_as(t) if t.requires_grad else t.detach().requires_grad_(need))
            for t, need in zip(inputs, needs)
        ]
        outs = [o for o in fn(*args)]
        pairs = [
            (o, u)
            for o, u in zip(outs, cotangents)
            if o is not None and u is not None and o.requires_grad
        ]
        wrt = [(i, a) for i, a in enumerate(args) if needs[i] and a is not None and a.requires_grad]
        result: list[torch.Tensor | None] = [None] * len(inputs)
        if not pairs or not wrt:
            return result
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            [a for _, a in wrt],
            [u for _, u in pairs],
            create_graph=True,
            allow_unused=True,
        )
    for (i, _), g in zip(wrt, grads):
        result[i] = g
    return result


# ------------------------------------------------------------------- GELU
def _gelu_second(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """:math:`\\mathrm{gelu}''(x)` (formulas in the module docstring), a fresh tensor."""
    x2 = x.square()
    if approximate == "tanh":
        t = torch.tanh(x2.mul(_TANH_C).add_(1.0).mul_(x).mul_(_TANH_K))
        sp = x2.mul(3.0 * _TANH_C * _TANH_K).add_(_TANH_K)  # s'
        inner = x2.mul_(3.0 * _TANH_K * _TANH_C).add_(sp)  # s' + 3kc x^2
        inner.sub_(sp.square_().mul_(t).mul_(x))  # - x t s'^2
        return inner.mul_(t.square_().neg_().add_(1.0))
    phi = x2.mul(-0.5).exp_().mul_(_INV_SQRT_2PI)
    return phi.mul_(x2.neg_().add_(2.0))


class _GeluBackward(torch.autograd.Function):
    """:math:`(\\delta, x) \\mapsto \\mathrm{gelu}'(x)\\,\\delta`, differentiable (see module).

    ``g1`` is :math:`\\mathrm{gelu}'(x)` (a constant computed once by :class:`_Gelu`);
    :math:`\\delta\\,\\mathrm{gelu}''(x)` is computed at the first second-order product
    and kept with the graph, so each later product costs two multiplications.
    """

    @staticmethod
    def forward(
        ctx: Any, gy: torch.Tensor, x: torch.Tensor, g1: torch.Tensor, approximate: str
    ) -> Any:
        ctx.save_for_backward(gy, x)
        ctx.g1, ctx.approximate = g1, approximate
        ctx.gy_g2 = None
        ctx.set_materialize_grads(False)
        return gy * g1

    @staticmethod
    def backward(ctx: Any, u: torch.Tensor | None) -> tuple[Any, ...]:
        gy, x = ctx.saved_tensors
        need_gy, need_x = ctx.needs_input_grad[:2]
        if u is None:
            return None, None, None, None
        if torch.is_grad_enabled():
            d_gy, d_x = _differentiable_vjp(
                lambda g, z: [aten.gelu_backward(g, z, approximate=ctx.approximate)],
                [gy, x],
                [need_gy, need_x],
                [u],
            )
            return d_gy, d_x, None, None
        d_gy = u * ctx.g1 if need_gy else None
        d_x = None
        if need_x:
            if ctx.gy_g2 is None:
                ctx.gy_g2 = _gelu_second(x, ctx.approximate).mul_(gy)
            d_x = u * ctx.gy_g2
        return d_gy, d_x, None, None


class _Gelu(torch.autograd.Function):
    """GELU whose backward is :class:`_GeluBackward`."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, approximate: str, jacobian_only: JacobianOnlyState | None
    ) -> Any:
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        ctx.jacobian_only = jacobian_only
        ctx.g1 = None
        return aten.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, None, None]:
        (x,) = _constants(ctx, ctx.saved_tensors)
        if torch.is_grad_enabled():  # recording: differentiable in delta and x
            g1 = aten.gelu_backward(torch.ones_like(x), x.detach(), approximate=ctx.approximate)
            ctx.g1 = g1
            return _GeluBackward.apply(gy, x, g1, ctx.approximate), None, None
        if ctx.g1 is None:  # gelu'(x), kept for the products through this graph
            ctx.g1 = aten.gelu_backward(torch.ones_like(x), x, approximate=ctx.approximate)
        return gy * ctx.g1, None, None


# -------------------------------------------------------------- LayerNorm
def _layer_norm_constants(ctx: Any, saved: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """:math:`(\\hat x, \\hat g, \\bar{\\hat g}, b, r^2, r^2 b)`: what depends on delta and x only.

    Computed at the first product through the graph and kept on ``ctx``.
    """
    if ctx.constants is None:
        gy, x, weight, mean, rstd = saved
        dims = tuple(range(x.ndim - len(ctx.shape), x.ndim))
        xhat = aten.native_layer_norm(x, ctx.shape, None, None, ctx.eps)[0]
        ghat = gy if weight is None else gy * weight
        r2 = rstd.square()
        b = _row_mean(ghat, xhat, len(ctx.shape), mean.shape)
        ctx.constants = (xhat, ghat, ghat.mean(dims, keepdim=True), b, r2, r2 * b)
    constants: tuple[torch.Tensor, ...] = ctx.constants
    return constants


def _row_mean(s: torch.Tensor, t: torch.Tensor, normalized: int, shape: torch.Size) -> torch.Tensor:
    """Mean of ``s * t`` over the last ``normalized`` dimensions, shaped ``shape``."""
    flat = s.ndim - normalized
    size = math.prod(s.shape[flat:])
    return (torch.linalg.vecdot(s.flatten(flat), t.flatten(flat)) / size).view(shape)


def _layer_norm_double_backward(
    ctx: Any,
    saved: tuple[torch.Tensor, ...],
    cotangents: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:math:`(\\bar\\delta, \\bar x, \\bar\\gamma)`, formulas in the module docstring."""
    gy, x, weight, mean, rstd = saved
    ux, uw, ub = cotangents
    shape, eps = ctx.shape, ctx.eps
    need_gy, need_x, need_w = ctx.needs_input_grad[:3]
    rows = tuple(range(x.ndim - len(shape)))
    # x_hat is kept with the graph when the x-derivative needs it (Hessian products)
    constants = _layer_norm_constants(ctx, saved) if need_x and ux is not None else None
    pu = None
    if ux is not None and (need_gy or (need_w and weight is not None)):
        pu = aten.native_layer_norm_backward(
            ux, x, shape, mean, rstd, None, None, [True, False, False]
        )[0]
    d_gy = d_x = d_w = None
    if need_w and weight is not None and pu is not None:  # before pu is reused in place
        d_w = (gy * pu).sum(rows) if rows else gy * pu
    if need_gy:
        if uw is not None:  # u_gamma x_hat + u_beta: a LayerNorm of x with weight u_gamma
            if constants is None:
                d_gy = aten.native_layer_norm(x, shape, uw, ub, eps)[0]
            else:
                xhat = constants[0]
                d_gy = xhat * uw if ub is None else torch.addcmul(ub, xhat, uw)
        elif ub is not None:
            d_gy = ub.expand_as(x).clone()
        if pu is not None:
            if d_gy is None:
                d_gy = pu if weight is None else pu.mul_(weight)
            elif weight is None:
                d_gy.add_(pu)
            else:
                d_gy.addcmul_(pu, weight)
    if need_x and (ux is not None or uw is not None):
        if uw is not None:  # P(u_gamma delta): the input-gradient kernel with weight u_gamma
            d_x = aten.native_layer_norm_backward(
                gy, x, shape, mean, rstd, uw, None, [True, False, False]
            )[0]
        if ux is not None and constants is not None:
            xhat, ghat, g_mean, b, r2, r2b = constants
            dims = tuple(range(x.ndim - len(shape), x.ndim))
            u_mean = ux.mean(dims, keepdim=True)
            c = _row_mean(ux, xhat, len(shape), mean.shape)
            e = _row_mean(ux, ghat, len(shape), mean.shape)
            term = ux * r2b
            term.addcmul_(ghat, c * r2)
            term.addcmul_(xhat, (e - u_mean * g_mean - 3.0 * c * b).mul_(r2))
            term.sub_((b * u_mean + c * g_mean).mul_(r2))
            d_x = term.neg_() if d_x is None else d_x.sub_(term)
    return d_gy, d_x, d_w


def _layer_norm_backward_composite(
    gy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    shape: list[int],
    eps: float,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:math:`(g_x, g_\\gamma, g_\\beta)` of LayerNorm in primitive differentiable operations.

    :math:`\\hat x` and :math:`r` are recomputed from ``x``, so every derivative of the
    result is autograd's of elementwise operations and means.  PyTorch's derivative of
    ``native_layer_norm_backward`` is wrong in torch 2.13 (``gradgradcheck`` of
    LayerNorm's gradient fails: the Hessian of a model whose forward pass takes a
    gradient through ``nn.LayerNorm`` came out 33 % off the finite differences of its
    gradient), so the graph recorded under ``create_graph`` uses this instead.
    """
    dims = tuple(range(x.ndim - len(shape), x.ndim))
    rows = tuple(range(x.ndim - len(shape)))
    centred = x - x.mean(dims, keepdim=True)
    r = torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    xhat = centred * r
    ghat = gy if weight is None else gy * weight
    b = (ghat * xhat).mean(dims, keepdim=True)
    gx = r * (ghat - ghat.mean(dims, keepdim=True) - xhat * b)
    gw = None
    if weight is not None:
        gw = (gy * xhat).sum(rows) if rows else gy * xhat
    gb = None
    if has_bias:
        gb = gy.sum(rows) if rows else gy
    return gx, gw, gb


class _LayerNormBackward(torch.autograd.Function):
    """:math:`(\\delta, x, \\gamma) \\mapsto (g_x, g_\\gamma, g_\\beta)` (see module)."""

    @staticmethod
    def forward(
        ctx: Any,
        gy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        bias: torch.Tensor | None,
        shape: list[int],
        eps: float,
        mask: list[bool],
    ) -> tuple[Any, Any, Any]:
        ctx.save_for_backward(gy, x, weight, mean, rstd, bias)
        ctx.shape, ctx.eps = shape, eps
        ctx.constants = None  # x_hat, g_hat and row statistics, at the first product
        ctx.set_materialize_grads(False)
        gx, gw, gb = aten.native_layer_norm_backward(gy, x, shape, mean, rstd, weight, bias, mask)
        return gx, gw, gb

    @staticmethod
    def backward(
        ctx: Any, ux: torch.Tensor | None, uw: torch.Tensor | None, ub: torch.Tensor | None
    ) -> tuple[Any, ...]:
        gy, x, weight, mean, rstd, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: third derivatives from primitives

            def first(
                g: torch.Tensor, z: torch.Tensor, w: torch.Tensor | None
            ) -> tuple[Any, Any, Any]:
                return _layer_norm_backward_composite(g, z, w, ctx.shape, ctx.eps, bias is not None)

            d_gy, d_x, d_w = _differentiable_vjp(
                first, [gy, x, weight], ctx.needs_input_grad[:3], [ux, uw, ub]
            )
        else:
            d_gy, d_x, d_w = _layer_norm_double_backward(
                ctx, (gy, x, weight, mean, rstd), (ux, uw, ub)
            )
        return d_gy, d_x, d_w, None, None, None, None, None, None


class _LayerNorm(torch.autograd.Function):
    """LayerNorm whose backward is :class:`_LayerNormBackward`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        shape: list[int],
        eps: float,
        jacobian_only: JacobianOnlyState | None,
    ) -> Any:
        y, mean, rstd = aten.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.shape, ctx.eps = shape, eps
        ctx.bias = None if bias is None else bias.detach()  # its shape for the bias gradient
        ctx.jacobian_only = jacobian_only
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, mean, rstd = _constants(ctx, ctx.saved_tensors)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, bool(need_w and weight is not None), bool(need_b and ctx.bias is not None)]
        gx, gw, gb = _LayerNormBackward.apply(
            gy, x, weight, mean.detach(), rstd.detach(), ctx.bias, ctx.shape, ctx.eps, mask
        )
        return gx, gw, gb, None, None, None


# ---------------------------------------------------------------- softmax
class _SoftmaxBackward(torch.autograd.Function):
    """:math:`(\\delta, y) \\mapsto y \\odot (\\delta - \\langle\\delta, y\\rangle)`, see module."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, y: torch.Tensor, dim: int) -> Any:
        ctx.save_for_backward(gy, y)
        ctx.dim = dim
        ctx.centred = None
        ctx.set_materialize_grads(False)
        return aten._softmax_backward_data(gy, y, dim, y.dtype)

    @staticmethod
    def backward(ctx: Any, u: torch.Tensor | None) -> tuple[Any, ...]:
        gy, y = ctx.saved_tensors
        dim = ctx.dim
        need_gy, need_y = ctx.needs_input_grad[:2]
        if u is None:
            return None, None, None
        if torch.is_grad_enabled():
            d_gy, d_y = _differentiable_vjp(
                lambda g, z: [aten._softmax_backward_data(g, z, dim, z.dtype)],
                [gy, y],
                [need_gy, need_y],
                [u],
            )
            return d_gy, d_y, None
        d_gy = aten._softmax_backward_data(u, y, dim, y.dtype) if need_gy else None
        d_y = None
        if need_y:
            if ctx.centred is None:  # delta - <delta, y>, once per graph
                ctx.centred = gy - (gy * y).sum(dim, keepdim=True)
            s_u = (u * y).sum(dim, keepdim=True)
            d_y = ctx.centred * u
            d_y.sub_(gy * s_u)
        return d_gy, d_y, None


class _Softmax(torch.autograd.Function):
    """Softmax whose backward is :class:`_SoftmaxBackward`."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, dim: int, jacobian_only: JacobianOnlyState | None
    ) -> Any:
        y = aten._softmax(x, dim, False)
        ctx.save_for_backward(y)
        ctx.dim = dim
        ctx.jacobian_only = jacobian_only
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, None, None]:
        (y,) = _constants(ctx, ctx.saved_tensors)
        return _SoftmaxBackward.apply(gy, y, ctx.dim), None, None


# ------------------------------------------------------------ the dispatch
_LAYER_NORM_SIGNATURE = inspect.signature(F.layer_norm)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _lean_layer_norm(
    args: tuple[Any, ...], kwargs: dict[str, Any], jacobian_only: JacobianOnlyState | None
) -> Any:
    try:
        call = _LAYER_NORM_SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return NotImplemented
    call.apply_defaults()
    a = call.arguments
    x, weight, bias, shape = a["input"], a["weight"], a["bias"], a["normalized_shape"]
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = [shape]
    if (
        not isinstance(x, torch.Tensor)
        or not isinstance(shape, tuple | list | torch.Size)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        or not 0 < len(shape) <= x.ndim
        or list(x.shape[x.ndim - len(shape) :]) != list(shape)
        or not _plain(x, weight, bias)
        or (weight is not None and list(weight.shape) != list(shape))
        or (bias is not None and list(bias.shape) != list(shape))
        or not isinstance(a["eps"], float | int)
        # mixed dtypes (a float32 LayerNorm on bfloat16 activations under torch.autocast,
        # which leaves layer_norm's dtypes alone on the CPU): PyTorch's kernels mix them,
        # the lean double backward's would not (it raised "expected scalar type BFloat16")
        or any(t is not None and t.dtype != x.dtype for t in (weight, bias))
    ):
        return NotImplemented
    return _LayerNorm.apply(x, weight, bias, list(shape), float(a["eps"]), jacobian_only)


def _lean_gelu(
    args: tuple[Any, ...], kwargs: dict[str, Any], jacobian_only: JacobianOnlyState | None
) -> Any:
    if len(args) != 1 or set(kwargs) - {"approximate"}:
        return NotImplemented
    (x,) = args
    approximate = kwargs.get("approximate", "none")
    if not isinstance(x, torch.Tensor) or not _plain(x) or approximate not in ("none", "tanh"):
        return NotImplemented
    return _Gelu.apply(x, approximate, jacobian_only)


def _softmax_dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """``(input, dim)`` of a softmax call without ``dtype`` (None: not covered).

    Covers ``F.softmax(x, dim)`` (which passes ``_stacklevel`` and ``dtype`` by
    keyword), ``torch.softmax(x, dim)`` and ``x.softmax(dim)``.
    """
    kw = dict(kwargs)
    kw.pop("_stacklevel", None)
    if kw.pop("dtype", None) is not None or len(args) > 2 or set(kw) - {"input", "dim"}:
        return None
    call = dict(zip(("input", "dim"), args))
    if set(call) & set(kw):
        return None
    call.update(kw)
    return call.get("input"), call.get("dim")


def _lean_softmax(
    args: tuple[Any, ...], kwargs: dict[str, Any], jacobian_only: JacobianOnlyState | None
) -> Any:
    found = _softmax_dim(args, kwargs)
    if found is None:
        return NotImplemented
    x, dim = found
    if (
        not isinstance(x, torch.Tensor)
        or not isinstance(dim, int)
        or isinstance(dim, bool)
        or not _plain(x)
        or not x.dtype.is_floating_point
        or x.ndim == 0
    ):
        return NotImplemented
    return _Softmax.apply(x, dim % x.ndim, jacobian_only)


def _lean_attention(
    args: tuple[Any, ...], kwargs: dict[str, Any], jacobian_only: JacobianOnlyState | None
) -> Any:
    """``softmax(scale q k^T + mask) v`` with the lean softmax (the MATH backend's algorithm)."""
    if len(args) > len(_SDPA_ARGS) or set(kwargs) - set(_SDPA_ARGS) - {"enable_gqa"}:
        return NotImplemented
    call: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None}
    call.update(zip(_SDPA_ARGS, args))
    call.update(kwargs)
    q: Any = call.get("query")
    k: Any = call.get("key")
    v: Any = call.get("value")
    mask: Any = call["attn_mask"]
    scale = call["scale"]
    if (
        call.get("enable_gqa", False)
        or (mask is not None and not isinstance(mask, torch.Tensor))
        or call["dropout_p"] != 0
        or not all(isinstance(t, torch.Tensor) for t in (q, k, v))
        or not _plain(q, k, v, mask)
        or q.ndim < 2
        or q.shape[:-2] != k.shape[:-2]
        or k.shape[:-1] != v.shape[:-1]
        or (scale is not None and not isinstance(scale, float | int))
        or not q.dtype.is_floating_point
        or (call["is_causal"] and mask is not None)
    ):
        return NotImplemented
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if call["is_causal"]:  # an additive mask: its backward passes the gradient through
        rows, cols = scores.shape[-2:]
        keep = torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(rows, cols, dtype=scores.dtype, device=q.device)
        scores = scores + bias.masked_fill_(~keep, float("-inf"))
    elif mask is not None:
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=scores.dtype, device=q.device)
            scores = scores + bias.masked_fill_(~mask, float("-inf"))
        elif mask.dtype == scores.dtype:
            scores = scores + mask
        else:
            return NotImplemented
    if mask is not None and bool(torch.isneginf(scores).all(-1).any()):
        return NotImplemented  # a query that sees no key: the MATH backend's safe softmax
    probs = _Softmax.apply(scores, scores.ndim - 1, jacobian_only)
    return torch.matmul(probs, v)


#: ``func -> handler(args, kwargs, jacobian_only)`` (``jacobian_only``: the recording
#: mode's :class:`JacobianOnlyState` or ``None``); a handler returns ``NotImplemented``
#: for the calls it does not cover (these then run natively).
TRANSFORMER_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.layer_norm: _lean_layer_norm,
    F.gelu: _lean_gelu,
    F.softmax: _lean_softmax,
    torch.softmax: _lean_softmax,
    torch.Tensor.softmax: _lean_softmax,
    F.scaled_dot_product_attention: _lean_attention,
}
