"""The named steps the workflows are composed of (compute_loss_stats, compute_eigenspectrum,
build_loss_landscape), each on its own."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nets.workflow import compute_loss_stats
from nets.workflow._resolve import resolve_data
from nets.workflow.directions import Direction, ParamSpace
from nets.workflow.landscape import (
    _landscape_result,
    _loaders,
    _point_evaluator,
    evaluate,
)
from nets.workflow.loss_stats import STATS_KEYS, StatsTable, checkpoint_stats, stats_loaders
from nets.workflow.spectrum import _checked_arguments, _first_probe_outputs, _pooled


def data():  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return resolve_data((TensorDataset(x, y), TensorDataset(x[:8], y[:8])))


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()


# ----------------------------------------------------------------------------- loss statistics


def test_stats_table_rows_state_and_output() -> None:
    table = StatsTable()
    row = {key: float(i) for i, key in enumerate(STATS_KEYS)}
    table.append({**row, "num_batches": 2, "num_samples": 24}, None, "net")
    table.append({**row, "num_batches": 2, "num_samples": 24}, 3, None)
    assert table.epochs == [-1, 3] and table.names == ["net", None]
    arrays = table.arrays()
    saved = SimpleNamespace(arrays=arrays, meta={"done": 1})
    again = StatsTable.from_state(saved, 2)
    assert again.epochs == [-1] and again.names == ["net"]
    assert again.rows == {key: [row[key]] for key in STATS_KEYS}
    assert StatsTable.from_state(None, 2).epochs == []
    out = table.output(["a.pt", None], "hessian", {"function": "x"})
    assert list(out["checkpoints"]) == ["a.pt", ""] and str(out["curvature"]) == "hessian"
    np.testing.assert_array_equal(out["num_samples"], [24, 24])


def test_stats_loaders_and_one_checkpoints_row_equal_compute_loss_stats() -> None:
    d = data()
    splits = stats_loaders(d, 8, subsample=None, seed=0, group=None)
    assert splits.train is splits.train_all and splits.test is not None
    torch.manual_seed(0)  # no BatchNorm: the workflow's copy of the module evaluates the same
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    loss = nn.CrossEntropyLoss()
    stats = checkpoint_stats(
        model, loss, splits, group=None, curvature="hessian", direction=None, seed=0,
        frobenius_probes=2, params=None, bn_mode="train",
    )  # fmt: skip
    whole = compute_loss_stats(
        (d.train, d.test), model=model, batch_size=8, frobenius_probes=2, device="cpu"
    )
    for key in STATS_KEYS:
        assert stats[key] == pytest.approx(float(whole[key][0]), rel=1e-12, abs=1e-300), key
    assert stats["train_loss"] == evaluate(model, splits.train, loss)[0]


# ----------------------------------------------------------------------------- spectrum


def test_checked_arguments_name_the_bad_one() -> None:
    counts = {"lanczos_iters": 5, "num_probes": 1, "checkpoint_every": 1, "batch_size": 4}
    assert _checked_arguments("ggn-lanczos", "train", None, False, seed=0, **counts) == (
        "ggn",
        "train",
    )
    with pytest.raises(ValueError, match="num_probes"):
        _checked_arguments("hessian", None, None, False, seed=0, **{**counts, "num_probes": 0})
    with pytest.raises(ValueError, match="fit"):
        _checked_arguments("hessian", None, "gauss", False, seed=0, **counts)
    with pytest.raises(TypeError, match="save_eigvec"):
        _checked_arguments("hessian", None, None, 1, seed=0, **counts)


def test_pooled_probes_form_one_density_with_its_trace() -> None:
    nodes = np.array([[3.0, 1.0, np.nan], [2.0, 0.5, 4.0]])
    weights = np.array([[0.25, 0.75, np.nan], [0.5, 0.25, 0.25]])
    out = _pooled(nodes, weights, np.zeros_like(nodes), n=10)
    np.testing.assert_array_equal(out["values"], [0.5, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(out["weights"], [0.125, 0.375, 0.25, 0.125, 0.125])
    # trace = n * sum(w theta), the mean of the probes' quadratures of x -> x
    assert out["trace"] == pytest.approx(10 * (0.5 * (0.75 + 0.75) + 0.5 * (1.0 + 0.125 + 1.0)))
    assert out["num_params"] == 10 and math.isfinite(out["trace_stderr"])


def test_first_probe_outputs_keep_vectors_only_when_asked() -> None:
    result = SimpleNamespace(alpha=[1.0, 2.0], beta=[0.5])
    pairs = SimpleNamespace(vectors=torch.eye(3, 2, dtype=torch.float64), values=np.array([2, 1]))
    assert set(_first_probe_outputs(result, pairs, False)) == {"alpha", "beta"}
    out = _first_probe_outputs(result, pairs, True)
    assert out["vectors"].shape == (2, 3) and out["vectors"].dtype == np.float32
    np.testing.assert_array_equal(out["vector_values"], [2, 1])


# ----------------------------------------------------------------------------- landscape


def test_landscape_loaders_and_point_evaluator_restore_batchnorm() -> None:
    d = data()
    train, test = _loaders(d, 8, None, 0, None)
    assert test is not None and len(train.dataset) == 24  # type: ignore[arg-type]
    model, loss = bn_model(), nn.CrossEntropyLoss()
    space = ParamSpace.from_model(model)
    theta0 = space.get_vector(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    at_point = _point_evaluator(model, space, theta0, train, test, loss, True, None)
    origin = at_point(None)
    assert origin[0] == evaluate(model, train, loss)[0]
    moved = at_point(0.1 * torch.ones_like(theta0))
    assert moved[0] != origin[0]
    for key, value in buffers.items():
        assert torch.equal(model.state_dict()[key], value), key  # refreshed, then restored


def test_landscape_result_from_curves_and_planes() -> None:
    t = np.linspace(-1, 1, 3)
    chosen = [Direction("a", torch.zeros(2), 1.0), Direction("b", torch.zeros(2), 2.0)]
    curves = np.arange(24, dtype=np.float64).reshape(4, 2, 3)
    grids = np.zeros((4, 1, 3, 3))
    res = _landscape_result(t, chosen, [(0, 1)], curves, grids, (0.5, 90.0, 0.6, 80.0))
    assert res.direction_names == ["a", "b"] and res.plane_names == ["a|b"]
    np.testing.assert_array_equal(res.test_loss, curves[2])
    assert res.checkpoint_loss == 0.5 and res.plane_test_acc is not None
    assert _landscape_result(t, chosen, [], curves, grids, (0, 0, 0, 0)).plane_train_loss is None
