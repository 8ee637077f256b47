"""The running weighted sum of one product (curvops.curvature._WeightedSum, _read_checks)."""

from __future__ import annotations

import math

import torch

from curvops.curvature import _read_checks, _WeightedSum


def _products() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(3)]


def test_float_and_device_weights_give_the_same_bits() -> None:
    flats, weights = _products(), [3.0, 0.5, 7.0]
    host, device = _WeightedSum(unweighted=False), _WeightedSum(unweighted=False)
    for i, (flat, w) in enumerate(zip(flats, weights)):
        host.add(i, 4, flat.clone(), w)
        device.add(i, 4, flat.clone(), torch.tensor(w))
    assert host.acc is not None and device.acc is not None
    assert torch.equal(host.acc, device.acc)
    expected = sum(w * f for f, w in zip(flats, weights))
    torch.testing.assert_close(host.acc, expected, rtol=1e-15, atol=0.0)
    index, params_bad, weight = _read_checks(
        device.first_bad, torch.tensor([True, True]), device.weight
    )
    assert (index, params_bad, weight) == (-1, 0.0, 10.5) and host.weight == 10.5


def test_first_non_finite_batch_is_kept_and_zero_device_weight_is_never_bad() -> None:
    flats = _products()
    nan = torch.full((5, 2), math.nan, dtype=torch.float64)
    running = _WeightedSum(unweighted=False)
    running.add(0, 4, flats[0], 1.0)
    running.add(1, 2, nan, torch.tensor(0.0))  # every target ignored: adds zeros, not bad
    running.add(2, 3, nan.clone(), 1.0)
    running.add(3, 1, nan.clone(), 1.0)
    assert running.first_bad is not None
    index, params_bad, weight = _read_checks(
        running.first_bad, torch.tensor([True, False]), running.weight
    )
    assert index == 2 and params_bad != 0 and weight == 3.0
    assert running.sizes == {0: 4, 1: 2, 2: 3, 3: 1}


def test_unweighted_keeps_the_product_itself() -> None:
    flat = _products()[0]
    running = _WeightedSum(unweighted=True)
    running.add(0, 9, flat, 9.0)
    assert running.acc is flat and running.weight == 1.0
