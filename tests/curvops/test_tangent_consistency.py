"""Forward-mode tangents that are not the transpose of the gradients (the GGN and Fisher
of lists of batches, DataLoaders and ``cache=False`` take ``Jv`` in forward mode and
``J^T u`` in reverse mode).

Before: at exact ties ``torch.fmax`` and a one-sided tensor ``clamp`` bound made those
paths non-symmetric (27 % of the norm on the clamp model below), ``scatter_reduce``
with ``"prod"`` gave a zero tangent (the list GGN 71 % off the cached one), and
``index_reduce`` or a custom ``autograd.Function`` without ``jvp`` raised.  Now the first
two are rewritten with ``where`` (same values, same backward pass), and the rest take
``Jv`` in reverse mode (reverse over reverse, as the cached path): every path gives the
same symmetric matrix as the dense float64 reference.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from curvops import FisherOperator, GGNOperator
from curvops.derivative_repairs import REPLACEMENTS
from curvops.determinism import DropoutOffMode
from curvops.tangent_consistency import (
    ForwardModeUnsuitable,
    forward_mode_pass,
    lacks_forward_derivative,
)
from curvops.testing import dense_ggn

EPS = float(torch.finfo(torch.float64).eps)

pytestmark = pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta:UserWarning")

_VALUES = [-1.0, 0.0, 1.0, 2.0, float("inf"), -float("inf")]


def _grid(arity: int) -> list[torch.Tensor]:
    """Every combination of a few values (ties, zeros, infinities) per argument."""
    rows = torch.tensor(list(itertools.product(_VALUES, repeat=arity)), dtype=torch.float64)
    return [rows[:, i].clone() for i in range(arity)]


def _transpose_gap(f: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> float:
    """``|<u, J v>_forward - <J^T u, v>_reverse|`` under the products' mode."""
    gen = torch.Generator().manual_seed(0)
    args = [x.detach().clone().requires_grad_() for x in inputs]
    with DropoutOffMode():
        out = f(*args)
    u = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    vs = [torch.randn(x.shape, dtype=x.dtype, generator=gen) for x in inputs]
    grads = torch.autograd.grad(out, args, u, allow_unused=True, materialize_grads=True)
    reverse = sum(float((g * v).sum()) for g, v in zip(grads, vs))
    with fwAD.dual_level(), DropoutOffMode():
        tangent = fwAD.unpack_dual(f(*[fwAD.make_dual(x, v) for x, v in zip(inputs, vs)])).tangent
    forward = 0.0 if tangent is None else float((u * tangent).sum())
    return abs(reverse - forward)


def _finite(t: torch.Tensor) -> torch.Tensor:
    return t.nan_to_num(nan=7.0, posinf=8.0, neginf=9.0)


# clamp_min / clamp_max with a tensor agree in both modes already (not rewritten)
_ONE_SIDED: list[tuple[str, Callable[..., torch.Tensor]]] = [
    ("torch.fmax", torch.fmax),
    ("Tensor.fmax", lambda x, t: x.fmax(t)),
    ("torch.clamp min=", lambda x, t: torch.clamp(x, min=t)),
    ("torch.clamp max=", lambda x, t: torch.clamp(x, max=t)),
    ("torch.clamp positional", lambda x, t: torch.clamp(x, t)),
    ("Tensor.clamp", lambda x, t: x.clamp(t)),
    ("torch.clip max=", lambda x, t: torch.clip(x, max=t)),
    ("Tensor.clip min=", lambda x, t: x.clip(min=t)),
    ("torch.clamp_min", torch.clamp_min),
    ("Tensor.clamp_min", lambda x, t: x.clamp_min(t)),
    ("torch.clamp_max", torch.clamp_max),
    ("Tensor.clamp_max", lambda x, t: x.clamp_max(t)),
    ("torch.clamp_", lambda x, t: torch.clamp_(x * 1, min=t)),
    ("Tensor.clamp_", lambda x, t: (x * 1).clamp_(max=t)),
    ("torch.clip_", lambda x, t: torch.clip_(x * 1, t)),
    ("Tensor.clip_", lambda x, t: (x * 1).clip_(max=t)),
    ("torch.clamp_min_", lambda x, t: torch.clamp_min_(x * 1, t)),
    ("Tensor.clamp_min_", lambda x, t: (x * 1).clamp_min_(t)),
    ("torch.clamp_max_", lambda x, t: torch.clamp_max_(x * 1, t)),
    ("Tensor.clamp_max_", lambda x, t: (x * 1).clamp_max_(t)),
]


