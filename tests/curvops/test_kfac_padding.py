"""K-FAC and E-KFAC refuse padded batches: the input factor averages over every position a
layer sees, so attention-masked positions entered it (a padded BERT classifier's factors
changed by 13-15 % with the token ids at masked positions, where the exact GGN did not
change).  An all-ones mask is accepted and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from curvops import EKFACOperator, GGNOperator, KFACOperator
from curvops.data import Batch
from curvops.kronecker import padding_masks, refuse_padding

transformers = pytest.importorskip("transformers")

VOCAB, T = 7, 5
LAYER = "bert.encoder.layer.0.intermediate.dense"
PARAMS = [LAYER + ".weight", LAYER + ".bias"]


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=6, max_position_embeddings=16, type_vocab_size=1, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
        initializer_range=0.5,
    )  # fmt: skip
    torch.manual_seed(2)
    return transformers.BertForSequenceClassification(config).double().eval()


def batch(mask: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(2, VOCAB, (3, T), generator=g)
    inputs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    return inputs, torch.tensor([0, 2, 1])


def padded_mask() -> torch.Tensor:
    mask = torch.ones(3, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 4:] = 0
    return mask


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_padded_attention_mask_is_refused(cls: type, approx: str) -> None:
    model = bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"data \(batch 0\)") as info:
        cls(model, nn.CrossEntropyLoss(), batch(padded_mask()), params=PARAMS, approx=approx)
    message = str(info.value)
    assert "attention_mask" in message and "3 of 15 positions" in message
    assert "input factor" in message and "equal-length" in message and "exact" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the exact operators take the same batch
    GGNOperator(model, nn.CrossEntropyLoss(), batch(padded_mask()), params=PARAMS)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_all_ones_mask_equals_no_mask(cls: type) -> None:
    model = bert()
    ones = torch.ones(3, T, dtype=torch.long)
    with_mask = cls(model, nn.CrossEntropyLoss(), batch(ones), params=PARAMS).to_dense()
    without = cls(model, nn.CrossEntropyLoss(), batch(None), params=PARAMS).to_dense()
    assert torch.isfinite(with_mask).all() and float(with_mask.abs().max()) > 0
    torch.testing.assert_close(with_mask, without, rtol=1e-12, atol=1e-14)


def test_a_later_padded_batch_is_refused_in_memory_and_from_a_loader() -> None:
    model, loss = bert(), nn.CrossEntropyLoss()
    ones = torch.ones(3, T, dtype=torch.long)
    batches = [batch(ones), batch(padded_mask())]
    with pytest.raises(ValueError, match=r"data \(batch 1\).*attention_mask"):
        KFACOperator(model, loss, batches, params=PARAMS)
    loader: Any = DataLoader(batches, batch_size=None)  # the first batch passes construction
    K = EKFACOperator(model, loss, loader, params=PARAMS)
    with pytest.raises(ValueError, match=r"data \(batch 1\).*attention_mask"):
        K.to_dense()


class Encoder(nn.Module):
    """torch's TransformerEncoder with an optional key padding mask, mean-pooled head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(4, 3)

    def forward(
        self, src: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.head(self.encoder(src, src_key_padding_mask=src_key_padding_mask).mean(1))


def test_torch_transformer_encoder_without_padding_is_unchanged() -> None:
    model = Encoder().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, T, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    params = ["encoder.layers.0.linear1.weight", "encoder.layers.0.linear1.bias", "head.weight"]
    loss = nn.CrossEntropyLoss()
    plain = KFACOperator(model, loss, (x, y), params=params).to_dense()
    unpadded = torch.zeros(3, T, dtype=torch.bool)
    keyed = {"src": x, "src_key_padding_mask": unpadded}
    torch.testing.assert_close(
        KFACOperator(model, loss, (keyed, y), params=params).to_dense(), plain, rtol=0, atol=0
    )
    assert torch.allclose(plain, plain.T) and float(torch.linalg.eigvalsh(plain).min()) > -1e-12
    padded = unpadded.clone()
    padded[0, 3:] = True  # True marks padding in torch's key padding masks
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        KFACOperator(model, loss, ({"src": x, "src_key_padding_mask": padded}, y), params=params)


def test_recognised_masks() -> None:
    ids = torch.ones(2, 3, dtype=torch.long)
    keep = torch.tensor([[1, 1, 0], [1, 1, 1]])
    inputs = (
        {"input_ids": ids, "decoder_attention_mask": keep.bool()},
        {"nested": {"key_padding_mask": torch.tensor([[0.0, 0.0, float("-inf")]] * 2)}},
        {"attention_mask": torch.zeros(2, 1, 3, 3)},  # a 4-D attention bias: not inspected
    )
    found = [(path, n) for path, _, n in padding_masks(inputs)]
    assert found == [
        ("inputs[0]['decoder_attention_mask']", 1),
        ("inputs[1]['nested']['key_padding_mask']", 2),
    ]
    refuse_padding(Batch({"input_ids": ids, "attention_mask": ids}, ids, 2, 0))  # all ones
    with pytest.raises(ValueError, match=r"data \(batch 4\).*decoder_attention_mask"):
        refuse_padding(Batch(inputs[0], ids, 2, 4), "EKFACOperator")
