"""The lean double-backward functions: second derivatives against autograd's own.

Every function is checked in float64 with ``gradcheck``/``gradgradcheck`` (finite
differences of the first and of the second derivative), after asserting that the
lean path was actually taken (its node names), and whole-model Hessians through
every lean operation are compared with the dense float64 reference.  Derivatives
computed two ways in float64 agree to ``C * eps * cond``; 1e-10 leaves a wide margin
for these tiny, well-conditioned cases (the suite-wide tolerance of curvops).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from curvops import GGNOperator, HessianOperator, lean_ops
from curvops.lean_ops import lean_double_backward
from curvops.products import hessian_linearization
from curvops.testing import dense_hessian

from .conftest import KitchenSink

DT = torch.float64


@pytest.fixture(autouse=True)
def _lean_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests use tiny tensors: take the lean path for them too."""
    monkeypatch.setattr(lean_ops, "LEAN_MIN_ELEMENTS", 0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, requires_grad: bool = True) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=DT).requires_grad_(requires_grad)


def _graph_names(tensors: Any) -> set[str]:
    """Names of every autograd node in the graphs of ``tensors``."""
    names: set[str] = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return names


def _node_names(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> set[str]:
    """Node names in the graph of the first derivatives of ``sum(fn(inputs)**2)``."""
    with lean_double_backward():
        out = fn(*inputs)
        wrt = [t for t in inputs if t.requires_grad]
        grads = torch.autograd.grad((out**2).sum(), wrt, create_graph=True)
    return _graph_names(grads)


def _check_second_order(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
    def lean(*ts: torch.Tensor) -> torch.Tensor:
        with lean_double_backward():
            return fn(*ts)

    assert torch.autograd.gradcheck(lean, inputs)
    assert torch.autograd.gradgradcheck(lean, inputs)


# ----------------------------------------------------------- convolution
@given(
    dims=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    input_grad=st.booleans(),
)
def test_convolution_second_derivatives(
    dims: int,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    bias: bool,
    input_grad: bool,
) -> None:
    size = {1: 7, 2: 5, 3: 4}[dims]
    x = _randn(2, 2, *([size] * dims), seed=1, requires_grad=input_grad)
    w = _randn(4, 2 // groups, *([2] * dims), seed=2)
    b = _randn(4, seed=3) if bias else None
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]

    def fn(*ts: torch.Tensor) -> torch.Tensor:
        x_, w_, *rest = ts
        return conv(x_, w_, rest[0] if rest else None, stride, padding, dilation, groups)

    inputs = (x, w) if b is None else (x, w, b)
    assert "_ConvolutionBackwardBackward" in _node_names(fn, inputs)
    _check_second_order(fn, inputs)


def test_convolution_keyword_and_tuple_arguments() -> None:
    x, w, b = _randn(2, 2, 6, 5, seed=1), _randn(3, 2, 3, 2, seed=2), _randn(3, seed=3)

    def fn(x_: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        return torch.conv2d(x_, w_, bias=b_, stride=(2, 1), padding=(1, 0), dilation=(1, 2))

    assert "_ConvolutionBackwardBackward" in _node_names(fn, (x, w, b))
    _check_second_order(fn, (x, w, b))


# ------------------------------------------------------ eval BatchNorm
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 5), (3, 3, 4, 3), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_batch_norm_second_derivatives(shape: tuple[int, ...], affine: bool) -> None:
    x = _randn(*shape, seed=1)
    mean = _randn(3, seed=2, requires_grad=False)
    var = torch.rand(3, generator=_gen(3), dtype=DT) + 0.5
    weight, bias = (_randn(3, seed=4), _randn(3, seed=5)) if affine else (None, None)

    def fn(*ts: torch.Tensor) -> torch.Tensor:
        x_, *wb = ts
        w_, b_ = (wb[0], wb[1]) if wb else (None, None)
        # a nonlinearity after the affine map so that second derivatives are not zero
        return torch.tanh(F.batch_norm(x_, mean, var, w_, b_, False, 0.1, 1e-3))

    inputs = (x,) if weight is None or bias is None else (x, weight, bias)
    assert "_BatchNormEvalBackwardBackward" in _node_names(fn, inputs)
    _check_second_order(fn, inputs)
    assert torch.equal(var, torch.rand(3, generator=_gen(3), dtype=DT) + 0.5)  # untouched


def test_eval_batch_norm_with_only_some_parameters_requiring_gradients() -> None:
    x = _randn(4, 3, 2, seed=1, requires_grad=False)
    mean, var = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    weight, bias = _randn(3, seed=4), _randn(3, seed=5, requires_grad=False)

    def fn(w_: torch.Tensor) -> torch.Tensor:
        return torch.sin(F.batch_norm(x, mean, var, w_, bias, False, 0.1, 1e-5))

    _check_second_order(fn, (weight,))


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 5), (3, 3, 4, 3), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_train_batch_norm_second_derivatives(shape: tuple[int, ...], affine: bool) -> None:
    x = _randn(*shape, seed=1)
    weight, bias = (_randn(3, seed=4), _randn(3, seed=5)) if affine else (None, None)
    mix = _randn(*shape, seed=6, requires_grad=False)  # breaks the symmetries of sum(y**2)

    def fn(*ts: torch.Tensor) -> torch.Tensor:
        x_, *wb = ts
        w_, b_ = (wb[0], wb[1]) if wb else (None, None)
        return torch.tanh(F.batch_norm(x_, None, None, w_, b_, True, 0.1, 1e-3)) * mix

    inputs = (x,) if weight is None or bias is None else (x, weight, bias)
    assert "_BatchNormTrainBackwardBackward" in _node_names(fn, inputs)
    _check_second_order(fn, inputs)


def test_train_batch_norm_updates_running_statistics_like_native() -> None:
    x = _randn(6, 3, 4, seed=1)
    stats = [(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)) for _ in range(2)]
    outs = []
    for lean, (mean, var) in zip((True, False), stats):
        with lean_double_backward(lean):
            outs.append(F.batch_norm(x, mean, var, None, None, True, 0.3, 1e-5))
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-14)
    assert torch.allclose(stats[0][0], stats[1][0], rtol=0, atol=1e-15)
    assert torch.allclose(stats[0][1], stats[1][1], rtol=0, atol=1e-15)


