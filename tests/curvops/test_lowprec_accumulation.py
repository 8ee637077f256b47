"""Low-precision operators over many batches (sweep 3, findings 1 and 4).

The weighted sum of the batch products and the total weight used to be accumulated in
the model's dtype: a float16 model over more than 65504 counted tokens got an infinite
total weight and returned exact zeros, and bfloat16 over hundreds of batches lost 8-23
unit roundoffs.  Sums are now float32 and weights float64 (:mod:`curvops.precision`),
so a list of batches has the accuracy of one batch.  References: the same operators on
a float64 copy of the *rounded* model and data (only the arithmetic differs); the bound
is the documented :math:`8u` of ``tests/curvops/test_mixed_precision.py`` (measured
0.6 u here after the fix).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from curvops import GGNOperator, HessianOperator, ggn_diagonal
from curvops.curvature import _WeightedSum
from curvops.losses import sequence_cross_entropy

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _rel(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray) -> float:
    got_t, want_t = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    return float((got_t - want_t).norm() / want_t.norm())


def _linear(dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    low = nn.Linear(3, 4).to(dtype)
    return low, copy.deepcopy(low).double()  # the same rounded weights, exactly


def test_float16_token_count_beyond_65504_is_not_infinite() -> None:
    # 2 batches x 33000 counted tokens: the float16 total weight was inf, products 0;
    # the diagonal's weighted sum (33000 x 274) overflowed to inf.
    low, high = _linear(torch.float16)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(1, 33000, 3, generator=g), torch.randint(0, 4, (1, 33000), generator=g))
        for _ in range(2)
    ]
    low_data = [(x.half(), y) for x, y in batches]
    high_data = [(x.half().double(), y) for x, y in batches]
    loss = sequence_cross_entropy()
    bound = 8 * UNIT_ROUNDOFF[torch.float16]
    v = np.random.default_rng(0).standard_normal(16)
    got = GGNOperator(low, loss, low_data) @ v
    ref = GGNOperator(high, loss, high_data) @ v
    assert np.all(np.isfinite(got)) and _rel(got, ref) <= bound
    diag = ggn_diagonal(low, loss, low_data, method="empirical")
    assert diag.dtype == torch.float16
    assert _rel(diag, ggn_diagonal(high, loss, high_data, method="empirical")) <= bound


def _many_small_batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(7, 3, generator=g).to(dtype), torch.randint(0, 4, (7,), generator=g))
        for _ in range(60)
    ]


@pytest.mark.parametrize("cls", [GGNOperator, HessianOperator], ids=["ggn", "hessian"])
def test_bfloat16_list_of_60_batches_has_the_accuracy_of_one(cls: type) -> None:
    # before: 13.7 u (GGN) and 14.1 u (Hessian); after: 0.5-0.8 u
    low, high = _linear(torch.bfloat16)
    batches = _many_small_batches(torch.bfloat16)
    loss = nn.CrossEntropyLoss()
    op = cls(low, loss, batches)
    ref = cls(high, loss, [(x.double(), y) for x, y in batches])
    V = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = op.matmat(V.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16  # the product is still in the model's dtype
    want = ref.matmat(V.to(torch.bfloat16).double())
    assert _rel(got, want) <= 8 * UNIT_ROUNDOFF[torch.bfloat16]


def test_bfloat16_gradient_and_diagonal_of_200_equal_batches() -> None:
    # Equal terms summed in bfloat16 stagnate once the sum is 2^8 times larger: before,
    # 37 u (gradient) and 27 u (diagonal); after, 0.9 u and 1.2 u.
    low, high = _linear(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 3, generator=g).bfloat16(), torch.tensor([0, 1])
    loss = nn.CrossEntropyLoss()
    low_data, high_data = [(x, y)] * 200, [(x.double(), y)] * 200
    bound = 8 * UNIT_ROUNDOFF[torch.bfloat16]
    grad = GGNOperator(low, loss, low_data).loss_gradient()
    assert grad.dtype == torch.bfloat16
    assert _rel(grad, GGNOperator(high, loss, high_data).loss_gradient()) <= bound
    diag = ggn_diagonal(low, loss, low_data)
    assert diag.dtype == torch.bfloat16
    assert _rel(diag, ggn_diagonal(high, loss, high_data)) <= bound


def test_weighted_sum_of_16_bit_products_is_float32_with_a_float64_weight() -> None:
    running = _WeightedSum(unweighted=False)
    flat = torch.full((3, 1), 0.5, dtype=torch.float16)
    for i in range(3):  # 3 x 30000 tokens counted on the device
        running.add(i, 1, flat, torch.tensor(30000))
    assert running.acc is not None and running.acc.dtype == torch.float32
    assert running.weight.dtype == torch.float64 and float(running.weight) == 90000.0
    assert torch.equal(running.acc / running.weight, torch.full((3, 1), 0.5))