def _gradients(
    f: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor
) -> list[torch.Tensor]:
    args = [x.clone().requires_grad_(), t.clone().requires_grad_()]
    out = f(*args)
    return list(torch.autograd.grad(out, args, torch.ones_like(out)))


def _own_gap(f: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> float:
    """The transpose gap of PyTorch's own function (outside the products' mode)."""
    gen = torch.Generator().manual_seed(0)
    leaves = [x.clone().requires_grad_(), t.clone().requires_grad_()]
    out = f(*leaves)
    u = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    vs = [torch.randn(a.shape, dtype=a.dtype, generator=gen) for a in (x, t)]
    grads = torch.autograd.grad(out, leaves, u, allow_unused=True, materialize_grads=True)
    reverse = sum(float((g * v).sum()) for g, v in zip(grads, vs))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(f(*[fwAD.make_dual(a, v) for a, v in zip((x, t), vs)]))[1]
    forward = 0.0 if tangent is None else float((u * tangent).sum())
    return abs(reverse - forward)


@pytest.mark.parametrize(("name", "f"), _ONE_SIDED, ids=[n for n, _ in _ONE_SIDED])
def test_rewrites_keep_values_and_gradients_and_agree_in_forward_mode(
    name: str, f: Callable[..., torch.Tensor]
) -> None:
    x, t = _grid(2)
    want = f(x, t)
    with DropoutOffMode():
        got = f(x, t)
        got_grads = _gradients(f, x, t)
    assert torch.equal(_finite(got), _finite(want)) and got.dtype == want.dtype
    want_grads = _gradients(f, x, t)
    finite = x.isfinite() & t.isfinite()
    # forward mode is the transpose of reverse mode (finite points: NaN stops products)
    assert _transpose_gap(f, [x[finite], t[finite]]) <= 50 * EPS
    # PyTorch's gradients away from ties; at a tie both conventions (all to x in torch
    # 2.13, an even split from 2.14, as here) hand on the same total
    apart = x != t
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a[apart], b[apart])
    assert torch.equal(
        (got_grads[0] + got_grads[1])[~apart], (want_grads[0] + want_grads[1])[~apart]
    )
    if _own_gap(f, x[finite], t[finite]) <= 50 * EPS:  # PyTorch's own modes agree: its gradients
        for a, b in zip(got_grads, want_grads):
            assert torch.equal(a, b)


def test_pytorch_own_forward_mode_disagrees_at_ties_before_torch_2_14() -> None:
    """The premise: without the rewrite torch 2.13's two derivatives differ at ties
    (torch 2.14 changed both to an even split, which the rewrite also uses)."""
    x, t = _grid(2)
    finite = x.isfinite() & t.isfinite()
    gaps = [
        _own_gap(f, x[finite], t[finite]) for f in (torch.fmax, lambda a, b: torch.clamp(a, min=b))
    ]
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 14):
        assert max(gaps) <= 50 * EPS
    else:
        assert min(gaps) > 0.1


def test_rewrites_keep_promotion_broadcasting_and_untouched_calls() -> None:
    x32 = torch.tensor([[0.0, 1.0, 2.0]])
    t64 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    scalar_bound = torch.tensor(1.0, dtype=torch.float64)
    ints = torch.tensor([0, 1, 2])
    cases: list[Callable[[], torch.Tensor]] = [
        lambda: torch.clamp(x32, min=t64),  # broadcast, promotion
        lambda: torch.clamp(x32, max=scalar_bound),  # 0-dim bound: no promotion
        lambda: torch.fmax(x32, t64),
        lambda: torch.clamp(ints, min=torch.tensor(1)),
        lambda: torch.clamp(x32, min=0.5),  # scalar bounds: PyTorch's own call
        lambda: torch.clamp(x32, t64, t64 + 1),  # two bounds: PyTorch's own call
    ]
    for case in cases:
        want = case()
        with DropoutOffMode():
            got = case()
        assert torch.equal(got, want) and got.dtype == want.dtype
    out = torch.empty(1, 3)
    with DropoutOffMode():
        torch.clamp(x32, min=torch.ones(1, 3), out=out)
    assert torch.equal(out, torch.clamp(x32, min=torch.ones(1, 3)))
    with pytest.raises(TypeError), DropoutOffMode():
        torch.clamp(x32, 0.0, 1.0, min=0.0)  # PyTorch's own argument error
    assert torch.clamp in REPLACEMENTS and torch.Tensor.clip_ in REPLACEMENTS


class _SquareWithoutJvp(torch.autograd.Function):
    """A custom function without ``jvp`` (Bloom's and YOSO's kernels are of this kind)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _Frozen(torch.autograd.Function):
    """Neither ``jvp`` nor a differentiable backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


