"""The lean transformer second derivatives (LayerNorm, GELU, softmax, attention).

Each function is checked in float64 with ``gradcheck``/``gradgradcheck`` (finite
differences of the first and second derivatives) after asserting that the lean path
was taken (its node names); whole-model Hessians and GGNs of tiny GPT configurations
are compared with the dense float64 references in train and eval mode, with dropout
> 0 (products must equal the dropout-free model's).  Two float64 evaluations of the
same derivative agree to ``C * eps * cond``; 1e-10 leaves a wide margin for these
tiny, well-conditioned cases (the suite-wide tolerance of curvops).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import GGNOperator, HessianOperator
from curvops.lean_ops import lean_double_backward
from curvops.testing import dense_ggn, dense_hessian
from nets.models.gpt import GPT

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, requires_grad: bool = True) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=DT).requires_grad_(requires_grad)


def _graph_names(tensors: Any) -> set[str]:
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


# ------------------------------------------------------------------- GELU
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_second_derivatives(approximate: str) -> None:
    x = _randn(3, 4, 5, seed=1) * 2

    def fn(t: torch.Tensor) -> torch.Tensor:
        return F.gelu(t, approximate=approximate)

    assert "_GeluBackwardBackward" in _node_names(fn, (x,))
    _check_second_order(fn, (x,))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_products_reuse_their_constants(approximate: str) -> None:
    """Repeated products through one recorded graph equal PyTorch's, every time."""
    x = _randn(4, 6, seed=1)
    v = torch.randn(4, 6, generator=_gen(2), dtype=DT)

    def hvps(lean: bool) -> list[torch.Tensor]:
        with lean_double_backward(lean):
            (g,) = torch.autograd.grad(
                F.gelu(x, approximate=approximate).sin().sum(), x, create_graph=True
            )
        return [torch.autograd.grad(g, x, v * k, retain_graph=True)[0] for k in (1.0, -2.0)]

    for got, ref in zip(hvps(True), hvps(False)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


# -------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize(
    ("normalized", "affine"), [((5,), "both"), ((4, 5), "weight"), ((5,), "none"), ((5,), "bias")]
)
def test_layer_norm_second_derivatives(normalized: tuple[int, ...], affine: str) -> None:
    x = _randn(3, 4, 5, seed=1)
    w = _randn(*normalized, seed=2) if affine in ("both", "weight") else None
    b = _randn(*normalized, seed=3) if affine in ("both", "bias") else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*ts: torch.Tensor) -> torch.Tensor:
        rest = list(ts[1:])
        weight = rest.pop(0) if w is not None else None
        bias = rest.pop(0) if b is not None else None
        return F.layer_norm(ts[0], normalized, weight, bias, 1e-5)

    assert "_LayerNormBackwardBackward" in _node_names(fn, inputs)
    _check_second_order(fn, inputs)


def test_layer_norm_module_with_frozen_input() -> None:
    ln = nn.LayerNorm(6).double()
    x = _randn(2, 3, 6, seed=1, requires_grad=False)
    ps = (ln.weight.detach().requires_grad_(), ln.bias.detach().requires_grad_())

    def fn(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (6,), w, b).tanh()

    _check_second_order(fn, ps)


# ---------------------------------------------------------------- softmax
@pytest.mark.parametrize(
    "softmax",
    [
        lambda t: F.softmax(t, dim=-1),
        lambda t: torch.softmax(t, 1),
        lambda t: t.softmax(0),
        lambda t: F.softmax(t, 2, dtype=DT),  # dtype=: native
    ],
)
def test_softmax_second_derivatives(softmax: Callable[[torch.Tensor], torch.Tensor]) -> None:
    x = _randn(3, 4, 5, seed=1)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return softmax(t) * torch.arange(5, dtype=DT)

    _check_second_order(fn, (x,))


def test_softmax_lean_and_native_paths() -> None:
    x = _randn(3, 4, seed=1)
    assert "_SoftmaxBackwardBackward" in _node_names(lambda t: F.softmax(t, -1).log1p(), (x,))
    names = _node_names(lambda t: F.softmax(t, -1, dtype=DT).log1p(), (x,))
    assert not any(n.startswith("_") for n in names), names


# -------------------------------------------------------------- attention
@pytest.mark.parametrize(
    "case", ["plain", "causal", "causal-rect", "bool-mask", "float-mask", "scale"]
)
def test_attention_second_derivatives(case: str) -> None:
    q, k, v = _randn(2, 2, 4, 3, seed=1), _randn(2, 2, 5, 3, seed=2), _randn(2, 2, 5, 3, seed=3)
    kwargs: dict[str, Any] = {}
    if case == "causal":
        k, v = k[:, :, :4].detach().requires_grad_(), v[:, :, :4].detach().requires_grad_()
        kwargs["is_causal"] = True
    elif case == "causal-rect":
        kwargs["is_causal"] = True
    elif case == "bool-mask":
        mask = torch.rand(4, 5, generator=_gen(4)) > 0.4
        mask[:, 0] = True  # every query sees a key
        kwargs["attn_mask"] = mask
    elif case == "float-mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 4, 5, generator=_gen(4), dtype=DT)
    else:
        kwargs["scale"] = 0.3

    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(a, b, c, **kwargs)

    assert "_SoftmaxBackwardBackward" in _node_names(fn, (q, k, v))
    _check_second_order(fn, (q, k, v))
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        torch.testing.assert_close(fn(q, k, v), _lean(fn)(q, k, v), rtol=1e-12, atol=1e-13)


