"""Curvature of models whose forward pass takes a gradient of itself.

Physics-informed networks, gradient penalties and energy-based force models call
``torch.autograd.grad(..., create_graph=True)`` inside ``forward``; their outputs
(here :math:`[u, \\partial u/\\partial x]`) then depend on the weights through the
backward formulas of every layer.

* GGN and Fisher: the cached graph of :func:`curvops.products.jacobian_graph` is
  recorded with the lean kernels in ``jacobian_only`` mode, whose saved tensors used
  to enter *every* backward as constants -- also the model's own gradient, which then
  lost its weight dependence (GGN 0.06-31 % off).  Checked against the dense float64
  :math:`J^\\top \\nabla^2_f L\\, J` built independently (``torch.func.functional_call``
  and ``torch.autograd.functional.jacobian``/``hessian`` on a flat parameter vector),
  for every lean kernel type, after asserting that the lean kernel was used.
* Hessian: needs third derivatives of each layer.  PyTorch's are wrong for
  ``layer_norm`` and train-mode ``batch_norm`` (``gradgradcheck`` fails), so the
  reference there is finite differences of the exact gradient (PyTorch's first and
  second derivatives, which pass ``gradcheck``): central differences
  :math:`D(h) = (g(\\theta + h e_i) - g(\\theta - h e_i)) / 2h = H e_i + O(h^2)`,
  Richardson-extrapolated, :math:`(4 D(h/2) - D(h)) / 3 = H e_i + O(h^4)`, at
  :math:`h = 10^{-3}`.  Measured: the plain :math:`D(h)` converge to the fixed
  products as :math:`h^2` (LayerNorm model, the largest constant here: 2.7e-2,
  2.8e-4, 2.8e-6, 2.8e-8 relative at h = 1e-2 ... 1e-5), the extrapolation is 3e-8
  off there and at most 1e-10 elsewhere; rounding adds about
  :math:`\\epsilon \\lVert g \\rVert / h \\approx 10^{-13}` relative.  The tolerance
  1e-6 leaves a margin of 30 and is far below the errors found (0.33 and 0.88).
  Where PyTorch's third derivatives are wrong and the lean kernels are off (or do not
  cover the call), the Hessian is refused.

Two float64 evaluations of the same derivative agree to ``C * eps * cond``; 1e-10
leaves a wide margin for these tiny, well-conditioned models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvops.lean_ops
from curvops import FisherOperator, GGNOperator, HessianOperator
from curvops.differentiability import OnceDifferentiableError
from curvops.lean_ops import lean_double_backward
from curvops.products import jacobian_graph

DT = torch.float64
TOL = 1e-10
FD_STEP = 1e-3
FD_TOL = 1e-6


class InputGradient(nn.Module):
    """``[u, du/dx[:, :2]]`` with ``u = head(body(x))``: a forward pass that differentiates."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            u = self.head(self.body(x))
            (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        return torch.cat([u, g.reshape(len(g), -1)[:, :2]], 1)


class Attention(nn.Module):
    """``F.scaled_dot_product_attention`` over 2 heads of 2 tokens of width 2."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x).view(len(x), 2, 2, 2)
        return F.scaled_dot_product_attention(h, h.flip(-1), h).reshape(len(x), 8).tanh()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _eval_batch_norm() -> nn.Module:
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5, generator=_gen(5))
        bn.running_var.uniform_(0.5, 1.5, generator=_gen(6))
        bn.weight.uniform_(0.5, 1.5, generator=_gen(7))
    return bn.eval()


def _conv(out: int = 2) -> nn.Module:
    return nn.Conv2d(1, out, 3, padding=1)


#: name -> (body, head, input shape, the lean node its forward graph must hold)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[int, ...], str]] = {
    "conv": (lambda: nn.Sequential(_conv(), nn.Tanh(), nn.Flatten()), lambda: nn.Linear(18, 1),
             (4, 1, 3, 3), "_ConvolutionBackward"),
    "batch_norm_eval": (lambda: nn.Sequential(_conv(), _eval_batch_norm(), nn.Tanh(), nn.Flatten()),
                        lambda: nn.Linear(18, 1), (4, 1, 3, 3), "_BatchNormEvalBackward"),
    "batch_norm_train": (lambda: nn.Sequential(_conv(), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten()),
                         lambda: nn.Linear(18, 1), (4, 1, 3, 3), "_BatchNormTrainBackward"),
    "relu": (lambda: nn.Sequential(_conv(), nn.ReLU(), nn.Flatten()), lambda: nn.Linear(18, 1),
             (4, 1, 3, 3), "_ReLUBackward"),
    "max_pool": (lambda: nn.Sequential(_conv(), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten()),
                 lambda: nn.Linear(8, 1), (4, 1, 4, 4), "_MaxPool2dBackward"),
    "layer_norm": (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh()),
                   lambda: nn.Linear(4, 1), (5, 3), "_LayerNormBackward"),
    "gelu": (lambda: nn.Sequential(nn.Linear(3, 4), nn.GELU()), lambda: nn.Linear(4, 1),
             (5, 3), "_GeluBackward"),
    "gelu_tanh": (lambda: nn.Sequential(nn.Linear(3, 4), nn.GELU("tanh")),
                  lambda: nn.Linear(4, 1), (5, 3), "_GeluBackward"),
    "softmax": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1)), lambda: nn.Linear(4, 1),
                (5, 3), "_SoftmaxBackward"),
    "attention": (lambda: Attention(), lambda: nn.Linear(8, 1), (5, 4), "_SoftmaxBackward"),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _lean_relu_and_pooling_on_tiny_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """ReLU and max pooling take the lean path from LEAN_MIN_ELEMENTS on: every size here."""
    monkeypatch.setattr(curvops.lean_ops, "LEAN_MIN_ELEMENTS", 1)


def _case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    body, head, shape, _ = CASES[name]
    torch.manual_seed(0)  # the default initialisation of the layers
    model = InputGradient(body(), head()).double()
    x = torch.randn(shape, generator=_gen(1), dtype=DT)
    y = torch.randn(shape[0], 3, generator=_gen(2), dtype=DT)
    return model, x, y


def _graph_names(roots: list[torch.Tensor]) -> set[str]:
    names: set[str] = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            names.add(type(node).__name__)
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return names


def _flat_forward(model: nn.Module, x: torch.Tensor) -> tuple[Callable[..., Any], torch.Tensor]:
    """``f(theta) = model(x)`` on a flat parameter vector (buffers copied: not updated).

    Attention runs on PyTorch's MATH backend, whose derivatives are composites of
    matrix products and softmax (the fused CPU kernel has no double backward).
    """
    named = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    shapes = [p.shape for p in named.values()]
    sizes = [p.numel() for p in named.values()]

    def forward(theta: torch.Tensor) -> torch.Tensor:
        parts = [t.view(s) for t, s in zip(theta.split(sizes), shapes)]
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
            return functional_call(model, {**dict(zip(named, parts)), **buffers}, (x,))

    return forward, torch.cat([p.detach().reshape(-1) for p in named.values()])


def _dense_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    forward, theta = _flat_forward(model, x)
    out = forward(theta).detach()
    jac = torch.autograd.functional.jacobian(forward, theta).reshape(out.numel(), -1)
    h_out = torch.autograd.functional.hessian(
        lambda o: F.mse_loss(o.view(out.shape), y), out.reshape(-1)
    )
    return jac.T @ h_out @ jac


def _fd_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Finite differences of the exact gradient (error analysis in the module docstring)."""
    forward, theta = _flat_forward(model, x)

    def grad(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(F.mse_loss(forward(t), y), t)[0]

    def central(h: float) -> torch.Tensor:
        cols = [(grad(theta + h * e) - grad(theta - h * e)) / (2 * h)
                for e in torch.eye(len(theta), dtype=DT)]  # fmt: skip
        return torch.stack(cols, 1)

    fd = (4 * central(FD_STEP / 2) - central(FD_STEP)) / 3  # Richardson: O(h^4)
    return (fd + fd.T) / 2


def _dense(op: Any) -> torch.Tensor:
    return torch.as_tensor(op @ torch.eye(op.shape[0], dtype=DT))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -------------------------------------------------------------- GGN and Fisher
@pytest.mark.parametrize("name", list(CASES))
def test_ggn_of_a_forward_that_differentiates_itself(name: str) -> None:
    model, x, y = _case(name)
    with lean_double_backward(jacobian_only=True):
        assert CASES[name][3] in _graph_names([model(x)])  # the lean kernel was used
    ggn = GGNOperator(model, nn.MSELoss(), (x, y))
    assert _rel(_dense(ggn), _dense_ggn(model, x, y)) < TOL


@pytest.mark.parametrize("kind", ["empirical", "mc"])
def test_fisher_of_a_forward_that_differentiates_itself(kind: str) -> None:
    """The Fisher shares the cached Jacobian graph; PyTorch's formulas were right there."""
    model, x, y = _case("conv")
    mats = [
        _dense(FisherOperator(model, nn.MSELoss(), (x, y), kind=kind, lean_kernels=lean))
        for lean in (True, False)
    ]
    assert _rel(mats[0], mats[1]) < TOL


def test_jacobian_graph_keeps_its_saved_tensors_constant_in_the_normal_path() -> None:
    """Without a gradient in the forward pass the J^T u graph of lean convolutions is
    linear in u alone (no edge to a weight): the product's cost is unchanged."""
    conv1, conv2 = nn.Conv2d(1, 2, 3, bias=False).double(), nn.Conv2d(2, 1, 3).double()
    x = torch.randn(2, 1, 6, 6, generator=_gen(1), dtype=DT)
    params = [conv1.weight, conv2.weight, conv2.bias]

    def forward(ps: list[torch.Tensor]) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, ps[0]), ps[1], ps[2])

    graph = jacobian_graph(forward, params, lambda out: lambda U: U)
    jt_u = [g for g in graph._jt_u if g.requires_grad]
    assert "_ConvolutionBackwardBackward" in _graph_names(jt_u)
    grads = torch.autograd.grad(jt_u, graph._leaves, jt_u, retain_graph=True, allow_unused=True)
    assert all(g is None for g in grads)  # only u is reached
    with lean_double_backward(jacobian_only=True) as mode:
        assert mode is not None and mode.gradient_calls == 0
        forward([p.detach().requires_grad_() for p in params])
        assert mode.gradient_calls == 0


