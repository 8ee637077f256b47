"""``curvops.finiteness``: the one-pass checks agree with ``torch.isfinite`` everywhere."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from curvops.finiteness import all_finite, each_finite

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SPECIALS = [float("nan"), float("inf"), -float("inf")]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A tensor of a drawn float dtype and shape, with specials at drawn positions.

    The finite entries range up to the dtype's largest value, so a check that summed
    the entries would overflow on some of them.
    """
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    big = torch.finfo(dtype).max
    x = (x * draw(st.sampled_from([1.0, big / 4]))).to(dtype)
    flat = x.view(-1)
    if flat.numel():
        for _ in range(draw(st.integers(0, 3))):
            pos = draw(st.integers(0, flat.numel() - 1))
            flat[pos] = draw(st.sampled_from(SPECIALS))
    return x


@given(tensors())
def test_all_finite_is_isfinite_all(x: torch.Tensor) -> None:
    result = all_finite(x)
    assert result.dtype == torch.bool and result.shape == ()
    assert bool(result) == bool(torch.isfinite(x).all())


@given(st.lists(tensors(), min_size=1, max_size=5))
def test_each_finite_is_isfinite_of_each(xs: list[torch.Tensor]) -> None:
    expected = [bool(torch.isfinite(x).all()) for x in xs]
    assert each_finite(xs).tolist() == expected


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("where", [0, 7, -1])
def test_one_special_among_parameters_of_one_dtype_is_found(special: float, where: int) -> None:
    """The stacked fast path (one dtype, non-empty) names exactly the bad tensor."""
    params = [torch.randn(4, 3) for _ in range(9)]
    params[where].view(-1)[5] = special
    flags = each_finite(params).tolist()
    bad = where % len(params)
    assert flags == [i != bad for i in range(len(params))]


def test_non_floating_empty_and_complex() -> None:
    assert bool(all_finite(torch.arange(5)))
    assert bool(all_finite(torch.zeros(0)))
    assert bool(all_finite(torch.ones(3, dtype=torch.bool)))
    z = torch.tensor([1 + 1j, 2 - 1j])
    assert bool(all_finite(z))
    z[1] = complex(0.0, float("inf"))
    assert not bool(all_finite(z))
    assert each_finite(
        [torch.arange(3), torch.zeros(0), torch.tensor([float("nan")])]
    ).tolist() == [
        True,
        True,
        False,
    ]
    assert each_finite([]).shape == (0,)


def test_gradients_of_a_tensor_that_requires_grad_are_untouched() -> None:
    w = torch.randn(5, requires_grad=True)
    assert bool(all_finite(w)) and w.grad is None and not all_finite(w).requires_grad
