"""per_block's ``params``, ``heads`` and ``kv_heads`` and labels; transformer_blocks'
``heads`` refused where it splits nothing; a block's coordinates in model order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops import HessianOperator, per_block, per_layer, transformer_blocks
from curvops.blocks import ParamSlice
from curvops.testing import dense_hessian


def net_and_data() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, dtype=torch.float64, generator=g)
    return net, (x, torch.randint(0, 3, (6,), generator=g)), nn.CrossEntropyLoss()


def dense(op) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(op @ np.eye(op.shape[1]))


def test_params_restricts_the_default_partition_like_per_layer():
    net, data, loss = net_and_data()
    B = per_block(HessianOperator, net, loss, data, params=["0.weight"])  # was a TypeError
    L = per_layer(HessianOperator, net, loss, data, params=["0.weight"])
    assert B.labels == ("0",) and B.param_names == ["0.weight"]
    H = dense_hessian(net, loss, data, params=["0.weight"]).numpy()
    np.testing.assert_allclose(dense(B), H, atol=1e-13)
    np.testing.assert_allclose(dense(B), dense(L), atol=1e-13)


def test_params_restricts_given_blocks_and_drops_emptied_ones():
    net, data, loss = net_and_data()
    blocks = {
        "first": ["0.weight", "0.bias"],
        "second": [ParamSlice("2.weight", [0, 5]), ParamSlice("2.bias", [1])],
        "gone": ["2.bias"],
    }
    B = per_block(HessianOperator, net, loss, data, blocks, params=["0.weight", "2.weight"])
    assert B.labels == ("first", "second")
    H = dense_hessian(net, loss, data, params=["0.weight", "2.weight"]).numpy()
    np.testing.assert_allclose(dense(B.block("first")), H[:12, :12], atol=1e-13)
    idx = [12, 17]
    np.testing.assert_allclose(dense(B.block("second")), H[np.ix_(idx, idx)], atol=1e-13)
    with pytest.raises(ValueError, match=r"Argument 'params'.*sharing parameters"):
        per_block(HessianOperator, net, loss, data, {"b": ["2.bias"]}, params=["0.weight"])


def test_heads_and_kv_heads_with_given_blocks_are_refused():
    net, data, loss = net_and_data()
    with pytest.raises(ValueError, match=r"Argument 'heads'.*None when blocks is given"):
        per_block(HessianOperator, net, loss, data, {"a": ["0.weight"]}, heads=2)
    with pytest.raises(ValueError, match=r"Argument 'kv_heads'.*None when blocks is given"):
        per_block(HessianOperator, net, loss, data, {"a": ["0.weight"]}, kv_heads=1)


def test_labels_equal_after_str_are_refused():
    net, data, loss = net_and_data()
    with pytest.raises(ValueError, match=r"Argument 'blocks'.*distinct after str"):
        per_block(HessianOperator, net, loss, data, {1: ["0.weight"], "1": ["2.weight"]})


class NeoXLike(nn.Module):
    """An attention module whose fused projection interleaves q, k, v per head (GPT-NeoX)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.query_key_value = nn.Linear(4, 12)
        self.attention.dense = nn.Linear(4, 4)
        self.mlp = nn.Linear(4, 4)


def test_heads_that_split_nothing_are_refused():
    model = NeoXLike()
    assert list(transformer_blocks(model)) == [
        "attention.query_key_value",
        "attention.dense (attn out)",
        "mlp (mlp)",
    ]
    with pytest.raises(ValueError, match=r"Argument 'heads'.*\['attention\.query_key_value'\]"):
        transformer_blocks(model, heads=2)  # was the same partition as heads=None
    net, data, loss = net_and_data()
    with pytest.raises(ValueError, match=r"Argument 'heads'.*left whole: none"):
        per_block(HessianOperator, net, loss, data, heads=2)
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=4)
    with pytest.raises(ValueError, match=r"Argument 'heads'"):
        transformer_blocks(layer, heads=2, params=["linear1.weight"])
    with pytest.raises(ValueError, match=r"Argument 'kv_heads'.*applies to"):
        transformer_blocks(layer, heads=2, kv_heads=1)  # MultiheadAttention has no groups
    with pytest.raises(ValueError, match=r"Argument 'heads'.*dividing dimension 0"):
        transformer_blocks(layer, heads=3)


def test_nets_gpt_heads_keep_their_labels():
    from nets.models import GPT

    gpt = GPT(7, 1, 4, n_layer=1, n_head=2, d_model=4, seed=3)
    labels = list(transformer_blocks(gpt, heads=2))
    assert "transformer.h.0.attn.k_proj (k, head 1)" in labels


def test_block_coordinates_follow_the_model_order_not_the_list_order():
    net, data, loss = net_and_data()
    blocks = {
        "b": [ParamSlice("2.weight", [5, 1]), ParamSlice("0.weight", [2, 0])],
        "repeated": [ParamSlice("0.bias", [0]), ParamSlice("0.bias", [1, 0])],
    }
    B = per_block(HessianOperator, net, loss, data, {"b": blocks["b"]})
    H = dense_hessian(net, loss, data).numpy()
    w2 = 12 + 4  # offset of 2.weight: 0.weight (12), 0.bias (4)
    own = [2, 0, w2 + 5, w2 + 1]  # the block: 0.weight first, each slice's own order
    np.testing.assert_allclose(dense(B.blocks[0]), H[np.ix_(own, own)], atol=1e-13)
    union = sorted(own)  # the operator: the union's coordinates, ascending in each parameter
    np.testing.assert_allclose(dense(B), H[np.ix_(union, union)], atol=1e-13)
    with pytest.raises(ValueError, match=r"Argument 'blocks'.*twice in one"):
        per_block(HessianOperator, net, loss, data, {"r": blocks["repeated"]})
