"""Combining operators checks their coordinates: parameter names, in order, and shapes.

Two models whose parameters share names and total size but not shapes (``Linear(2, 6)``:
weight ``(6, 2)`` and bias ``(6,)``; ``Linear(1, 9)``: ``(9, 1)`` and ``(9,)``, 18 entries
each) give operators of one shape whose coordinates mean different things: their sum
would add weight entries of one to bias entries of the other.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from curvops import HessianOperator, KFACOperator, compare
from curvops.algebra import check_same_parameters, parameter_shapes_of
from curvops.blocks import per_block

DT = torch.float64


def _linear(d_in: int, d_out: int, seed: int, *, bias: bool = True) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net.to(DT)


def _data(d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, d_in, generator=g, dtype=DT), torch.randn(4, d_out, generator=g, dtype=DT)


def _operator(cls: Any, d_in: int, d_out: int, seed: int = 0, **kwargs: Any) -> Any:
    net = _linear(d_in, d_out, seed, bias=kwargs.pop("bias", True))
    return cls(net, nn.MSELoss(), _data(d_in, d_out, seed), **kwargs)


def test_same_names_other_shapes_are_refused_naming_the_operand() -> None:
    Ha, Hb = _operator(HessianOperator, 2, 6), _operator(HessianOperator, 1, 9)
    assert Ha.shape == Hb.shape == (18, 18) and Ha.param_names == Hb.param_names
    assert parameter_shapes_of(Ha) == ((6, 2), (6,))
    with pytest.raises(ValueError, match=r"'B'.*same shapes.*'weight': \(6, 2\) vs \(9, 1\)"):
        Ha + Hb
    with pytest.raises(ValueError, match=r"'B'.*same shapes"):
        Ha - Hb
    with pytest.raises(ValueError, match="same shapes"):
        Ha @ Hb
    with pytest.raises(ValueError, match="same shapes"):
        2.0 * Ha + Hb.shift(1.0)
    with pytest.raises(ValueError, match=r"'approximation'.*same shapes"):
        compare(Hb, Ha)


def test_transposed_weights_of_equal_size_are_refused() -> None:
    """``(6, 2)`` and ``(2, 6)``: 12 entries each, row-major orders that do not match."""
    Ha = _operator(HessianOperator, 2, 6, bias=False)
    Hb = _operator(HessianOperator, 6, 2, bias=False)
    with pytest.raises(ValueError, match=r"\(6, 2\) vs \(2, 6\)"):
        check_same_parameters(Ha, Hb, "other")


def test_kfac_and_its_inverse_carry_their_coordinates() -> None:
    K = _operator(KFACOperator, 2, 6)
    Hb = _operator(HessianOperator, 1, 9)
    assert parameter_shapes_of(K.inverse(0.1)) == ((6, 2), (6,))
    with pytest.raises(ValueError, match="same shapes"):
        K + Hb
    with pytest.raises(ValueError, match="same shapes"):
        K.inverse(0.1) @ Hb


def test_an_inverse_over_other_parameter_names_is_refused() -> None:
    net = nn.Sequential(_linear(3, 3, 0), nn.Tanh(), _linear(3, 3, 1))
    data = _data(3, 3, 2)
    K2 = KFACOperator(net, nn.MSELoss(), data, params=["2.weight"])
    H0 = HessianOperator(net, nn.MSELoss(), data, params=["0.weight"])
    with pytest.raises(ValueError, match="same parameters"):
        K2.inverse(0.1) + H0


def test_block_operators_carry_the_shapes_of_their_parameters() -> None:
    net_a, net_b = _linear(2, 6, 0), _linear(1, 9, 0)
    B = per_block(
        HessianOperator, net_a, nn.MSELoss(), _data(2, 6, 0), {"w": ["weight"], "b": ["bias"]}
    )
    Hb = HessianOperator(net_b, nn.MSELoss(), _data(1, 9, 0))
    assert parameter_shapes_of(B) == ((6, 2), (6,))
    with pytest.raises(ValueError, match="same shapes"):
        B + Hb


def test_same_names_and_shapes_still_combine() -> None:
    """Two checkpoints of one architecture: the same coordinates."""
    Ha, Hb = _operator(HessianOperator, 2, 6, seed=0), _operator(HessianOperator, 2, 6, seed=1)
    K = _operator(KFACOperator, 2, 6, seed=1)
    v = torch.ones(18, dtype=DT)
    torch.testing.assert_close((Ha + Hb) @ v, Ha @ v + Hb @ v)
    torch.testing.assert_close((Ha - K.inverse(0.5)) @ v, Ha @ v - K.inverse(0.5) @ v)
