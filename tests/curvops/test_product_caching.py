"""Per-batch Hessian graph cache for lists of batches, and the deferred finiteness check."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvops.hessian as hessian_module
from curvops.data import as_data
from curvops.fisher import FisherOperator
from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.testing import dense_hessian
from spectral.errors import NumericalError

from .conftest import (
    CallCounter,
    make_cnn,
    make_data,
    make_inputs,
    make_mlp,
    make_targets,
    random_columns,
)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _separate_batches(
    n_per: tuple[int, ...] = (4, 3, 2),
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches with their own storage (no shared version counter between batches)."""
    x, y = make_inputs("cnn", sum(n_per)), make_targets("ce", sum(n_per))
    out, start = [], 0
    for s in n_per:
        out.append((x[start : start + s].clone(), y[start : start + s].clone()))
        start += s
    return out


def test_data_is_in_memory() -> None:
    x, y = make_inputs("mlp", 9), make_targets("ce", 9)
    assert as_data((x, y)).is_in_memory
    assert as_data(make_data("list", x, y)).is_in_memory
    assert not as_data(make_data("loader", x, y)).is_in_memory


def test_list_cache_reused_and_invalidated(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = CallCounter(monkeypatch, hessian_module, "hessian_linearization")
    model, loss = make_cnn(), nn.CrossEntropyLoss()
    data = _separate_batches()
    H = HessianOperator(model, loss, data, bn_mode="train", cache=True)
    plain = HessianOperator(model, loss, data, bn_mode="train")  # default: no list cache
    X = random_columns(H.num_params, 2)
    D = dense_hessian(model, loss, data, bn_mode="train")

    Y1 = H.matmat(X)
    assert builds.calls == 3
    Y2 = H.matmat(X)
    assert builds.calls == 3  # every batch's graph reused
    assert torch.equal(Y1, Y2)
    Y_plain = plain.matmat(X)
    assert builds.calls == 6  # the default rebuilds the graphs of a list
    assert torch.equal(Y1, Y_plain)  # same operations, same bits
    assert _relative_error(Y1, D @ X) <= 1e-10

    # in-place parameter change: every batch is rebuilt and matches a fresh reference
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    builds.calls = 0
    Y3 = H.matmat(X)
    assert builds.calls == 3
    assert _relative_error(Y3, dense_hessian(model, loss, data, bn_mode="train") @ X) <= 1e-10
    assert _relative_error(Y3, Y1) > 1e-6

    # in-place change of one batch's inputs: only that batch is rebuilt
    builds.calls = 0
    with torch.no_grad():
        data[2][0].mul_(-2.0)
    Y4 = H.matmat(X)
    assert builds.calls == 1
    assert _relative_error(Y4, dense_hessian(model, loss, data, bn_mode="train") @ X) <= 1e-10

    # mode changes are part of the key too
    builds.calls = 0
    H_none = HessianOperator(model, loss, data, cache=True)  # bn_mode None: module flags
    H_none.matmat(X)
    model.eval()
    Y5 = H_none.matmat(X)
    assert builds.calls == 6
    assert _relative_error(Y5, dense_hessian(model, loss, data) @ X) <= 1e-10


def test_single_batch_default_cache_and_loader_never_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    builds = CallCounter(monkeypatch, hessian_module, "hessian_linearization")
    model, loss = make_mlp(), nn.CrossEntropyLoss()
    x, y = make_inputs("mlp", 9), make_targets("ce", 9)
    v = random_columns(sum(p.numel() for p in model.parameters()), 1)[:, 0]
    single = HessianOperator(model, loss, (x, y))
    single @ v, single @ v
    assert builds.calls == 1
    builds.calls = 0
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    H = HessianOperator(model, loss, loader, cache=True)  # ignored for a DataLoader
    y1, y2 = H @ v, H @ v
    assert builds.calls == 6
    assert torch.equal(y1, y2)
    assert _relative_error(y1, single @ v) <= 1e-12


@pytest.mark.parametrize("bad", [[1], [2], [1, 2]])
@pytest.mark.parametrize("layout", ["list", "loader"])
def test_non_finite_names_the_first_bad_batch(bad: list[int], layout: str) -> None:
    x, y = make_inputs("mlp", 9), make_targets("mse", 9)
    # sample 4 is in batch 1 and sample 8 in batch 2 of both layouts
    # (list: batches of 4, 3, 2 samples; loader: 4, 4, 1)
    sizes = {1: 3, 2: 2} if layout == "list" else {1: 4, 2: 1}
    for b in bad:
        x[{1: 4, 2: 8}[b], 1] = float("inf")
    first = bad[0]
    for cls in (HessianOperator, GGNOperator):
        op = cls(make_mlp(), nn.MSELoss(), make_data(layout, x, y))
        expected = (
            rf"{cls.__name__}: non-finite curvature product in batch {first} "
            rf"\(size {sizes[first]}\)"
        )
        with pytest.raises(NumericalError, match=expected) as info:
            op @ np.ones(op.num_params)
        # the inputs are re-checked for in-memory batches only (a DataLoader is not re-read)
        assert ("inputs of this batch" in str(info.value)) == (layout == "list")


@pytest.mark.parametrize("layout", ["single", "list", "loader"])
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, FisherOperator])
def test_a_non_finite_vector_is_named_not_the_batch(layout: str, cls: type) -> None:
    """NaN/Inf in the vector made every batch product non-finite, and the error blamed
    batch 0; the vector is the cause to name."""
    x, y = make_inputs("mlp", 9), make_targets("mse", 9)
    data = (x, y) if layout == "single" else make_data(layout, x, y)
    op = cls(make_mlp(), nn.MSELoss(), data)
    v = np.ones(op.num_params)
    v[5] = np.nan
    with pytest.raises(
        ValueError,
        match=r"'x'.*a vector of length \d+ with 1 NaN/Inf entries, the first at entry 5\.",
    ):
        op @ v
    V = torch.ones(op.num_params, 3, dtype=torch.float64)
    V[2, 1], V[4, 2] = float("inf"), float("-inf")
    with pytest.raises(
        ValueError, match=r"3 vectors .* 2 NaN/Inf entries, the first at entry 2 of vector 1\."
    ):
        op @ V
    assert np.isfinite(op @ np.ones(op.num_params)).all()  # the operator still works


