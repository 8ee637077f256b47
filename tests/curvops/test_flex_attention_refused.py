"""A model calling a higher-order operator (Hugging Face's ``flex_attention``, ``torch.cond``)
is refused clearly when an operator is built: a ``ValueError`` naming ``model``, the module
and the operator, with what to use instead.  Before, the construction's dispatch mode failed
with "There was no rule registered for HigherOrderOperator flex_attention and mode
<curvops.op_provenance._FirstCall ...>" (float32/float64 models); products cannot
differentiate through such operators anyway (on the CPU flex attention has no backward at
all, and ``torch.cond`` needs ``torch.compile``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from curvops import GGNOperator, HessianOperator, KFACOperator
from curvops.losses import sequence_cross_entropy
from curvops.op_provenance import first_matching_call


def _flex_llama(dtype: torch.dtype) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=7, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
        bos_token_id=0, eos_token_id=0, attn_implementation="flex_attention",
    )  # fmt: skip
    torch.manual_seed(0)
    try:
        model = transformers.LlamaForCausalLM(config)
    except (ImportError, ValueError, RuntimeError) as error:  # pragma: no cover
        pytest.skip(f"transformers does not build flex_attention here: {error}")
    if model.config._attn_implementation != "flex_attention":  # pragma: no cover
        pytest.skip("transformers chose another attention implementation")
    return model.to(dtype).eval()


def _projections(name: str, parameter: nn.Parameter) -> bool:
    """The ``Linear`` layers' parameters (K-FAC's blocks)."""
    return "proj" in name


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", [HessianOperator, GGNOperator, KFACOperator])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_hf_flex_attention_is_refused_clearly(kind: type, dtype: torch.dtype) -> None:
    model = _flex_llama(dtype)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 7, (2, 5), generator=g)}
    targets = torch.randint(0, 7, (2, 5), generator=g)
    linear = _projections
    with pytest.raises(ValueError, match="Argument 'model'") as info:
        kind(model, sequence_cross_entropy(), (batch, targets), params=linear)
    message = str(info.value)
    assert "module 'model.layers.0.self_attn' (LlamaAttention) calls flex_attention" in message
    assert "higher-order operator not supported for curvature products" in message
    assert "attn_implementation='sdpa' or 'eager'" in message
    assert "_FirstCall" not in message and "no rule registered" not in message
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    model.set_attn_implementation("sdpa")  # the suggested fix works
    assert kind(model, sequence_cross_entropy(), (batch, targets), params=linear).shape[0] > 0


class _Cond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.inner(x)
        return torch.cond(h.sum() > 0, lambda t: torch.tanh(t), lambda t: t - 1, (h,))


def test_torch_cond_is_refused_naming_the_operator() -> None:
    model = _Cond().double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"Argument 'model'.*\(_Cond\) calls cond, a higher"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, torch.tensor([0, 1, 0, 1])))


def test_the_diagnostic_mode_notes_higher_order_operators() -> None:
    """Without ``on_higher_order`` they are noted and run (torch's ``cond`` then needs
    ``torch.compile``, which a dispatch mode turns off: its own error, not "no rule
    registered for HigherOrderOperator")."""
    model = _Cond().double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with first_matching_call(model, lambda *_: False) as call:
        try:
            model(x)
        except Exception as error:  # torch's own, from inside cond
            assert "no rule registered" not in str(error)
    assert call.higher_order == [("", "cond")]