@torch.library.custom_op("curvops_tests::square", mutates_args=())
def _square_op(x: torch.Tensor) -> torch.Tensor:
    """A ``torch.library`` operator with a backward only (its tangent is dropped)."""
    return x * x


@_square_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _square_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    return 2 * ctx.saved_tensors[0] * grad


def _square_setup(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


_square_op.register_autograd(_square_backward, setup_context=_square_setup)


class TieModel(nn.Module):
    """A small network whose hidden layer goes through one of the functions above.

    ReLU zeros meet a bound of zero, so the ties are exact, not rare."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.kind = kind
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.8
        self.t = nn.Parameter(torch.tensor([0.0, 0.1, 0.0, 0.2]))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.l1(x)
        h = torch.relu(a)
        idx = torch.tensor([0, 0, 1, 1])
        if self.kind == "fmax":
            h = torch.fmax(h, self.t)
        elif self.kind == "clamp":
            h = torch.clamp(h, min=self.t)
        elif self.kind == "clamp_":
            h = (-h).clamp_(max=-self.t)
        elif self.kind == "scatter_reduce_prod":
            ones = torch.ones(h.shape[0], 2, dtype=h.dtype)
            h = ones.scatter_reduce(1, idx.expand(h.shape[0], 4), h + 1, "prod").repeat(1, 2)
        elif self.kind == "index_reduce":
            zeros = torch.zeros(h.shape[0], 2, dtype=h.dtype)
            h = zeros.index_reduce(1, idx, h + a, "amax", include_self=False).repeat(1, 2)
        elif self.kind == "custom_without_jvp":
            h = _SquareWithoutJvp.apply(h + a)
        elif self.kind == "prelu":  # an exact zero that moves with the parameters
            kink = torch.stack([a - a.detach(), a], 1)
            h = F.prelu(kink, self.t[:2] + 0.3).sum(1)
        elif self.kind == "scatter_reduce_amax":  # the group's maximum ties the zero output
            first = a[:, :1] - a[:, :1].detach()
            src = torch.cat([first, a[:, 1:2] - 10, a[:, 2:]], 1)
            zeros = torch.zeros(h.shape[0], 2, dtype=h.dtype)
            reduced = zeros.scatter_reduce(
                1, idx.expand(h.shape[0], 4), src, "amax", include_self=False
            )
            h = reduced.repeat(1, 2) + h
        elif self.kind == "custom_op":
            h = _square_op(h + a)
        elif self.kind == "cholesky_inverse":
            factor = torch.stack([h[:, :2], h[:, 2:] + 1.5], 1).tril()
            h = torch.cholesky_inverse(
                factor.diagonal_scatter(factor.diagonal(0, 1, 2) + 2, 0, 1, 2)
            )
            h = h.reshape(h.shape[0], 4)
        elif self.kind == "as_strided_scatter":
            h = torch.as_strided_scatter(h, a[:, 1:3] * 2, (h.shape[0], 2), (4, 2))
        elif self.kind == "square":  # the same function without the custom Function
            h = (h + a) * (h + a)
        elif self.kind.startswith("polar"):  # a zero magnitude that moves with the parameters
            r, angle = a[:, :2] - a[:, :2].detach(), a[:, 2:]
            if self.kind == "polar":
                z = torch.polar(r, angle)
            else:  # the reference: the same function written out
                z = torch.complex(r * torch.cos(angle), r * torch.sin(angle))
            h = torch.cat([z.real, z.imag], 1) + h
        elif self.kind.startswith("det"):  # 1 x 1 determinants at zero
            m = (a - a.detach()).reshape(-1, 4, 1, 1)
            h = (torch.linalg.det(m) if self.kind == "det" else m[..., 0, 0]) + h
        return self.l2(h)


KINDS = [
    "fmax",
    "clamp",
    "clamp_",
    "prelu",
    "scatter_reduce_prod",
    "scatter_reduce_amax",
    "index_reduce",
    "custom_without_jvp",
    "custom_op",
    "cholesky_inverse",
    "as_strided_scatter",
    "polar",
    "det",
]

# the reference for kinds whose PyTorch derivatives are wrong in reverse mode
_REFERENCE = {"polar": "polar_reference", "det": "det_reference"}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, dtype=torch.float64, generator=gen)
    return x, torch.tensor([0, 1, 2] * 2 + [0, 1])


def _dense(op: Any) -> np.ndarray:
    return np.asarray(op @ np.eye(op.shape[0]))


@pytest.mark.parametrize("kind", KINDS)
def test_every_ggn_path_gives_the_dense_reference(kind: str) -> None:
    model, loss = TieModel(kind), nn.CrossEntropyLoss()
    x, y = _data()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    # torch.func cannot differentiate a custom Function without setup_context
    reference = TieModel("square" if kind.startswith("custom") else _REFERENCE.get(kind, kind))
    want = dense_ggn(reference, loss, (x, y)).numpy()
    scale = np.abs(want).max()
    assert scale > 0.05
    P = want.shape[0]
    tol = 100 * P * EPS * scale
    paths = [((x, y), True), ((x, y), False), (batches, False), (batches, True), (loader, False)]
    for data, cache in paths:
        op = GGNOperator(model, loss, data, cache=cache)
        got = _dense(op)
        assert np.abs(got - want).max() <= tol, (kind, cache, type(data))
        assert np.abs(got - got.T).max() <= tol
        # a matmat and a matvec agree (the matmat shares one recorded forward pass)
        v = np.random.default_rng(0).standard_normal(P)
        assert np.abs(op @ v - got @ v).max() <= tol * np.abs(v).sum()


@pytest.mark.parametrize("kind", ["scatter_reduce_prod", "custom_without_jvp", "clamp"])
def test_fisher_paths_and_linearized_ggn_agree(kind: str) -> None:
    model, loss = TieModel(kind), nn.CrossEntropyLoss()
    x, y = _data()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    for fisher_kind in ("mc", "empirical"):
        cached = _dense(FisherOperator(model, loss, batches, kind=fisher_kind, seed=3, cache=True))
        forward = _dense(FisherOperator(model, loss, batches, kind=fisher_kind, seed=3))
        scale = np.abs(cached).max()
        assert scale > 0.01
        assert np.abs(forward - cached).max() <= 100 * cached.shape[0] * EPS * scale
    traced = _dense(GGNOperator(model, loss, (x, y), linearize=True))
    want = _dense(GGNOperator(model, loss, (x, y)))
    assert np.abs(traced - want).max() <= 100 * want.shape[0] * EPS * np.abs(want).max()


def test_no_forward_derivative_and_no_double_backward_is_a_clear_error() -> None:
    class Model(TieModel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(_Frozen.apply(self.l1(x)))

    x, y = _data()
    op = GGNOperator(Model("frozen"), nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])])
    with pytest.raises(RuntimeError, match=r"_Frozen.*once_differentiable"):
        op @ np.ones(op.shape[0])


def test_other_errors_are_not_taken_for_missing_tangents() -> None:
    class Broken(TieModel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if fwAD.unpack_dual(self.l1.weight).tangent is not None:
                raise RuntimeError("a bug of the model's own")
            return super().forward(x)

    x, y = _data()
    op = GGNOperator(Broken("clamp"), nn.CrossEntropyLoss(), (x, y), cache=False)
    with pytest.raises(RuntimeError, match="a bug of the model's own"):
        op @ np.ones(op.shape[0])
    assert not lacks_forward_derivative(RuntimeError("a bug of the model's own"))
    assert not lacks_forward_derivative(ValueError("forward AD"))
    assert lacks_forward_derivative(ForwardModeUnsuitable("scatter_reduce"))


def test_scatter_reduce_prod_is_refused_only_in_forward_mode_passes() -> None:
    src = torch.tensor([1.0, 2.0, 3.0])
    idx = torch.tensor([0, 0, 1])
    with DropoutOffMode():
        plain = torch.zeros(2).scatter_reduce(0, idx, src, "prod", include_self=False)
        assert torch.equal(plain, torch.tensor([2.0, 3.0]))
        torch.zeros(2).scatter_reduce(0, idx, src, "sum")
        with forward_mode_pass():
            torch.zeros(2).scatter_reduce(0, idx, src, reduce="amax")
            with pytest.raises(ForwardModeUnsuitable, match="prod"):
                torch.zeros(2).scatter_reduce(0, idx, src, reduce="prod")
            with pytest.raises(ForwardModeUnsuitable, match="prod"):
                torch.scatter_reduce(torch.zeros(2), 0, idx, src, "prod")


def test_prelu_rewrite_keeps_values_and_gradients_and_agrees_in_forward_mode() -> None:
    x = torch.tensor([[0.0, -1.0], [2.0, 0.0], [0.0, -3.0]], dtype=torch.float64)
    for w in (
        torch.tensor([0.25, -0.5], dtype=torch.float64),
        torch.tensor([0.3], dtype=torch.float64),
    ):
        args = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        want = F.prelu(*args)
        want_grads = torch.autograd.grad(want, args, torch.ones_like(want))
        args = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        with DropoutOffMode():
            got = F.prelu(*args)
        assert torch.equal(got, want)
        for a, b in zip(torch.autograd.grad(got, args, torch.ones_like(got)), want_grads):
            assert torch.equal(a, b)
        assert _transpose_gap(F.prelu, [x, w]) <= 50 * EPS


def _central_slope(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor
) -> float:
    h = 1e-6
    return float((f(x + h * v) - f(x - h * v)).sum() / (2 * h))


def test_scatter_reduce_max_without_self_has_the_functions_gradient() -> None:
    """PyTorch's gradient halves a source that ties with the excluded output value."""
    out = torch.zeros(2, dtype=torch.float64)
    idx = torch.tensor([0, 0, 1])
    src = torch.tensor([0.0, -1.0, 3.0], dtype=torch.float64)
    v = torch.tensor([1.0, 0.3, -0.7], dtype=torch.float64)
    for reduce, sign in (("amax", 1.0), ("amin", -1.0)):

        def f(s: torch.Tensor, reduce: str = reduce) -> torch.Tensor:
            return out.scatter_reduce(0, idx, s, reduce, include_self=False) * torch.tensor(
                [1.0, 2.0]
            )

        s = (sign * src).requires_grad_()
        want = _central_slope(f, sign * src, v)
        torch_slope = float(torch.autograd.grad(f(s).sum(), s)[0] @ v)
        assert abs(torch_slope - want) > 0.1  # the premise
        with DropoutOffMode():
            slope = float(torch.autograd.grad(f(s).sum(), s)[0] @ v)
            in_place = out.clone().scatter_reduce_(0, idx, s, reduce, include_self=False)
        assert abs(slope - want) <= 1e-8
        assert torch.equal(in_place, f(s.detach()) / torch.tensor([1.0, 2.0]))


def test_as_strided_scatter_has_the_functions_gradient() -> None:
    a = torch.arange(4.0, dtype=torch.float64, requires_grad=True)
    b = torch.ones(2, dtype=torch.float64, requires_grad=True)
    weights = torch.arange(4.0, dtype=torch.float64)

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.as_strided_scatter(a, b, (2,), (2,)) * weights).sum()

    torch_grad = torch.autograd.grad(f(a, b), a)[0]
    with DropoutOffMode():
        grad = torch.autograd.grad(f(a, b), a)[0]
        with pytest.raises(ValueError, match="contiguous"):
            torch.as_strided_scatter(a.detach().reshape(2, 2).T, b, (2,), (1,))
    assert torch.equal(grad, torch.tensor([0.0, 1.0, 0.0, 3.0], dtype=torch.float64))
    assert not torch.equal(torch_grad, grad)  # the premise: PyTorch credits the overwritten


