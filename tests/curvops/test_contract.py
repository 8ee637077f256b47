"""The operator contract helper itself, and the data/loss input contract of the operators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvops.data import as_data
from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.structured import Dense
from curvops.testing import check_operator_contract, dense_ggn

from .conftest import make_inputs, make_mlp, make_targets


def test_contract_passes_for_dense_and_detects_wrong_reference() -> None:
    A = np.random.default_rng(0).standard_normal((5, 5))
    A = A @ A.T
    check_operator_contract(Dense(A), A)
    wrong = A.copy()
    wrong[0, 1] += 1e-6
    wrong[1, 0] += 1e-6
    with pytest.raises(AssertionError, match="vs dense"):
        check_operator_contract(Dense(A), wrong)


def test_contract_detects_false_psd_flag() -> None:
    model = make_mlp()
    data = (make_inputs("mlp", 5), make_targets("ce", 5))
    G = GGNOperator(model, nn.CrossEntropyLoss(), data)
    D = dense_ggn(model, nn.CrossEntropyLoss(), data)
    check_operator_contract(G, D, rtol=1e-10)
    with pytest.raises(AssertionError):
        check_operator_contract(G, D - 0.1 * torch.eye(D.shape[0], dtype=D.dtype), rtol=1e-10)


def test_operator_is_scipy_linear_operator_with_declared_dtype() -> None:
    import scipy.sparse.linalg as sla

    model = make_mlp().float()
    data = (make_inputs("mlp", 4).float(), make_targets("ce", 4))
    H = HessianOperator(model, nn.CrossEntropyLoss(), data)
    assert isinstance(H, sla.LinearOperator)
    assert H.dtype == np.float32 and H.torch_dtype == torch.float32
    y = H @ np.ones(H.shape[0], dtype=np.float32)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    t = H @ torch.ones(H.shape[0])
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert H.template_vector().shape == (H.shape[0],)
    assert H.num_samples == 4 and H.model is model


def test_data_forms_and_errors() -> None:
    x, y = make_inputs("mlp", 7), make_targets("ce", 7)
    assert as_data((x, y)).is_single_batch
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    stream = as_data(loader)
    assert stream.num_samples == 7 and [b.size for b in stream] == [3, 3, 1]
    assert as_data(DataLoader(TensorDataset(x, y), batch_size=3, drop_last=True)).num_samples == 6
    with pytest.raises(ValueError, match="at least one batch"):
        as_data([])
    with pytest.raises(ValueError, match="batch 1"):
        as_data([(x, y), (x[:2], y[:3])])
    # batches may differ past the sample dimension (dynamic padding): a wrong feature
    # size is found by running the model on the batch at construction (a list), or is
    # the model's shape error at the first product with a note naming the batch (a loader)
    model, loss_fn = make_mlp().to(x.dtype), nn.CrossEntropyLoss()
    d = int(x.shape[1])
    different = [(x, y), (torch.zeros(2, d + 1, dtype=x.dtype), y[:2])]
    as_data(different)
    with pytest.raises(ValueError, match=r"data \(batch 1\).*inputs the model accepts"):
        HessianOperator(model, loss_fn, different)
    P = sum(p.numel() for p in model.parameters())
    loader = DataLoader(different, batch_size=None)
    with pytest.raises(RuntimeError) as raised:
        HessianOperator(model, loss_fn, loader) @ np.ones(P)
    assert "data (batch 1)" in raised.value.__notes__[-1]
    assert f"({d + 1},) / () differ from batch 0's ({d},) / ()" in raised.value.__notes__[-1]
    with pytest.raises(ValueError, match="at least one sample"):
        as_data((x[:0], y[:0]))
    with pytest.raises(TypeError):
        as_data(x)
    with pytest.raises(TypeError, match="one-shot"):
        as_data(iter([(x, y)]))
    with pytest.raises(ValueError, match="non-empty"):
        as_data(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=2))


def test_model_with_tuple_and_dict_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 3)

        def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.a(u) + torch.tanh(self.b(v))

    model = TwoInputs().double()
    u, v, y = make_inputs("mlp", 5), make_inputs("mlp", 5, seed=9), make_targets("ce", 5)
    H1 = HessianOperator(model, nn.CrossEntropyLoss(), ((u, v), y)).to_dense()
    H2 = HessianOperator(model, nn.CrossEntropyLoss(), ({"u": u, "v": v}, y)).to_dense()
    assert torch.equal(H1, H2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "diagonal"])
def test_operators_on_gpu_match_cpu(kind: str) -> None:
    from curvops.diagonal import ggn_diagonal
    from curvops.fisher import FisherOperator

    from .conftest import make_cnn

    x, y = make_inputs("cnn", 6), make_targets("ce", 6)
    cpu, gpu = make_cnn(), make_cnn().cuda()
    loss = nn.CrossEntropyLoss()
    if kind == "diagonal":
        d_cpu = ggn_diagonal(cpu, loss, (x, y), bn_mode="train")
        d_gpu = ggn_diagonal(gpu, loss, (x, y), bn_mode="train")
        assert d_gpu.device.type == "cuda"
        assert torch.allclose(d_gpu.cpu(), d_cpu, rtol=1e-10, atol=1e-14)
        return
    cls = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}[kind]
    A_cpu, A_gpu = cls(cpu, loss, (x, y), bn_mode="train"), cls(gpu, loss, (x, y), bn_mode="train")
    v = torch.randn(A_cpu.shape[0], dtype=torch.float64)
    out = A_gpu @ v.cuda()
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), A_cpu @ v, rtol=1e-10, atol=1e-14)
    check_operator_contract(A_gpu, A_cpu.to_dense(), rtol=1e-10)