def test_non_finite_parameter_is_named_for_a_loader() -> None:
    model = make_mlp()
    with torch.no_grad():
        model[3].bias[0] = float("nan")
    x, y = make_inputs("mlp", 9), make_targets("mse", 9)
    # refused when built (issue 19.4), before any product
    with pytest.raises(ValueError, match=r"'params'.*'3.bias'"):
        HessianOperator(model, nn.MSELoss(), make_data("loader", x, y))


def test_one_host_conversion_per_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """The finiteness check reads one scalar per product, whatever the number of batches."""
    model, loss = make_mlp(), nn.MSELoss()
    x, y = make_inputs("mlp", 9), make_targets("mse", 9)
    counts = {"n": 0}
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def wrapped(self: torch.Tensor, *a: Any, _f: Any = original, **k: Any) -> Any:
            counts["n"] += 1
            return _f(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for cls in (HessianOperator, GGNOperator):
        op = cls(model, loss, make_data("list", x, y))
        op @ v  # warm-up (lazy set-up may convert once)
        counts["n"] = 0
        op @ v
        assert counts["n"] == 1, cls.__name__


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, FisherOperator])
@pytest.mark.parametrize("edit", ["add-then-restore", "load-the-same-state"])
def test_cached_graphs_follow_in_place_writes_that_restore_the_values(cls: type, edit: str) -> None:
    """A write that leaves the values as they were (a trial step undone, a state
    reloaded) bumps the version counters the recorded graphs check: the next product
    raised autograd's "modified by an inplace operation" instead of rebuilding."""
    model = make_cnn().double().eval()
    x, y = make_inputs("cnn", 6), make_targets("ce", 6)
    op = cls(model, nn.CrossEntropyLoss(), (x, y))
    V = random_columns(op.shape[0], 2)
    before = op @ V
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        if edit == "add-then-restore":
            for p in model.parameters():
                saved = p.clone()
                p.add_(1.0)
                p.copy_(saved)
        else:
            model.load_state_dict(state)
    torch.testing.assert_close(op @ V, before, rtol=0, atol=0)
