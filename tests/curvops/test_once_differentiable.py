"""A custom autograd.Function with a once-differentiable backward: an error, never zeros.

PyTorch detaches the outputs of a ``@once_differentiable`` backward, so a second
``torch.autograd.grad(..., allow_unused=True)`` silently returns zeros: before the
guard of :mod:`curvops.differentiability`, every Hessian, GGN and Fisher product of
such a model was the zero vector.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import spectral
from curvops import FisherOperator, GGNOperator, HessianOperator, diagonal_approximation
from curvops.differentiability import (
    OnceDifferentiableError,
    check_twice_differentiable,
    once_differentiable_functions,
)
from curvops.testing import dense_ggn, dense_hessian

from .conftest import relative_error


class OnceSquare(torch.autograd.Function):
    """:math:`x^2` with a correct first derivative that PyTorch can run only once."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


class TwiceSquare(torch.autograd.Function):
    """The same function with a backward written in differentiable torch operations."""

    generate_vmap_rule = True  # usable by the functorch-based dense references

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


class SquareNet(nn.Module):
    def __init__(self, square: Any) -> None:
        super().__init__()
        self.square = square
        self.first = nn.Linear(3, 4)
        self.last = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.square(self.first(x)))


def _setup(square: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = SquareNet(square).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, (x, y)


def _vector(model: nn.Module) -> np.ndarray:
    n = sum(p.numel() for p in model.parameters())
    return np.random.default_rng(0).standard_normal(n)


OPERATORS = [
    ("hessian", lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d)),
    ("hessian-uncached", lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d, cache=False)),
    ("ggn", lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d)),
    ("fisher", lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d)),
    ("hessian-two-batches", lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), [d, d])),
]


@pytest.mark.parametrize("make", [op[1] for op in OPERATORS], ids=[op[0] for op in OPERATORS])
def test_products_through_a_once_differentiable_function_raise(make: Any) -> None:
    model, data = _setup(OnceSquare.apply)
    op = make(model, data)
    with pytest.raises(OnceDifferentiableError, match=r"OnceSquare.*@once_differentiable"):
        op @ _vector(model)


def test_uncached_ggn_refuses_rather_than_returning_zeros() -> None:
    # The forward-mode path needs a jvp the Function does not define: PyTorch's own error.
    model, data = _setup(OnceSquare.apply)
    op = GGNOperator(model, nn.CrossEntropyLoss(), data, cache=False)
    with pytest.raises((NotImplementedError, RuntimeError)):
        op @ _vector(model)


def test_diagonals_raise() -> None:
    model, data = _setup(OnceSquare.apply)
    with pytest.raises(OnceDifferentiableError):
        spectral.diagonal(
            HessianOperator(model, nn.CrossEntropyLoss(), data), num_matvecs=2, seed=0
        )
    with pytest.raises(OnceDifferentiableError):
        diagonal_approximation(model, nn.CrossEntropyLoss(), data, method="hutchinson")


def test_first_order_paths_stay_exact_through_a_once_differentiable_function() -> None:
    # The exact GGN diagonal needs only J^T (one backward per output class): no refusal.
    model, data = _setup(OnceSquare.apply)
    twin, _ = _setup(lambda t: t * t)  # same seed: same weights, same function
    got = diagonal_approximation(model, nn.CrossEntropyLoss(), data, method="exact").diagonal
    want = torch.diagonal(dense_ggn(twin, nn.CrossEntropyLoss(), data))
    assert relative_error(got, want) <= 1e-13


def test_once_differentiable_loss_function_raises_for_the_output_hessian() -> None:
    class OnceLogSumExp(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(z)
            return torch.logsumexp(z, dim=1)

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (z,) = ctx.saved_tensors
            return torch.softmax(z, dim=1) * g[:, None]

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        picked = out.gather(1, y[:, None])[:, 0]
        return (OnceLogSumExp.apply(out) - picked).mean()

    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    data = (x, torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(OnceDifferentiableError, match="OnceLogSumExp"):
        GGNOperator(model, loss, data) @ _vector(model)


def test_a_differentiable_custom_function_gives_the_exact_products() -> None:
    model, data = _setup(TwiceSquare.apply)
    plain, _ = _setup(lambda t: t * t)  # same weights, the function in plain torch
    v = _vector(model)
    loss_fn = nn.CrossEntropyLoss()
    H = dense_hessian(plain, loss_fn, data).numpy()
    G = dense_ggn(plain, loss_fn, data).numpy()
    assert np.abs(H).max() > 1e-3
    eps = np.finfo(np.float64).eps
    assert relative_error(HessianOperator(model, loss_fn, data) @ v, H @ v) <= 100 * eps * 20
    assert relative_error(GGNOperator(model, loss_fn, data) @ v, G @ v) <= 100 * eps * 20


def test_names_are_listed_once_in_order() -> None:
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = TwiceSquare.apply(OnceSquare.apply(OnceSquare.apply(w))).sum()
    names = once_differentiable_functions([out])
    assert names == [f"{__name__}.OnceSquare"]
    assert once_differentiable_functions([TwiceSquare.apply(w).sum()]) == []


def test_check_passes_on_plain_graphs_and_on_constant_gradients() -> None:
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    loss = F.softplus(w).sum() + w.sum()
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    check_twice_differentiable([g], forward_roots=[loss], what="the Hessian")
    (g_lin,) = torch.autograd.grad((2.0 * w).sum(), w, create_graph=True)  # no graph at all
    check_twice_differentiable([g_lin], forward_roots=[w], what="the Hessian")


def test_a_loss_linear_in_the_function_output_is_refused_too() -> None:
    # The incoming gradient is a constant: PyTorch leaves no DelayedError mark, and the
    # gradient has no graph at all -- the Hessian would be zero instead of 2 (x^T x).
    model, data = _setup(OnceSquare.apply)
    linear_loss = lambda out, y: out.mean()  # noqa: E731
    with pytest.raises(OnceDifferentiableError, match="OnceSquare"):
        HessianOperator(model, linear_loss, data) @ _vector(model)


def test_an_unnamed_delayed_error_in_the_gradient_graph_is_refused() -> None:
    # What other once-differentiable backwards (compiled modules) leave behind.
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    marked = torch._C._functions.DelayedError(b"cannot differentiate twice", 1)(w * 1.0)
    with pytest.raises(OnceDifferentiableError, match=r"torch\.compile"):
        check_twice_differentiable([marked], forward_roots=[w], what="the Hessian")
