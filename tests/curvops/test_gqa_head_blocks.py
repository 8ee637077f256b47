"""transformer_blocks under grouped-query attention (fewer key/value heads than query heads).

Llama's separate ``k_proj``/``v_proj`` and Phi-3's fused ``qkv_proj`` have
``num_key_value_heads`` heads (read from the config), each shared by a group of query
heads: ``"(k, kv-head j)"`` is one real key head, checked by perturbation (its entries
move the attention of exactly the query heads of group ``j``) and against the dense
float64 Hessian.  Without a config the key/value head count comes from ``kv_heads=``;
a key projection narrower than the query's with no count is refused naming ``heads``.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from curvops import HessianOperator, per_block, transformer_blocks
from curvops.blocks import ParamSlice
from curvops.losses import sequence_cross_entropy
from curvops.testing import dense_hessian

transformers = pytest.importorskip("transformers")

HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4, 2, 2, 11
ATTN = "model.layers.0.self_attn"


def _rms_norm_in_own_dtype(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without HF's cast to float32 (a float64 reference then stays float64)."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


def build(name: str, attn: str = "eager") -> nn.Module:
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[name]
    config = config_cls(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=8,
        num_hidden_layers=1,
        vocab_size=VOCAB,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=False,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = model_cls(config).double().eval()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_in_own_dtype, module)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))


def expected_labels(name: str) -> list[str]:
    if name == "llama":
        return [
            *(f"{ATTN}.q_proj (q, head {h})" for h in range(HEADS)),
            *(f"{ATTN}.k_proj (k, kv-head {j})" for j in range(KV_HEADS)),
            *(f"{ATTN}.v_proj (v, kv-head {j})" for j in range(KV_HEADS)),
        ]
    return [
        *(f"{ATTN}.qkv_proj (q, head {h})" for h in range(HEADS)),
        *(f"{ATTN}.qkv_proj (k, kv-head {j})" for j in range(KV_HEADS)),
        *(f"{ATTN}.qkv_proj (v, kv-head {j})" for j in range(KV_HEADS)),
    ]


def per_head(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention weights ``(batch, head, query, key)`` and the heads' outputs (the input
    of ``o_proj``) as ``(batch, position, head, head_dim)``."""
    seen = {}
    o_proj = model.get_submodule(f"{ATTN}.o_proj")
    hook = o_proj.register_forward_pre_hook(lambda _, args: seen.update(x=args[0].detach()))
    try:
        with torch.no_grad():
            out = model(input_ids=x, output_attentions=True)
    finally:
        hook.remove()
    outputs = seen["x"].reshape(*x.shape, HEADS, HEAD_DIM)
    return out.attentions[0].detach(), outputs


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_key_value_blocks_are_the_real_grouped_heads(name: str):
    model, x = build(name), tokens()
    blocks = transformer_blocks(model, heads=HEADS)
    attention = [label for label in blocks if label.startswith(ATTN) and "o_proj" not in label]
    assert attention == expected_labels(name)
    sizes = [
        model.get_parameter(s.name).numel() if s.index is None else s.index.numel()
        for slices in blocks.values()
        for s in slices
    ]
    assert sum(sizes) == sum(p.numel() for p in model.parameters())
    weights, outputs = per_head(model, x)
    group = HEADS // KV_HEADS
    g = torch.Generator().manual_seed(2)
    for label in attention:
        role, number = label.split("(")[1][0], int(label.rstrip(")").split()[-1])
        (piece,) = blocks[label]
        param = model.get_parameter(piece.name)
        saved = param.detach().clone()
        with torch.no_grad():
            param.view(-1)[piece.index] += torch.randn(
                piece.index.numel(), generator=g, dtype=param.dtype
            )
        moved_w, moved_o = per_head(model, x)
        with torch.no_grad():
            param.copy_(saved)
        heads = {number} if role == "q" else set(range(number * group, (number + 1) * group))
        for h in range(HEADS):
            w_moved = not torch.equal(moved_w[:, h], weights[:, h])
            o_moved = not torch.equal(moved_o[:, :, h], outputs[:, :, h])
            assert (w_moved or o_moved) == (h in heads), (label, h)
            assert w_moved == (h in heads and role != "v"), (label, h)


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_grouped_head_blocks_are_the_dense_hessian_sub_blocks(name: str):
    model = build(name, "sdpa")
    x = tokens()
    data, loss = ({"input_ids": x[:, :-1]}, x[:, 1:]), sequence_cross_entropy()
    selection = [n for n, _ in model.named_parameters() if ".self_attn." in n and "o_proj" not in n]
    B = per_block(HessianOperator, model, loss, data, heads=HEADS, params=selection)
    assert list(B.labels) == expected_labels(name)
    full = dense_hessian(model, loss, data, params=selection).numpy()
    offsets, start = {}, 0
    for n in selection:
        offsets[n], start = start, start + model.get_parameter(n).numel()
    blocks = transformer_blocks(model, heads=HEADS, params=selection)
    rng = np.random.default_rng(0)
    for label, slices in blocks.items():
        idx = np.concatenate([offsets[s.name] + s.index.numpy() for s in slices])
        sub = full[np.ix_(idx, idx)]
        X = rng.standard_normal((idx.size, 2))
        tol = 1e-11 * np.abs(full).max()
        np.testing.assert_allclose(B.block(label) @ X, sub @ X, rtol=1e-9, atol=tol)


