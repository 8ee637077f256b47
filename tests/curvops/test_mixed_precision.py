"""Mixed precision (issue 15 item 6): bfloat16/float16 models and torch.autocast.

Products are computed in the model's dtype and compared with the same products of a
float64 copy of the *same rounded weights* (so only the arithmetic differs).  The
bound asserted is :math:`\\|\\hat y - y\\| \\le 8u\\,\\|y\\|` column by column, with unit
roundoff :math:`u = 2^{-8}` (bfloat16) or :math:`2^{-11}` (float16); measured errors
are 1-2 :math:`u` (see :mod:`curvops.precision`).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import spectral
from curvops import GGNOperator, HessianOperator
from curvops.losses import sequence_cross_entropy
from curvops.precision import Widened, widen
from curvops.testing import dense_hessian
from nets.models import GPT

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def mlp() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return net


def mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)


def column_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (got.double() - want).norm(dim=0) / want.norm(dim=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator], ids=["hessian", "ggn"])
def test_low_precision_model_against_its_float64_copy(cls, dtype):
    low = mlp().to(dtype)
    high = copy.deepcopy(low).double()  # the same rounded weights, exactly
    x, y = mlp_data()
    op = cls(low, nn.CrossEntropyLoss(), (x.to(dtype), y))
    ref = cls(high, nn.CrossEntropyLoss(), (x.to(dtype).double(), y))
    assert op.torch_dtype == dtype  # products in the model's dtype
    assert op.dtype == np.float32 if dtype == torch.bfloat16 else op.dtype == np.float16
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = op.matmat(V.to(dtype))  # torch in, torch out, in the operator's dtype
    assert got.dtype == dtype
    want = ref.matmat(V.to(dtype).double())
    assert column_errors(got, want).max() <= 8 * UNIT_ROUNDOFF[dtype]
    # numpy callers: float32 (bf16) or float16 arrays back, the same numbers
    as_numpy = op.matmat(V.to(dtype).double().numpy())
    assert as_numpy.dtype == op.dtype
    np.testing.assert_array_equal(as_numpy, got.to(torch.float32).numpy().astype(op.dtype))


def test_bfloat16_transformer_against_its_float64_copy():
    low = GPT(7, 1, 6, n_layer=1, n_head=2, d_model=8, seed=0).to(torch.bfloat16)
    high = copy.deepcopy(low).double()
    tokens = torch.randint(0, 7, (4, 7), generator=torch.Generator().manual_seed(3))
    data = (tokens[:, :-1], tokens[:, 1:])
    loss = sequence_cross_entropy()
    op, ref = HessianOperator(low, loss, data), HessianOperator(high, loss, data)
    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(4))
    errors = column_errors(op.matmat(V.to(torch.bfloat16)), ref.matmat(V.double()))
    # the inputs of the two products differ by the rounding of V to bfloat16 (<= u/2)
    assert errors.max() <= 8 * UNIT_ROUNDOFF[torch.bfloat16]


def test_autocast_products_and_no_stale_graph_after_it():
    net, (x, y) = mlp(), mlp_data()
    op = HessianOperator(net, nn.CrossEntropyLoss(), (x, y))  # one batch: graphs cached
    ref = HessianOperator(copy.deepcopy(net).double(), nn.CrossEntropyLoss(), (x.double(), y))
    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = ref.matmat(V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = op.matmat(V.float())
    outside = op.matmat(V.float())
    assert inside.dtype == outside.dtype == torch.float32
    err_inside = column_errors(inside, want).max()
    assert 1e-4 < err_inside <= 8 * UNIT_ROUNDOFF[torch.bfloat16]  # really ran in bfloat16
    assert column_errors(outside, want).max() <= 1e-5  # float32 again: graph re-recorded


def test_lanczos_on_a_widened_bfloat16_hessian_runs_in_float64():
    low = mlp().to(torch.bfloat16)
    high = copy.deepcopy(low).double()
    x, y = mlp_data()
    H = HessianOperator(low, nn.CrossEntropyLoss(), (x.to(torch.bfloat16), y))
    W = widen(H)
    assert isinstance(W, Widened) and W.dtype == np.float64 and W.symmetric
    result = spectral.lanczos(W, 40, seed=0)
    assert result.alpha.dtype == result.beta.dtype == np.float64
    assert result.basis.dtype == torch.float64  # the basis lives in the operator's namespace
    exact = np.linalg.eigvalsh(
        dense_hessian(high, nn.CrossEntropyLoss(), (x.to(torch.bfloat16).double(), y)).numpy()
    )
    ritz = result.ritz()
    norm = np.abs(exact).max()
    # Weyl: each Ritz value is within the product error (<= 8u |H|) plus its residual
    # of an eigenvalue of the float64 Hessian; the extreme ones converge first
    bound = 8 * UNIT_ROUNDOFF[torch.bfloat16] * norm + ritz.residuals[[0, -1]]
    assert abs(ritz.values[-1] - exact[-1]) <= bound[1]
    assert abs(ritz.values[0] - exact[0]) <= bound[0]


def test_widen_refuses_narrowing_and_non_operators():
    x, y = mlp_data()
    H = HessianOperator(mlp().double(), nn.CrossEntropyLoss(), (x.double(), y))
    with pytest.raises(ValueError, match=r"Argument 'dtype'.*at least as wide"):
        widen(H, torch.float32)
    with pytest.raises(TypeError, match=r"Argument 'base'"):
        widen(np.eye(2))  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_autocast_products_through_layer_norm(cls: type) -> None:
    # under CPU autocast a float32 LayerNorm receives bfloat16 activations (layer_norm keeps
    # its dtypes there): the lean LayerNorm's double backward raised "expected scalar type
    # BFloat16 but found Float"; mixed-dtype calls now run PyTorch's own kernels
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x, y = mlp_data()
    op = cls(net, nn.CrossEntropyLoss(), (x, y))
    ref = cls(copy.deepcopy(net).double(), nn.CrossEntropyLoss(), (x.double(), y))
    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = op.matmat(V.float())
    err = column_errors(inside, ref.matmat(V)).max()
    assert 1e-4 < err <= 8 * UNIT_ROUNDOFF[torch.bfloat16]  # really ran in bfloat16