# ----------------------------------------------------- ReLU, max pooling
@pytest.mark.parametrize(
    "relu", [F.relu, torch.relu, torch.Tensor.relu, nn.ReLU()], ids=["F", "torch", "method", "nn"]
)
def test_relu_second_derivatives(relu: Callable[[torch.Tensor], torch.Tensor]) -> None:
    x = _randn(4, 5, seed=1)
    w = _randn(5, 5, seed=2)

    def fn(x_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        return relu(x_ @ w_) @ w_  # products around the ReLU: non-zero second derivatives

    assert "_ReLUBackwardBackward" in _node_names(fn, (x, w))
    _check_second_order(fn, (x, w))


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, stride=1, padding=1),  # overlapping windows, padding
        nn.MaxPool2d(2, ceil_mode=True),
        nn.MaxPool2d((2, 3), stride=(1, 2), dilation=(2, 1)),
    ],
    ids=["2", "overlap-pad", "ceil", "rect-dilated"],
)
@pytest.mark.parametrize("batched", [True, False])
def test_max_pool_second_derivatives(pool: nn.Module, batched: bool) -> None:
    shape = (2, 2, 5, 7) if batched else (2, 5, 7)
    x = _randn(*shape, seed=1)
    scale = _randn(*shape, seed=2)

    def fn(x_: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = pool(x_ * s_)
        return out

    assert "_MaxPool2dBackwardBackward" in _node_names(fn, (x, scale))
    _check_second_order(fn, (x, scale))


def test_small_relu_and_pooling_stay_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean_ops, "LEAN_MIN_ELEMENTS", 50)
    w = _randn(1, seed=2)

    def fn(x_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(x_ * w_), 2)

    small = _node_names(fn, (_randn(1, 1, 4, 4, seed=1), w))  # 16 elements
    assert not any(n.startswith("_") for n in small), small
    large = _node_names(fn, (_randn(1, 1, 8, 8, seed=1), w))  # 64 elements
    assert {"_ReLUBackwardBackward", "_MaxPool2dBackwardBackward"} <= large