def _lean(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def wrapped(*ts: torch.Tensor) -> torch.Tensor:
        with lean_double_backward():
            return fn(*ts)

    return wrapped


def test_attention_that_hides_every_key_of_a_query_runs_natively() -> None:
    q, k, v = _randn(1, 1, 3, 2, seed=1), _randn(1, 1, 3, 2, seed=2), _randn(1, 1, 3, 2, seed=3)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False  # query 1 sees nothing: the MATH backend returns zeros there

    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(a, b, c, attn_mask=mask)

    assert "_SoftmaxBackwardBackward" not in _node_names(fn, (q, k, v))
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        out = _lean(fn)(q, k, v)
    assert torch.equal(out[0, 0, 1], torch.zeros(2, dtype=DT))


# ---------------------------------------------------- third derivatives
def test_third_derivatives_are_exact() -> None:
    """Under ``create_graph`` the second derivatives are differentiable: equal to PyTorch's
    third derivatives of GELU and softmax, and of LayerNorm written in primitive
    operations (PyTorch's ``layer_norm`` third derivatives are wrong, 120 % off here;
    against finite differences in ``test_sweep6_nested_grad.py``)."""
    x, w, b = _randn(2, 3, 4, seed=1), _randn(4, seed=2), _randn(4, seed=3)
    v = [torch.randn(t.shape, generator=_gen(9), dtype=DT) for t in (x, w, b)]

    def layer_norm(t: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor, lean: bool) -> Any:
        if lean:
            return F.layer_norm(t, (4,), w_, b_)
        c = t - t.mean(-1, keepdim=True)
        return c * torch.rsqrt(c.square().mean(-1, keepdim=True) + 1e-5) * w_ + b_

    def f(t: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor, lean: bool) -> torch.Tensor:
        h = F.gelu(layer_norm(t, w_, b_, lean), approximate="tanh")
        return (F.softmax(h, -1) * h).sum()

    def third(lean: bool) -> list[torch.Tensor]:
        ps = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        with lean_double_backward(lean):
            g = torch.autograd.grad(f(*ps, lean), ps, create_graph=True)
        hv = torch.autograd.grad(g, ps, v, create_graph=True)
        vhv = sum((a * c).sum() for a, c in zip(hv, v))
        return list(torch.autograd.grad(vhv, ps))

    for got, ref in zip(third(True), third(False)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------- whole models
def _tiny_gpt(dropout: float) -> GPT:
    return GPT(num_classes=5, input_size=4, n_layer=1, n_head=2, d_model=2, dropout=dropout, seed=3)


class _ClassDimFirst(nn.Module):
    """Logits ``(B, V, T)``: ``nn.CrossEntropyLoss`` is the mean next-token loss."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.gpt(ids)
        return out.transpose(1, 2)


@pytest.mark.parametrize("train", [False, True])
def test_tiny_gpt_hessian_and_ggn_match_dense_references(train: bool) -> None:
    """Lean products of a GPT with dropout 0.3 = dense float64 of the dropout-free model."""
    ids = torch.randint(0, 5, (3, 4), generator=_gen(1))
    targets = torch.randint(0, 5, (3, 4), generator=_gen(2))
    model = _ClassDimFirst(_tiny_gpt(0.3)).double().train(train)
    clean = _ClassDimFirst(_tiny_gpt(0.0)).double().train(train)
    clean.load_state_dict(model.state_dict())
    loss_fn, data = nn.CrossEntropyLoss(), (ids, targets)
    V = np.random.default_rng(0).standard_normal((sum(p.numel() for p in model.parameters()), 4))
    for cls, dense in ((HessianOperator, dense_hessian), (GGNOperator, dense_ggn)):
        op = cls(model, loss_fn, data)
        got = op @ V
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            ref = dense(clean, loss_fn, data).numpy() @ V
        assert np.linalg.norm(got - ref) <= 1e-10 * np.linalg.norm(ref)
        assert np.array_equal(op @ V, got)  # bitwise reproducible


def test_tiny_gpt_takes_every_lean_path() -> None:
    from curvops.products import hessian_linearization

    model = _tiny_gpt(0.0).double()
    ids = torch.randint(0, 5, (2, 4), generator=_gen(1))
    names = [n for n, _ in model.named_parameters()]

    def loss_of(ps: list[torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, dict(zip(names, ps)), (ids,))
        return out.square().mean()

    lin = hessian_linearization(loss_of, [p.detach() for p in model.parameters()])
    found = _graph_names(lin._graph_grads)
    assert {"_GeluBackwardBackward", "_LayerNormBackwardBackward"} <= found
    assert "_SoftmaxBackwardBackward" in found
