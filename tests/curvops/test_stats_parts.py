"""The parts of ``curvops.stats.loss_stats``: the unit direction and the weighted sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from curvops.stats import _Moments, _unit_direction


def _named() -> list[tuple[str, nn.Parameter]]:
    net = nn.Linear(3, 2).double()
    return list(net.named_parameters())


def _f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_unit_direction_is_normalised_and_cut_into_parameter_shapes() -> None:
    z = np.arange(1.0, 9.0)
    zv, parts = _unit_direction(z, _named(), seed=0)
    expected = torch.as_tensor(z) / math.sqrt(float((z**2).sum()))
    torch.testing.assert_close(zv, expected, rtol=1e-15, atol=0.0)
    assert [tuple(p.shape) for p in parts] == [(1, 2, 3), (1, 2)]
    assert torch.equal(torch.cat([p.reshape(-1) for p in parts]), zv)


def test_unit_direction_default_is_seeded_and_bad_directions_are_refused() -> None:
    a, _ = _unit_direction(None, _named(), seed=5)
    b, _ = _unit_direction(None, _named(), seed=5)
    assert torch.equal(a, b) and float(a.norm()) == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match="z"):
        _unit_direction(np.zeros(8), _named(), seed=0)
    with pytest.raises(ValueError, match="length 8"):
        _unit_direction(np.ones(7), _named(), seed=0)
    with pytest.raises(ValueError, match="z"):
        _unit_direction(np.full(8, np.inf), _named(), seed=0)


def test_moments_are_the_weighted_sums() -> None:
    moments = _Moments(gbar=_f64(0.0, 0.0), czbar=_f64(0.0, 0.0))
    moments.add(2.0, 2, 1.5, _f64(1.0, 2.0), _f64(0.0, 3.0))
    moments.add(3.0, 3, -0.5, _f64(-1.0, 0.5), _f64(2.0, 1.0))
    moments.all_reduce(None)  # no group: unchanged
    assert moments.sums == {
        "w": 5.0,
        "n": 5.0,
        "L": 2.0 * 1.5 + 3.0 * -0.5,
        "L2": 2.0 * 1.5**2 + 3.0 * 0.25,
        "g2": 2.0 * 5.0 + 3.0 * 1.25,
        "Cz2": 2.0 * 9.0 + 3.0 * 5.0,
    }
    assert moments.gbar.tolist() == [-1.0, 5.5] and moments.czbar.tolist() == [6.0, 9.0]