# ------------------------------------------------------------ fallbacks
@pytest.mark.parametrize(
    "case",
    ["relu-inplace", "conv-same", "conv-transpose", "pool-indices", "conv-unbatched"],
)
def test_unsupported_calls_fall_back_to_native_formulas(case: str) -> None:
    x4 = _randn(3, 2, 5, 5, seed=1)
    w = _randn(2, 2, 3, 3, seed=2)

    def fn(x_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        if case == "relu-inplace":
            return F.relu(x_ * w_.sum(), inplace=True) * w_.sum()
        if case == "conv-same":
            return torch.tanh(F.conv2d(x_, w_, padding="same"))
        if case == "conv-transpose":
            return torch.tanh(F.conv_transpose2d(x_, w_))
        if case == "pool-indices":
            return F.max_pool2d(x_ * w_.sum(), 2, return_indices=True)[0]
        return torch.tanh(F.conv2d(x_[0], w_))

    names = _node_names(fn, (x4, w))
    assert not any(n.startswith("_") for n in names), names
    _check_second_order(fn, (x4, w))


def test_mode_is_scoped_and_disabled_is_native() -> None:
    x, w = _randn(2, 1, 4, 4, seed=1), _randn(2, 1, 3, 3, seed=2)
    with lean_double_backward(enabled=False):
        g = torch.autograd.grad(F.conv2d(x, w).pow(2).sum(), w, create_graph=True)
    assert "ConvolutionBackwardBackward0" in _graph_names(g)
    assert not any(n.startswith("_") for n in _graph_names(g))
    with lean_double_backward():
        pass
    g = torch.autograd.grad(F.conv2d(x, w).pow(2).sum(), w, create_graph=True)
    assert not any(n.startswith("_") for n in _graph_names(g))


# ---------------------------------------------------- whole-model Hessians
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_kitchen_sink_hessian_matches_dense_reference(loss_name: str, bn_mode: str) -> None:
    model = KitchenSink().double().train(bn_mode == "train")
    x = torch.randn(6, 2, 8, 8, generator=_gen(1), dtype=DT)
    if loss_name == "ce":
        loss_fn: nn.Module = nn.CrossEntropyLoss()
        y = torch.randint(0, 3, (6,), generator=_gen(2))
    else:
        loss_fn, y = nn.MSELoss(), torch.randn(6, 3, generator=_gen(2), dtype=DT)
    H = HessianOperator(model, loss_fn, (x, y))
    dense = dense_hessian(model, loss_fn, (x, y)).numpy()
    got = H @ np.eye(H.shape[0])
    err = np.linalg.norm(got - dense) / np.linalg.norm(dense)
    assert err <= 1e-10
    native = HessianOperator(model, loss_fn, (x, y), lean_kernels=False) @ np.eye(H.shape[0])
    assert np.linalg.norm(got - native) / np.linalg.norm(native) <= 1e-10


def test_lean_path_is_taken_in_the_operator() -> None:
    model = KitchenSink().double().eval()
    x = torch.randn(3, 2, 8, 8, generator=_gen(1), dtype=DT)
    loss_of = _loss_of(model, x)
    lin = hessian_linearization(loss_of, [p.detach() for p in model.parameters()])
    names = _graph_names(lin._graph_grads)
    lean = {"_Convolution", "_BatchNormEval", "_ReLU", "_MaxPool2d"}
    assert {f"{n}BackwardBackward" for n in lean} <= names
    native = hessian_linearization(
        loss_of, [p.detach() for p in model.parameters()], lean_kernels=False
    )
    assert not any(n.startswith("_") for n in _graph_names(native._graph_grads))


def _loss_of(model: nn.Module, x: torch.Tensor) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]

    def loss_of(ps: list[torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
        return (out**2).mean()

    return loss_of


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_third_derivatives_stay_correct(bn_mode: str) -> None:
    """The lean backward formulas are differentiable: d/dw (v^T H(w) v) is right.

    Checked along a direction ``d`` against a central difference of ``v^T H v``: step
    h = 1e-6, truncation ~h^2 times the fourth derivative (the error fell 100x per
    10x smaller h, to 5e-11 here) plus rounding ~eps |v^T H v| / h ~ 1e-9.  In eval
    mode it also equals PyTorch's native third derivative; in train mode PyTorch's
    own (``batchnorm_double_backward`` differentiated once more) disagrees with the
    finite difference in torch 2.13 (28.2 against 24.4), so it is not the reference.
    """
    model = KitchenSink().double().train(bn_mode == "train")
    x = torch.randn(3, 2, 8, 8, generator=_gen(1), dtype=DT)
    loss_of = _loss_of(model, x)
    w0 = [p.detach().clone() for p in model.parameters()]
    v = [torch.randn(p.shape, generator=_gen(9), dtype=DT) for p in w0]
    d = [torch.randn(p.shape, generator=_gen(10), dtype=DT) for p in w0]

    def vhv(w: list[torch.Tensor], lean: bool) -> torch.Tensor:
        with lean_double_backward(lean):
            g = torch.autograd.grad(loss_of(w), w, create_graph=True)
            hv = torch.autograd.grad(g, w, v, create_graph=True)
        return torch.stack([(a * b).sum() for a, b in zip(hv, v)]).sum()

    def third(lean: bool) -> float:
        w = [p.clone().requires_grad_() for p in w0]
        t = torch.autograd.grad(vhv(w, lean), w, allow_unused=True, materialize_grads=True)
        return float(sum(float((a * b).sum()) for a, b in zip(t, d)))

    h = 1e-6

    def shifted(sign: float) -> list[torch.Tensor]:
        return [(p + sign * h * q).requires_grad_() for p, q in zip(w0, d)]

    fd = float((vhv(shifted(1.0), True) - vhv(shifted(-1.0), True)).detach()) / (2 * h)
    lean = third(True)
    assert abs(lean - fd) <= 1e-8 * abs(fd)
    if bn_mode == "eval":
        assert abs(lean - third(False)) <= 1e-10 * abs(lean)


def test_model_and_arguments_are_untouched() -> None:
    model = KitchenSink().double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 2, 8, 8, generator=_gen(1), dtype=DT)
    x0 = x.clone()
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, torch.tensor([0, 1, 2])))
    H @ np.ones(H.shape[0])
    after: dict[str, Any] = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(x, x0) and not model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_float16_models_through_the_lean_path(cls: type, bn_mode: str) -> None:
    """Half precision through every lean layer: float16 out, ~float16 rounding off float64.

    The relative error is a small multiple of the unit roundoff 2^-11 times the depth
    of the computation; we allow 50 * 2^-11 (measured 5e-4 to 1e-3).
    """
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 3),
    )
    x = torch.randn(6, 1, 8, 8, generator=_gen(0))
    y = torch.randint(0, 3, (6,), generator=_gen(1))
    op16 = cls(copy.deepcopy(net).half(), nn.CrossEntropyLoss(), (x.half(), y), bn_mode=bn_mode)
    op64 = cls(copy.deepcopy(net).double(), nn.CrossEntropyLoss(), (x.double(), y), bn_mode=bn_mode)
    v = torch.linspace(-1, 1, op16.shape[0], dtype=DT)
    out16 = op16.matvec(v.half())
    assert out16.dtype == torch.float16
    ref = op64.matvec(v)
    assert float(torch.linalg.norm(out16.double() - ref) / torch.linalg.norm(ref)) < 50 * 2.0**-11
