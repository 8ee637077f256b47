"""Only rounding of values that vary with the parameters limits the products' precision.

A float64 Hugging Face Llama (Mistral, Qwen2) computes its rotary ``cos``/``sin`` in
float32 from position ids and the ``inv_freq`` buffer: constants, rounded the same way in
every pass, which leave the products float64-precise (2e-16 against the dense reference
with the RMSNorm kept in float64).  The construction's warning blamed ``rotary_emb``
(and warned for a model whose products were exact); it now names the first rounding of a
value computed from the parameters, stock Llama's float32 RMSNorm, and says nothing when
only constants are rounded.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from torch import nn

from curvops import GGNOperator, HessianOperator
from curvops.losses import sequence_cross_entropy
from curvops.testing import dense_hessian

DT = torch.float64


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "curvops.precision"]


class _Rotary(nn.Module):
    """Adds float32 position constants (from a buffer and ``arange``) to its input, and
    optionally rounds its input itself (``rounds_input``)."""

    def __init__(self, rounds_input: bool = False, through_view: bool = False) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=DT))
        self.rounds_input, self.through_view = rounds_input, through_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[0]).float()
        angles = self.inv_freq.float()[None, :] * positions[:, None]  # float32 constants
        out = x + torch.cos(angles).to(x.dtype)
        if self.through_view:  # a variable value written into a constant's view
            buffer = torch.zeros(x.shape, dtype=x.dtype)
            buffer[:, :2] = out[:, :2]
            return buffer.float().to(x.dtype) + out
        return out.float().to(x.dtype) if self.rounds_input else out


def _net(inner: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), inner, nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, generator=gen, dtype=DT), torch.tensor([0, 1, 1, 0, 1])


@pytest.mark.parametrize("kind", [HessianOperator, GGNOperator])
def test_rounded_constants_are_not_reported(kind: type, caplog: pytest.LogCaptureFixture) -> None:
    model = _net(_Rotary())
    with caplog.at_level(logging.WARNING, logger="curvops.precision"):
        op = kind(model, nn.CrossEntropyLoss(), _data())
    assert _warnings(caplog) == []
    if kind is HessianOperator:  # and the products are float64-precise
        dense = dense_hessian(model, nn.CrossEntropyLoss(), _data())
        torch.testing.assert_close(op.to_dense(), dense, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("through_view", [False, True])
def test_rounded_values_of_the_parameters_are_reported(
    through_view: bool, caplog: pytest.LogCaptureFixture
) -> None:
    model = _net(_Rotary(rounds_input=True, through_view=through_view))
    with caplog.at_level(logging.WARNING, logger="curvops.precision"):
        HessianOperator(model, nn.CrossEntropyLoss(), _data())
    (message,) = _warnings(caplog)
    assert "module '1' (_Rotary)" in message and "torch.float64 tensors to torch.float32" in message


def _rms_norm_in_own_dtype(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("family", ["Llama", "Mistral", "Qwen2"])
def test_hf_rotary_constants_are_not_blamed(family: str, caplog: pytest.LogCaptureFixture) -> None:
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{family}Config")(
        vocab_size=7, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).to(DT)
    ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(2))
    batch = ({"input_ids": ids}, ids)
    with caplog.at_level(logging.WARNING, logger="curvops.precision"):
        HessianOperator(model, sequence_cross_entropy(), batch)
    (message,) = _warnings(caplog)  # stock: the RMSNorm really rounds to float32
    assert f"first in module 'model.layers.0.input_layernorm' ({family}RMSNorm)" in message
    assert "rotary" not in message
    caplog.clear()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_in_own_dtype, module)
    with caplog.at_level(logging.WARNING, logger="curvops.precision"):
        HessianOperator(model, sequence_cross_entropy(), batch)
    assert _warnings(caplog) == []