# --------------------------------------------------------------------- Hessian
def test_layer_norm_third_derivatives_are_exact() -> None:
    """``gradgradcheck`` of LayerNorm's lean gradient: its derivatives to third order."""
    x = torch.randn(3, 4, generator=_gen(1), dtype=DT, requires_grad=True)
    w = torch.randn(4, generator=_gen(2), dtype=DT, requires_grad=True)
    b = torch.randn(4, generator=_gen(3), dtype=DT, requires_grad=True)

    def gradient(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with lean_double_backward():
            out = F.layer_norm(ts[0], (4,), ts[1], ts[2])
            return torch.autograd.grad(out.pow(3).sum(), ts, create_graph=True)

    assert "_LayerNormBackwardBackward" in _graph_names(list(gradient(x, w, b)))
    assert torch.autograd.gradgradcheck(gradient, (x, w, b))


@pytest.mark.parametrize("name", ["layer_norm", "batch_norm_train", "batch_norm_eval", "conv",
                                  "gelu", "softmax", "attention", "max_pool"])  # fmt: skip
def test_hessian_of_a_forward_that_differentiates_itself(name: str) -> None:
    model, x, y = _case(name)
    hessian = HessianOperator(model, nn.MSELoss(), (x, y))
    assert _rel(_dense(hessian), _fd_hessian(model, x, y)) < FD_TOL


@pytest.mark.parametrize("name", ["layer_norm", "batch_norm_train"])
def test_hessian_without_lean_kernels_refuses_wrong_third_derivatives(name: str) -> None:
    model, x, y = _case(name)
    with pytest.raises(
        ValueError, match=r"Argument .lean_kernels.: expected True.*third derivatives"
    ):
        hessian = HessianOperator(model, nn.MSELoss(), (x, y), lean_kernels=False)
        _ = hessian @ torch.ones(hessian.shape[0], dtype=DT)
    ggn = GGNOperator(model, nn.MSELoss(), (x, y), lean_kernels=False)  # second order
    try:
        dense = _dense(ggn)
    except OnceDifferentiableError:
        # torch >= 2.14 marks the derivative of train-mode batch_norm's double backward as
        # not implemented: the GGN is then refused (a clear error), never wrong
        assert name == "batch_norm_train"
        return
    assert _rel(dense, _dense_ggn(model, x, y)) < TOL


def test_hessian_without_lean_kernels_through_eval_batch_norm() -> None:
    """Eval-mode BatchNorm's third derivatives are right in PyTorch: not refused."""
    model, x, y = _case("batch_norm_eval")
    hessian = HessianOperator(model, nn.MSELoss(), (x, y), lean_kernels=False)
    assert _rel(_dense(hessian), _fd_hessian(model, x, y)) < FD_TOL


class InstanceNormBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = _conv(), nn.InstanceNorm2d(2, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).tanh().flatten(1)


def test_hessian_through_a_call_the_lean_kernels_do_not_cover_is_refused() -> None:
    """``F.instance_norm`` runs PyTorch's train-mode batch norm: refused inside a forward
    pass that differentiates itself, accepted in one that does not."""
    torch.manual_seed(0)
    model = InputGradient(InstanceNormBody(), nn.Linear(18, 1)).double()
    x = torch.randn(4, 1, 3, 3, generator=_gen(1), dtype=DT)
    y = torch.randn(4, 3, generator=_gen(2), dtype=DT)
    with pytest.raises(ValueError, match=r"Argument .model.: .*nn\.GroupNorm"):
        hessian = HessianOperator(model, nn.MSELoss(), (x, y))
        _ = hessian @ torch.ones(hessian.shape[0], dtype=DT)
    plain = nn.Sequential(InstanceNormBody(), nn.Linear(18, 3)).double()
    hessian = HessianOperator(plain, nn.MSELoss(), (x, y))
    assert _rel(_dense(hessian), _fd_hessian(plain, x, y)) < FD_TOL


def test_third_derivatives_of_a_transformer_block_match_finite_differences() -> None:
    """:math:`\\nabla_\\theta (v^\\top H v)` through LayerNorm, GELU and softmax, recorded with
    the lean kernels, against Richardson-extrapolated central differences of
    :math:`v^\\top H v` computed with PyTorch's (``gradcheck``-exact) second derivatives.
    PyTorch's own third derivatives are 120 % off here; the fixed ones 2e-11."""
    x = torch.randn(2, 3, 4, generator=_gen(1), dtype=DT)
    w, b = torch.randn(4, generator=_gen(2), dtype=DT), torch.randn(4, generator=_gen(3), dtype=DT)
    v = [torch.randn(t.shape, generator=_gen(9), dtype=DT) for t in (x, w, b)]
    sizes = [t.numel() for t in (x, w, b)]

    def f(t: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.layer_norm(t, (4,), w_, b_), approximate="tanh")
        return (F.softmax(h, -1) * h).sum()

    def vhv(flat: torch.Tensor, lean: bool) -> torch.Tensor:
        ps = [p.view(t.shape) for p, t in zip(flat.split(sizes), (x, w, b))]
        with lean_double_backward(lean):
            g = torch.autograd.grad(f(*ps), ps, create_graph=True)
        hv = torch.autograd.grad(g, ps, v, create_graph=True)
        return sum((a * c).sum() for a, c in zip(hv, v))

    theta = torch.cat([t.reshape(-1) for t in (x, w, b)]).requires_grad_()
    (got,) = torch.autograd.grad(vhv(theta, True), theta)
    eye = torch.eye(len(theta), dtype=DT)

    def central(h: float) -> torch.Tensor:
        return torch.stack([(vhv(theta + h * e, False) - vhv(theta - h * e, False)) / (2 * h)
                            for e in eye]).detach()  # fmt: skip

    fd = (4 * central(FD_STEP / 2) - central(FD_STEP)) / 3
    assert _rel(got, fd) < FD_TOL
