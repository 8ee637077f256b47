"""Tied parameters, name patterns and transformer block operators (issue 15 item 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops import GGNOperator, HessianOperator
from curvops.blocks import (
    Compressed,
    ParamSlice,
    head_slices,
    per_block,
    transformer_blocks,
)
from curvops.losses import sequence_cross_entropy
from curvops.params import select_params
from curvops.structured import Dense
from curvops.testing import dense_ggn, dense_hessian
from nets.models import GPT


def small_gpt() -> GPT:
    return GPT(7, 1, 4, n_layer=1, n_head=2, d_model=4, seed=3).double()


def lm_batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(4))
    return tokens[:, :-1], tokens[:, 1:]


def global_index(model: nn.Module, slices: list[ParamSlice]) -> torch.Tensor:
    """Positions of ``slices`` in the vector of all parameters (model order)."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (start, p.numel())
        start += p.numel()
    parts = []
    for s in slices:
        first, size = offsets[s.name]
        parts.append(first + (torch.arange(size) if s.index is None else s.index))
    return torch.cat(parts)


def test_tied_parameters_count_once_and_alias_names_select_them():
    net = small_gpt()
    total = sum(p.numel() for p in net.parameters())
    H = HessianOperator(net, sequence_cross_entropy(), lm_batch())
    assert H.shape == (total, total)
    assert "lm_head.weight" not in H.param_names
    assert [n for n, _ in select_params(net, ["lm_head.weight"])] == ["transformer.wte.weight"]


def test_name_patterns_select_by_fnmatch():
    net = small_gpt()
    names = [n for n, _ in select_params(net, "transformer.h.*.attn.*")]
    assert names == [
        f"transformer.h.0.attn.{m}.{k}"
        for m in ("q_proj", "k_proj", "v_proj", "c_proj")
        for k in ("weight", "bias")
    ]
    both = [n for n, _ in select_params(net, ["*.ln_?.bias", "transformer.wpe.weight"])]
    assert both == [
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.h.0.ln_2.bias",
        "transformer.ln_f.bias",
    ]
    with pytest.raises(ValueError, match=r"Argument 'params'.*pattern.*'\*\.nothing'"):
        select_params(net, "*.nothing")


def test_gpt_partition_labels_cover_every_parameter_once():
    net = small_gpt()
    blocks = transformer_blocks(net, heads=2)
    assert list(blocks) == [
        "transformer.wte (embedding)",
        "transformer.wpe (embedding)",
        "transformer.h.0.ln_1 (norm)",
        *[f"transformer.h.0.attn.{r}_proj ({r}, head {h})" for r in "qkv" for h in (0, 1)],
        "transformer.h.0.attn.c_proj (attn out)",
        "transformer.h.0.ln_2 (norm)",
        "transformer.h.0.mlp (mlp)",
        "transformer.ln_f (norm)",
    ]
    covered = torch.cat([global_index(net, s) for s in blocks.values()])
    total = sum(p.numel() for p in net.parameters())
    assert torch.equal(covered.sort().values, torch.arange(total))


@pytest.mark.parametrize(
    ("cls", "dense"), [(HessianOperator, dense_hessian), (GGNOperator, dense_ggn)]
)
def test_per_head_blocks_are_the_dense_diagonal_blocks(cls, dense):
    net, data, loss = small_gpt(), lm_batch(), sequence_cross_entropy()
    blocks = transformer_blocks(net, heads=2)
    B = per_block(cls, net, loss, data, blocks)
    full = dense(net, loss, data)
    assert B.labels == tuple(blocks)
    rng = np.random.default_rng(0)
    for label, slices in blocks.items():
        idx = global_index(net, slices)
        x = rng.standard_normal(idx.numel())
        want = full[idx][:, idx].numpy() @ x
        np.testing.assert_allclose(B.block(label) @ x, want, rtol=1e-10, atol=1e-13)
    x = rng.standard_normal(B.shape[0])
    order = torch.cat([global_index(net, s) for s in blocks.values()])
    assert torch.equal(order.sort().values, torch.arange(B.shape[0]))
    block_dense = torch.zeros_like(full)  # the block-diagonal part, in parameter order
    for i in (global_index(net, s) for s in blocks.values()):
        block_dense[i[:, None], i[None, :]] = full[i][:, i]
    np.testing.assert_allclose(B @ x, block_dense.numpy() @ x, rtol=1e-10, atol=1e-13)


def test_fused_attention_layouts_split_into_q_k_v_heads():
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0).double().eval()
    blocks = transformer_blocks(layer, heads=2)
    q0 = blocks["self_attn (q, head 0)"]
    assert [s.name for s in q0] == ["self_attn.in_proj_weight", "self_attn.in_proj_bias"]
    assert q0[0].index.tolist() == list(range(8))  # rows 0-1 of the (12, 4) weight
    assert blocks["self_attn (v, head 1)"][1].index.tolist() == [10, 11]
    x = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = (
        x,
        torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
    )
    B = per_block(
        HessianOperator, layer, nn.MSELoss(), data, {"k1": blocks["self_attn (k, head 1)"]}
    )
    full = dense_hessian(layer, nn.MSELoss(), data)
    idx = global_index(layer, blocks["self_attn (k, head 1)"])
    v = np.ones(idx.numel())
    np.testing.assert_allclose(B @ v, full[idx][:, idx].numpy() @ v, rtol=1e-10, atol=1e-13)


def test_conv1d_style_weights_split_along_columns():
    # GPT-2's Conv1D keeps c_attn.weight as (in, 3 * out): heads are column ranges
    class Conv1D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2, 12))
            self.bias = nn.Parameter(torch.zeros(12))

    model = nn.Module()
    model.attn = nn.Module()
    model.attn.c_attn = Conv1D()
    blocks = transformer_blocks(model, heads=2)
    w, b = blocks["attn.c_attn (k, head 1)"]
    assert w.index.tolist() == [6, 7, 18, 19] and b.index.tolist() == [6, 7]


def test_compressed_operator_and_bad_slices():
    A = np.arange(16.0).reshape(4, 4)
    A = A + A.T
    C = Compressed(Dense(A), [3, 1])
    assert C.symmetric
    np.testing.assert_allclose(C @ np.array([1.0, 2.0]), A[[3, 1]][:, [3, 1]] @ [1.0, 2.0])
    with pytest.raises(ValueError, match=r"Argument 'index'.*distinct"):
        Compressed(Dense(A), [1, 1])
    with pytest.raises(ValueError, match=r"Argument 'index'.*\[0, 4\)"):
        Compressed(Dense(A), [4])
    with pytest.raises(ValueError, match=r"Argument 'num_heads'"):
        head_slices((6, 2), "w", 4)
    net = small_gpt()
    bad = {"x": [ParamSlice("transformer.wpe.weight", torch.tensor([16]))]}
    with pytest.raises(ValueError, match=r"Argument 'blocks'.*\[0, 16\)"):
        per_block(HessianOperator, net, sequence_cross_entropy(), lm_batch(), bad)
    with pytest.raises(KeyError, match=r"No block 'nope'"):
        per_block(
            HessianOperator, net, sequence_cross_entropy(), lm_batch(), {"a": "*.bias"}
        ).block("nope")
