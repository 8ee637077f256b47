"""ParamSlice ``index``: integer positions in any container, boolean masks, slices; floats,
negative, repeated and empty indices refused naming ``index``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops import HessianOperator, per_block
from curvops.blocks import ParamSlice
from curvops.testing import dense_hessian


def net_and_data() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, dtype=torch.float64, generator=g)
    return net, (x, torch.randint(0, 2, (10,), generator=g)), nn.CrossEntropyLoss()


def reference(net: nn.Module, data: tuple, loss: nn.Module, name: str) -> np.ndarray:
    return dense_hessian(net, loss, data, params=[name]).numpy()


@pytest.mark.parametrize(
    "index",
    [torch.tensor([2, 0]), [2, 0], np.array([2, 0]), (2, 0), np.array([2, 0], dtype=np.int32)],
    ids=["tensor", "list", "numpy", "tuple", "int32"],
)
def test_integer_positions_in_any_container(index):
    net, data, loss = net_and_data()
    H = reference(net, data, loss, "0.bias")
    B = per_block(HessianOperator, net, loss, data, {"a": [ParamSlice("0.bias", index)]})
    np.testing.assert_allclose(B.blocks[0] @ np.eye(2), H[np.ix_([2, 0], [2, 0])], atol=1e-13)


def test_boolean_mask_selects_its_true_entries():
    net, data, loss = net_and_data()
    H = reference(net, data, loss, "2.bias")
    B = per_block(
        HessianOperator, net, loss, data, {"entry 0": [ParamSlice("2.bias", [True, False])]}
    )
    assert B.blocks[0].shape == (1, 1)  # was (2, 2): the mask read as positions [1, 0]
    np.testing.assert_allclose(B.blocks[0] @ np.eye(1), H[:1, :1], atol=1e-13)
    mask = torch.zeros(4, 3, dtype=torch.bool)  # a mask of the weight's shape, row-major
    mask[1, 2] = mask[3, 0] = True
    W = reference(net, data, loss, "0.weight")
    B = per_block(HessianOperator, net, loss, data, {"w": [ParamSlice("0.weight", mask)]})
    np.testing.assert_allclose(B.blocks[0] @ np.eye(2), W[np.ix_([5, 9], [5, 9])], atol=1e-13)
    wrong = {"w": [ParamSlice("2.bias", [True, False, True])]}
    with pytest.raises(ValueError, match=r"Argument 'blocks'.*mask of 2\.bias's 2 entries"):
        per_block(HessianOperator, net, loss, data, wrong)


def test_ranges_and_slices():
    assert ParamSlice("w", range(1, 4)).index.tolist() == [1, 2, 3]
    assert ParamSlice("w", slice(0, 6, 2)).index.tolist() == [0, 2, 4]
    assert ParamSlice("w", slice(None)).index is None
    assert ParamSlice("w", torch.tensor(3)).index.tolist() == [3]
    with pytest.raises(ValueError, match=r"Argument 'index'.*slice with non-negative start"):
        ParamSlice("w", slice(2, None))
    with pytest.raises(ValueError, match=r"Argument 'index'.*slice with non-negative start"):
        ParamSlice("w", slice(-2, 4))


@pytest.mark.parametrize(
    ("index", "kind", "message"),
    [
        (torch.tensor([0.9]), TypeError, "floating-point"),  # was truncated to position 0
        ([0.0, 1.0], TypeError, "floating-point"),
        (np.array([1.5]), TypeError, "floating-point"),
        ([0, 0], ValueError, "distinct"),  # would count coordinate 0 twice
        ([1, -1], ValueError, "non-negative"),
        ([], ValueError, "at least one"),
        ([False, False], ValueError, "at least one"),
        (["a"], TypeError, "integer flat positions"),
    ],
)
def test_bad_indices_are_refused_naming_index(index, kind, message):
    with pytest.raises(kind, match=rf"Argument 'index'.*{message}"):
        ParamSlice("0.bias", index)


def test_out_of_range_positions_are_refused_by_per_block():
    net, data, loss = net_and_data()
    with pytest.raises(ValueError, match=r"Argument 'blocks'.*\[0, 2\) for 2\.bias"):
        per_block(HessianOperator, net, loss, data, {"a": [ParamSlice("2.bias", [2])]})
    with pytest.raises(TypeError, match=r"Argument 'name'"):
        ParamSlice(3)  # type: ignore[arg-type]