def test_config_head_count_and_heads_none_on_grouped_models():
    model = build("llama")
    with pytest.raises(ValueError, match=r"Argument 'heads'.*num_attention_heads = 4.*grouped"):
        transformer_blocks(model, heads=2)  # would pair query and key heads wrongly
    labels = list(transformer_blocks(model))
    assert [f"{ATTN}.{r}_proj ({r})" for r in "qkv"] == [x for x in labels if "_proj (" in x][:3]
    phi = transformer_blocks(build("phi3"))  # fused, not split in equal thirds
    rows = {r: phi[f"{ATTN}.qkv_proj ({r})"][0].index for r in "qkv"}
    width = HEADS * HEAD_DIM
    assert rows["q"].tolist() == list(range(HEADS * HEAD_DIM * width))
    assert rows["k"].numel() == rows["v"].numel() == KV_HEADS * HEAD_DIM * width


class Grouped(nn.Module):
    """Grouped-query attention without a config: 4 query heads of width 2, 2 key/value heads."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.q_proj = nn.Linear(8, 8)
        self.attn.k_proj = nn.Linear(8, 4)
        self.attn.v_proj = nn.Linear(8, 4)
        self.attn.o_proj = nn.Linear(8, 8)


def test_without_config_kv_heads_is_needed_and_checked():
    model = Grouped()
    with pytest.raises(ValueError, match=r"Argument 'heads'.*grouped-query.*kv_heads"):
        transformer_blocks(model, heads=4)
    blocks = transformer_blocks(model, heads=4, kv_heads=2)
    assert list(blocks) == [
        *(f"attn.q_proj (q, head {h})" for h in range(4)),
        *(f"attn.k_proj (k, kv-head {j})" for j in range(2)),
        *(f"attn.v_proj (v, kv-head {j})" for j in range(2)),
        "attn.o_proj (attn out)",
    ]
    weight, bias = blocks["attn.k_proj (k, kv-head 1)"]
    assert weight.index.tolist() == list(range(16, 32)) and bias.index.tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"Argument 'kv_heads'.*key projection has 4"):
        transformer_blocks(model, heads=4, kv_heads=4)
    with pytest.raises(ValueError, match=r"Argument 'kv_heads'.*divisor of heads = 4"):
        transformer_blocks(model, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match=r"Argument 'kv_heads'.*divisor of heads = None"):
        transformer_blocks(model, kv_heads=2)
    assert isinstance(blocks["attn.q_proj (q, head 0)"][0], ParamSlice)
