"""A ``params=`` predicate sees every name of a tied parameter, like names and patterns do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops.hessian import HessianOperator
from curvops.params import select_params


class _Tied(nn.Module):
    """An embedding whose weight is also the output layer's (tied under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


def test_predicate_selects_a_tied_parameter_by_its_second_name() -> None:
    net = _Tied().double()
    by_names = select_params(net, ["head.weight", "norm.weight"])
    by_pred = select_params(net, lambda n, p: n in ("head.weight", "norm.weight"))
    assert [n for n, _ in by_names] == ["embed.weight", "norm.weight"]
    assert [n for n, _ in by_pred] == [n for n, _ in by_names]
    assert all(a is b for (_, a), (_, b) in zip(by_pred, by_names, strict=True))


def test_predicate_matching_only_the_alias_selects_the_parameter_once() -> None:
    net = _Tied().double()
    seen: list[str] = []

    def pred(name: str, p: nn.Parameter) -> bool:
        seen.append(name)
        return name.startswith("head.") or name == "embed.weight"

    chosen = select_params(net, pred)
    assert [n for n, _ in chosen] == ["embed.weight"]  # de-duplicated, first name
    assert "head.weight" in seen and "embed.weight" in seen  # every name offered
    assert [n for n, _ in select_params(net, lambda n, p: n == "head.weight")] == ["embed.weight"]


def test_hf_gpt2_predicate_equals_names() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=7, n_positions=6, n_embd=4, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    g = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(0, 7, (2, 5), generator=g)}
    y = torch.randint(0, 7, (2, 5), generator=g)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))

    names = ["lm_head.weight", "transformer.ln_f.weight"]
    by_name = HessianOperator(model, loss, (x, y), params=names)
    by_pred = HessianOperator(model, loss, (x, y), params=lambda n, p: n in names)
    assert list(by_pred.param_names) == list(by_name.param_names)
    assert list(by_name.param_names) == ["transformer.wte.weight", "transformer.ln_f.weight"]
    assert by_pred.shape == by_name.shape == (32, 32)
    only_alias = HessianOperator(model, loss, (x, y), params=lambda n, p: n == "lm_head.weight")
    assert list(only_alias.param_names) == ["transformer.wte.weight"]
