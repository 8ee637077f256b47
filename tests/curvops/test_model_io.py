"""Structured model inputs and outputs (issue 15 item 3): dicts, tuples, ModelOutput, output_fn."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator
from curvops.model_io import check_output_fn, select_output
from curvops.testing import dense_fisher, dense_ggn, dense_hessian


class Plain(nn.Module):
    """Masked mean-pooled embedding classifier on token ids: the reference (one tensor out)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(6, 3, generator=g, dtype=torch.float64))
        self.head = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.emb[input_ids])  # (B, T, 3)
        m = attention_mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1)
        return pooled @ self.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.logits(input_ids, attention_mask)


class DictIn(Plain):
    """Keyword inputs, a ModelOutput-like ordered dict out (``loss`` first, as HF)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        logits = self.logits(input_ids, attention_mask)
        return OrderedDict(loss=logits.sum(), logits=logits, hidden=logits.detach())


class TupleOut(Plain):
    """Positional inputs, a tuple out whose *second* item is the one wanted."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        logits = self.logits(input_ids, attention_mask)
        return (logits.detach() * 0, logits)


def _batch(seed: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (b, 5), generator=g)
    mask = torch.ones(b, 5, dtype=torch.long)
    mask[0, 3:] = 0  # one padded sequence
    return ids, mask, torch.randint(0, 4, (b,), generator=g)


@pytest.mark.parametrize(
    ("kind", "dense"),
    [
        ("hessian", dense_hessian),
        ("ggn", dense_ggn),
        ("fisher", dense_fisher),
    ],
)
def test_dict_inputs_and_structured_outputs_match_the_plain_model(kind, dense):
    batches = [_batch(1, 3), _batch(2, 2)]
    plain, keyed, tupled = Plain(), DictIn(), TupleOut()
    loss = nn.CrossEntropyLoss()
    ref = dense(plain, loss, [((i, m), y) for i, m, y in batches]).numpy()
    X = np.random.default_rng(0).standard_normal((ref.shape[0], 2))

    def build(model: nn.Module, data: Any, **kw: Any) -> Any:
        if kind == "hessian":
            return HessianOperator(model, loss, data, **kw)
        if kind == "ggn":
            return GGNOperator(model, loss, data, **kw)
        return FisherOperator(model, loss, data, kind="mc", seed=0, **kw)

    dict_data = [({"input_ids": i, "attention_mask": m}, y) for i, m, y in batches]
    op = build(keyed, dict_data)
    assert op.num_samples == 5  # the first tensor's leading dimension, per batch
    np.testing.assert_allclose(op.matmat(X), ref @ X, rtol=1e-10, atol=1e-12)

    tuple_data = [((i, m), y) for i, m, y in batches]
    op = build(tupled, tuple_data, output_fn=lambda out: out[1])
    np.testing.assert_allclose(op.matmat(X), ref @ X, rtol=1e-10, atol=1e-12)
    # the default for a tuple is its first item (here zeros): a different matrix
    assert not np.allclose(build(tupled, tuple_data).matmat(X), ref @ X)


def test_select_output_rules_and_errors():
    t = torch.ones(2)
    assert select_output(t) is t
    assert select_output({"a": 1, "b": t}) is t  # first tensor value without 'logits'
    assert select_output([t, None]) is t
    assert select_output({"start": t, "end": -t}, lambda o: o["end"]).eq(-1).all()
    with pytest.raises(TypeError, match=r"'model output'.*output_fn.*received 'tuple'"):
        select_output(())
    with pytest.raises(TypeError, match=r"'model output'.*that output_fn returns"):
        select_output(t, lambda o: 3)
    with pytest.raises(TypeError, match=r"'output_fn'"):
        check_output_fn(3)
    with pytest.raises(TypeError, match=r"'output_fn'"):
        ids, mask, y = _batch(0, 2)
        HessianOperator(Plain(), nn.CrossEntropyLoss(), ((ids, mask), y), output_fn=1)
