"""transformer_blocks on every ``nn.MultiheadAttention`` layout: fused ``in_proj_weight``,
separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` (``kdim``/``vdim`` other
than ``embed_dim``), without biases, and with ``bias_k``/``bias_v`` (``add_bias_kv``).

Each head's block holds that head's rows of the query, key or value projection, its
part of ``in_proj_bias`` and of ``bias_k``/``bias_v``: checked against the dense float64
Hessian's sub-blocks, and by perturbation (a head's entries move only that head's
attention weights, or for the value only that head's output).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import HessianOperator
from curvops.blocks import ParamSlice, per_block, transformer_blocks
from curvops.testing import dense_hessian

E, H = 4, 2
DH = E // H

VARIANTS = {
    "fused": {},
    "kdim": {"kdim": 3, "vdim": 3},
    "kdim-vdim-no-bias": {"kdim": 3, "vdim": 2, "bias": False},
    "kdim-bias-kv": {"kdim": 3, "vdim": 3, "add_bias_kv": True},
    "fused-bias-kv-no-bias": {"add_bias_kv": True, "bias": False},
    "kdim-only": {"kdim": 2},
}


class Attention(nn.Module):
    """Self-attention of ``x`` whose keys and values see the first ``kdim``/``vdim`` features."""

    def __init__(self, kdim: int | None = None, vdim: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(
            E, H, kdim=kdim, vdim=vdim, batch_first=True, **kwargs
        )
        self.kdim, self.vdim = kdim or E, vdim or E

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = torch.tanh(x[..., : self.kdim]), x[..., : self.vdim]
        out, weights = self.self_attn(x, k, v, need_weights=True, average_attn_weights=False)
        return out, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x)[0]


def build(variant: str) -> Attention:
    torch.manual_seed(0)
    model = Attention(**VARIANTS[variant]).double()
    with torch.no_grad():  # MHA zero-initialises in_proj_bias: make every entry matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 3, E, dtype=torch.float64, generator=g),
        torch.randn(2, 3, E, dtype=torch.float64, generator=g),
    )


def global_index(model: nn.Module, slices: list[ParamSlice]) -> torch.Tensor:
    """Positions of ``slices`` among all parameters (model order), in the block's order."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name], start = (start, p.numel()), start + p.numel()
    order = list(offsets)
    parts = []
    for s in sorted(slices, key=lambda s: order.index(s.name)):
        first, size = offsets[s.name]
        parts.append(first + (torch.arange(size) if s.index is None else s.index))
    return torch.cat(parts)


def head_labels(heads: int | None) -> list[str]:
    if heads is None:
        return [f"self_attn ({r})" for r in "qkv"]
    return [f"self_attn ({r}, head {h})" for r in "qkv" for h in range(heads)]


@pytest.mark.parametrize("heads", [None, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_mha_parameter_is_in_its_query_key_or_value_block(variant: str, heads: int | None):
    model = build(variant)
    blocks = transformer_blocks(model, heads=heads)
    assert list(blocks) == [*head_labels(heads), "self_attn.out_proj (attn out)"]
    covered = torch.cat([global_index(model, s) for s in blocks.values()])
    total = sum(p.numel() for p in model.parameters())
    assert torch.equal(covered.sort().values, torch.arange(total))  # each entry once
    attn, params = model.self_attn, dict(model.named_parameters())

    def positions(s: ParamSlice) -> list[int]:
        return list(range(params[s.name].numel())) if s.index is None else s.index.tolist()

    fused = attn._qkv_same_embed_dim
    rows = DH if heads else E
    for j, role in enumerate("qkv"):
        name = "self_attn.in_proj_weight" if fused else f"self_attn.{role}_proj_weight"
        width = params[name].shape[1]
        for h in range(heads or 1):
            label = f"self_attn ({role}, head {h})" if heads else f"self_attn ({role})"
            by_name = {s.name: s for s in blocks[label]}
            first = (j * E if fused else 0) + h * rows
            assert positions(by_name[name]) == list(range(first * width, (first + rows) * width))
            if attn.in_proj_bias is not None:
                first = j * E + h * rows
                bias = by_name["self_attn.in_proj_bias"]
                assert positions(bias) == list(range(first, first + rows))
            if attn.bias_k is not None and role != "q":
                extra = by_name[f"self_attn.bias_{role}"]
                assert positions(extra) == list(range(h * rows, (h + 1) * rows))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mha_head_blocks_are_the_dense_hessian_sub_blocks(variant: str):
    model, data, loss = build(variant), batch(), nn.MSELoss()
    blocks = transformer_blocks(model, heads=H)
    B = per_block(HessianOperator, model, loss, data, blocks)
    full = dense_hessian(model, loss, data).numpy()
    rng = np.random.default_rng(0)
    for label, slices in blocks.items():
        idx = global_index(model, slices).numpy()
        sub = full[np.ix_(idx, idx)]
        assert np.abs(sub).max() > 1e-8  # every block is curved
        X = rng.standard_normal((idx.size, 3))
        np.testing.assert_allclose(B.block(label) @ X, sub @ X, rtol=1e-10, atol=1e-12)


def per_head_effects(model: Attention, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each head's attention weights and output (the output projection is the identity)."""
    with torch.no_grad():
        out, weights = model.attend(x)
    return [(weights[:, h], out[..., h * DH : (h + 1) * DH]) for h in range(H)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_perturbing_a_head_block_changes_only_that_head(variant: str):
    model, (x, _) = build(variant), batch()
    with torch.no_grad():  # the heads' outputs side by side
        model.self_attn.out_proj.weight.copy_(torch.eye(E))
        if model.self_attn.out_proj.bias is not None:
            model.self_attn.out_proj.bias.zero_()
    base = per_head_effects(model, x)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    blocks = transformer_blocks(model, heads=H)
    heads = {label: slices for label, slices in blocks.items() if "head" in label}
    assert len(heads) == 3 * H
    own = [n for n, _ in model.self_attn.named_parameters() if "." not in n]
    assert {s.name for slices in heads.values() for s in slices} == {f"self_attn.{n}" for n in own}
    for label, slices in heads.items():
        role, head = label[len("self_attn (")], int(label[-2])
        saved = {s.name: params[s.name].detach().clone() for s in slices}
        with torch.no_grad():
            for s in slices:
                flat = params[s.name].view(-1)
                flat[s.index] += 0.5 * torch.randn(s.index.numel(), generator=g, dtype=flat.dtype)
        moved = per_head_effects(model, x)
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        for h in range(H):
            weights_moved = not torch.equal(moved[h][0], base[h][0])
            output_moved = not torch.equal(moved[h][1], base[h][1])
            if h != head:
                assert not weights_moved and not output_moved, (label, h)
            elif role in "qk":
                assert weights_moved, label
            else:  # the value moves the head's output, never the attention weights
                assert output_moved and not weights_moved, label