def test_polar_at_zero_and_negative_magnitude_has_the_functions_derivatives() -> None:
    r = torch.tensor([0.0, -1.5, 2.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.3, 1.1, -0.4, 2.5], dtype=torch.float64)
    leaves = [r.clone().requires_grad_(), t.clone().requires_grad_()]
    torch_grad = torch.autograd.grad(torch.polar(*leaves).real.sum(), leaves[0])[0]
    assert not torch.equal(torch_grad, torch.cos(t))  # the premise: 0 and -cos at r <= 0
    with DropoutOffMode():
        got = torch.polar(*leaves)
        grads = torch.autograd.grad(got.real.sum() + 2 * got.imag.sum(), leaves)
    assert torch.equal(got, torch.polar(r, t))  # values: PyTorch's, bitwise
    # d/dr = cos t + 2 sin t, d/dt = r (2 cos t - sin t), everywhere
    assert torch.allclose(grads[0], torch.cos(t) + 2 * torch.sin(t), rtol=0, atol=4 * EPS)
    assert torch.allclose(grads[1], r * (2 * torch.cos(t) - torch.sin(t)), rtol=0, atol=8 * EPS)

    def real_part(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.polar(r, t).real

    assert _transpose_gap(real_part, [r, t]) <= 50 * EPS


@pytest.mark.parametrize("det", [torch.det, torch.linalg.det, torch.Tensor.det])
def test_one_by_one_determinant_has_tangent_one_and_the_same_value(
    det: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.cat([torch.zeros(2, 1, 1), torch.randn(3, 1, 1, generator=gen)]).double()
    with DropoutOffMode():
        assert torch.equal(det(a), torch.linalg.det(a))
        assert _transpose_gap(det, [a]) <= 50 * EPS
        b = torch.randn(3, 2, 2, dtype=torch.float64, generator=gen)
        assert torch.equal(det(b), torch.linalg.det(b))  # larger matrices: PyTorch's own
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1).double())
        assert float(fwAD.unpack_dual(torch.linalg.det(dual)).tangent) == 0.0  # the premise
