"""Mean losses weighted by the loss's normaliser (padded tokens), and the tracker's
tolerance / duplicate-step / measurement-set contracts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from curvops.losses import sequence_cross_entropy
from curvops.testing import dense_hessian
from nets import CurvatureTracker, train_network
from nets.data import DatasetSplits
from nets.models.gpt import GPT
from nets.training import evaluate as train_evaluate
from nets.workflow.landscape import evaluate as workflow_evaluate

V, T = 8, 4


def _padded(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, T), generator=g)
    y = torch.randint(0, V, (n, T), generator=g)
    y[n // 2 :, 1:] = -100  # the second half: one counted token per sequence
    y[n // 2 :, 0] = 0
    return TensorDataset(x, y)


def _token_mean(model: torch.nn.Module, ds: TensorDataset) -> float:
    x, y = ds.tensors
    with torch.no_grad():
        out = model(x).double()
    return float(F.cross_entropy(out.reshape(-1, V), y.reshape(-1), ignore_index=-100))


def test_training_losses_and_perplexity_weight_batches_by_counted_tokens(tmp_path) -> None:
    train, test = _padded(8, 0), _padded(8, 1)
    splits = DatasetSplits("padded", train, train, test, V, (T,), 1, V, task="language_modeling")
    model = GPT(V, 1, T, n_layer=1, n_head=1, d_model=4, seed=0)
    res = train_network(
        tmp_path, splits, model=model, optimizer="SGD", optimizer_kwargs={"lr": 0.1},
        epochs=1, batch_size=4, schedule="constant", progress=False, device="cpu",
    )  # fmt: skip

    stats = json.loads((res.dir / "stats.json").read_text())
    entry = (stats.get("epochs") or stats.get("stats"))[-1]
    expected = _token_mean(res.model.eval(), test)
    assert entry["test_loss"] == pytest.approx(expected, rel=1e-6)
    assert entry["test_ppl"] == pytest.approx(math.exp(expected), rel=1e-6)


@pytest.mark.parametrize("which", ["training", "workflow"])
def test_evaluate_weights_batches_by_counted_tokens(which: str) -> None:
    ds = _padded(8, 2)
    model = GPT(V, 1, T, n_layer=1, n_head=1, d_model=4, seed=1).double().eval()
    loader = DataLoader(ds, batch_size=4)
    loss = sequence_cross_entropy()
    if which == "training":
        got = train_evaluate(model, loader, loss, classification=False)["loss"]
    else:
        got = workflow_evaluate(model, loader, loss)[0]
    assert got == pytest.approx(_token_mean(model, ds), rel=1e-12)


def test_evaluate_accuracy_counts_only_counted_targets() -> None:
    x = torch.eye(4, dtype=torch.float64)
    y = torch.tensor([0, 1, -100, -100])  # the ignored rows would count as misses
    model = torch.nn.Linear(4, 4, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    loss = torch.nn.CrossEntropyLoss()
    assert train_evaluate(model, loader, loss)["acc"] == pytest.approx(100.0)
    _, acc = workflow_evaluate(model, loader, loss)
    assert acc == pytest.approx(100.0)
    expected = float(F.cross_entropy(model(x).detach(), y))  # batch 2 has no counted target
    assert workflow_evaluate(model, loader, loss)[0] == pytest.approx(expected, rel=1e-12)


def _mlp(dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    return net.to(dtype), (x.to(dtype), y)


def test_tracker_refuses_a_tol_below_the_bfloat16_floor() -> None:
    net, data = _mlp(torch.bfloat16)
    with pytest.raises(ValueError, match=r"'tol'.*bfloat16"):
        CurvatureTracker(net, torch.nn.CrossEntropyLoss(), data, every=1, top_k=1)


def test_tracker_measures_a_bfloat16_model_at_its_two_eps_floor() -> None:
    """16-bit products round input and result: residuals are certified down to 2 eps
    (0.0156 in bfloat16), not 100 eps (0.78, which let any first guess pass)."""
    net, data = _mlp(torch.bfloat16)
    loss = torch.nn.CrossEntropyLoss()
    floor = 2 * torch.finfo(torch.bfloat16).eps
    with pytest.raises(ValueError, match=r"'tol'.*2 eps.*bfloat16"):
        CurvatureTracker(net, loss, data, every=1, top_k=1, tol=floor / 2)
    row = CurvatureTracker(net, loss, data, every=1, top_k=1, tol=floor).step()
    assert row is not None and row["tol"] == floor
    wide = _mlp(torch.float64)[0]
    wide.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    x, y = data
    exact = np.linalg.eigvalsh(dense_hessian(wide, loss, [(x.double(), y)]).numpy())[-1]
    # the residual bound tol*|theta| plus the products' own bfloat16 rounding (a few eps)
    assert abs(row["top_eigenvalues"][0] - exact) <= 4 * floor * abs(exact)


def test_tracker_refuses_a_tol_below_the_autocast_floor_before_any_product() -> None:
    net, data = _mlp(torch.float32)
    tracker = CurvatureTracker(net, torch.nn.CrossEntropyLoss(), data, every=1, top_k=1)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="autocast"):
        tracker.step()
    assert tracker.count == 0 and tracker.rows == []
    row = tracker.step()  # outside autocast: the requested tol is met and recorded
    assert row is not None and row["tol"] == 1e-4


def test_tracker_rows_meet_the_recorded_tol() -> None:
    net, data = _mlp(torch.float64)
    loss = torch.nn.CrossEntropyLoss()
    row = CurvatureTracker(net, loss, data, every=1, top_k=2, tol=1e-6).step()
    exact = np.linalg.eigvalsh(dense_hessian(net, loss, data).numpy())[::-1][:2]
    assert row["tol"] == 1e-6
    np.testing.assert_allclose(row["top_eigenvalues"], exact, rtol=1e-6)


def test_measure_at_a_measured_step_writes_no_duplicate(tmp_path) -> None:
    net, data = _mlp(torch.float64)
    path = tmp_path / "c.jsonl"
    loss = torch.nn.CrossEntropyLoss()
    tracker = CurvatureTracker(net, loss, data, every=2, top_k=1, path=path)
    tracker.step()
    row = tracker.step()
    assert tracker.measure() is row
    assert [r["step"] for r in tracker.rows] == [2]
    restarted = CurvatureTracker(net, loss, data, every=2, top_k=1, path=path)
    assert [r["step"] for r in restarted.rows] == [2]


def test_tracker_copies_the_measurement_set_at_construction() -> None:
    net, data = _mlp(torch.float64)
    x, y = data[0].clone(), data[1].clone()
    loss = torch.nn.CrossEntropyLoss()
    tracker = CurvatureTracker(net, loss, (x, y), every=1, top_k=1, tol=1e-8)
    first = tracker.step()
    x.mul_(3.0)  # the loop reuses its buffer
    second = tracker.step()
    assert second is not None and first is not None
    assert second["top_eigenvalues"][0] == pytest.approx(first["top_eigenvalues"][0], rel=1e-7)
    assert second["settings"] == first["settings"]


def test_tracker_blocks_from_transformer_blocks() -> None:
    from curvops.blocks import transformer_blocks

    model = GPT(V, 1, T, n_layer=1, n_head=2, d_model=4, seed=0).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, V, (2, T), generator=g), torch.randint(0, V, (2, T), generator=g)
    loss = sequence_cross_entropy()
    blocks = transformer_blocks(model)
    tracker = CurvatureTracker(model, loss, (x, y), every=1, top_k=1, tol=1e-8, blocks=blocks)
    row = tracker.step()
    assert row is not None
    H = dense_hessian(model, loss, (x, y)).numpy()
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    for label, slices in blocks.items():
        idx = np.concatenate([np.arange(*offsets[s.name]) for s in slices])
        if idx.size < 2:
            continue
        top = np.linalg.eigvalsh(H[np.ix_(idx, idx)])[-1]
        assert row["blocks"][label]["top_eigenvalues"][0] == pytest.approx(top, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="'blocks'"):
        CurvatureTracker(model, loss, (x, y), blocks=transformer_blocks(model, heads=2))
