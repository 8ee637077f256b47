"""Compiled and scripted models: a ``torch.compile`` wrapper is unwrapped (its eager
module is the same function with the same parameters; compiled graphs have no double
backward and products raised PyTorch's RuntimeError), compiled or TorchScript
submodules and TorchScript models are refused naming ``model`` and the submodule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops import GGNOperator, HessianOperator, KFACOperator, ggn_diagonal
from curvops.stats import loss_stats
from curvops.testing import dense_ggn, dense_hessian

from .conftest import small_batch, small_classifier

F64 = torch.float64


_model, _batch = small_classifier, small_batch


def test_a_compiled_model_is_its_eager_module() -> None:
    eager = _model()
    compiled = torch.compile(eager)  # lazy: nothing is compiled by these tests
    data, loss = _batch(), nn.CrossEntropyLoss()
    v = torch.randn(38, dtype=F64, generator=torch.Generator().manual_seed(2))
    H = HessianOperator(compiled, loss, data)
    assert H.model is eager
    assert torch.allclose(H @ v, dense_hessian(eager, loss, data) @ v, rtol=1e-12, atol=1e-14)
    G = GGNOperator(compiled, loss, data)
    assert torch.allclose(G @ v, dense_ggn(eager, loss, data) @ v, rtol=1e-12, atol=1e-14)
    assert torch.equal(KFACOperator(compiled, loss, data) @ v, KFACOperator(eager, loss, data) @ v)
    assert torch.equal(ggn_diagonal(compiled, loss, data), ggn_diagonal(eager, loss, data))
    assert loss_stats(compiled, loss, data, num_probes=2) == loss_stats(
        eager, loss, data, num_probes=2
    )


def test_a_compiled_submodule_is_refused_by_name() -> None:
    model = _model()
    model[2] = torch.compile(model[2])
    for build in (
        lambda: HessianOperator(model, nn.CrossEntropyLoss(), _batch()),
        lambda: KFACOperator(model, nn.CrossEntropyLoss(), _batch()),
        lambda: ggn_diagonal(model, nn.CrossEntropyLoss(), _batch()),
    ):
        with pytest.raises(ValueError, match=r"'model'.*submodule '2' is compiled with torch"):
            build()


def test_torchscript_is_refused() -> None:
    scripted = torch.jit.script(_model())
    with pytest.raises(TypeError, match=r"'model'.*TorchScript"):
        GGNOperator(scripted, nn.CrossEntropyLoss(), _batch())
    model = _model()
    model[1] = torch.jit.script(nn.Tanh())
    with pytest.raises(ValueError, match=r"submodule '1' is a TorchScript module"):
        HessianOperator(model, nn.CrossEntropyLoss(), _batch())
