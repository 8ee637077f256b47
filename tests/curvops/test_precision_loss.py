"""A model that rounds its own dtype to a lower precision in its forward pass is named.

Hugging Face's Llama takes its rotary embedding (and RMSNorm) in float32 whatever the
model's dtype, so a float64 copy of it computes a function only float32-precise and its
products agree with a float64 reference to about 1e-7.  Nothing in the numbers says so;
the construction logs a warning naming the module and the operation.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from curvops import GGNOperator, HessianOperator
from curvops.losses import sequence_cross_entropy
from curvops.precision import rounds_below

DT = torch.float64


class _RoundsInside(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().double()


def _net(inner: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), inner, nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _data(dtype: torch.dtype = DT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 3, generator=gen, dtype=dtype), torch.tensor([0, 1, 1, 0, 1]))]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "curvops.precision"]


@pytest.mark.parametrize("kind", [HessianOperator, GGNOperator])
def test_a_float32_rounding_inside_a_float64_model_is_named(
    kind: type, caplog: pytest.LogCaptureFixture
) -> None:
    model = _net(_RoundsInside())
    with caplog.at_level(logging.WARNING, logger="curvops.precision"):
        op = kind(model, nn.CrossEntropyLoss(), _data())
    (message,) = _warnings(caplog)
    assert "module '1' (_RoundsInside)" in message
    assert "torch.float64 tensors to torch.float32" in message
    assert "_to_copy" in message
    assert op.shape == (26, 26)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_model_keeping_its_dtype_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="curvops.precision"):
        HessianOperator(_net(nn.Identity()), nn.CrossEntropyLoss(), _data())
    assert _warnings(caplog) == []


def test_rounding_asked_for_by_autocast_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    model = _net(nn.Identity()).float()
    with (
        caplog.at_level(logging.WARNING, logger="curvops.precision"),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        HessianOperator(model, nn.CrossEntropyLoss(), _data(torch.float32))
    assert _warnings(caplog) == []


def test_a_half_precision_rounding_inside_a_float32_model_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Half(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.bfloat16).float()

    with caplog.at_level(logging.WARNING, logger="curvops.precision"):
        HessianOperator(_net(Half()).float(), nn.CrossEntropyLoss(), _data(torch.float32))
    (message,) = _warnings(caplog)
    assert "torch.float32 tensors to torch.bfloat16" in message
    assert "(Half)" in message


def test_rounds_below_looks_at_floating_tensors_only() -> None:
    x = torch.ones(3, dtype=DT)
    assert rounds_below(64, ((x,), {}), x.float())
    assert not rounds_below(64, ((x,), {}), x.long())  # an index is no rounding
    assert not rounds_below(64, ((x.float(),), {}), x.half())  # already below 64 bits
    assert rounds_below(32, ({"a": [x.float()]},), (x.half(), x))


def test_float64_llama_is_named(caplog: pytest.LogCaptureFixture) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DT)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING, logger="curvops.precision"):
        HessianOperator(model, sequence_cross_entropy(), [({"input_ids": ids}, ids)])
    (message,) = _warnings(caplog)
    assert "LlamaForCausalLM rounds torch.float64 tensors to torch.float32" in message
