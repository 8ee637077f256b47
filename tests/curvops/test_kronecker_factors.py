"""The fast factor kernels of curvops.kronecker equal the plain definitions (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops.kronecker import (
    drop_null_column,
    grad_factor,
    input_factor,
    layer_grad_factor,
    layer_input_factor,
    layer_inputs,
    layer_output_grads,
)

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (in_channels, kernel, image side, stride): d_in = in * k * k against T positions, so
# both the batched-product path (T >= d_in / 4) and the one-product path are taken
CONVS = [(2, 3, 8, 1), (3, 3, 6, 2), (8, 3, 4, 2), (1, 1, 5, 1)]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("ones", [False, True])
@pytest.mark.parametrize("shape", CONVS)
def test_conv_input_factor_equals_the_unfolded_definition(
    shape: tuple[int, int, int, int], ones: bool, approx: str
) -> None:
    c_in, k, side, stride = shape
    conv = nn.Conv2d(c_in, 3, k, padding=k // 2, stride=stride).to(DT)
    x = torch.randn(11, c_in, side, side, generator=_gen(1), dtype=DT)
    expected = input_factor(layer_inputs(conv, x, bias=ones), approx)
    got = layer_input_factor(conv, x, approx, ones=ones)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("shape", [(6, 8), (70, 4), (3, 1)])  # d_out vs T: both paths
def test_conv_grad_factor_equals_the_channels_last_definition(
    shape: tuple[int, int], approx: str
) -> None:
    c_out, side = shape
    conv = nn.Conv2d(1, c_out, 1).to(DT)
    g = torch.randn(9, c_out, side, side, generator=_gen(2), dtype=DT)
    expected = grad_factor(layer_output_grads(conv, g), approx)
    torch.testing.assert_close(layer_grad_factor(conv, g, approx), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_linear_factors_are_the_plain_ones(approx: str) -> None:
    lin = nn.Linear(4, 3).to(DT)
    x = torch.randn(5, 7, 4, generator=_gen(3), dtype=DT)
    g = torch.randn(5, 7, 3, generator=_gen(4), dtype=DT)
    torch.testing.assert_close(
        layer_input_factor(lin, x, approx, ones=True),
        input_factor(layer_inputs(lin, x, bias=True), approx),
    )
    torch.testing.assert_close(layer_grad_factor(lin, g, approx), grad_factor(g, approx))


def test_dropping_the_null_column_keeps_the_softmax_hessian() -> None:
    logits = torch.randn(20, 6, generator=_gen(5), dtype=DT) * 3
    p = torch.softmax(logits, dim=-1)
    S = torch.diag_embed(p.sqrt()) - p.unsqueeze(-1) * p.sqrt().unsqueeze(-2)
    R = drop_null_column(S, p.sqrt())
    assert R.shape == (20, 6, 5)
    hessian = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    torch.testing.assert_close(R @ R.mT, hessian, rtol=0, atol=1e-15)


def test_a_factor_without_that_null_vector_is_kept_whole() -> None:
    S = torch.eye(3, dtype=DT).expand(4, 3, 3)
    u = torch.full((4, 3), 3**-0.5, dtype=DT)
    assert drop_null_column(S, u) is S
