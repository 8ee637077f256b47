"""CurvatureTracker: a file is continued only with the same loss; ``top_k`` close to the
parameter count measures; a failed measurement does not count its step.

* The rows' settings did not record the loss: a file continued with
  ``label_smoothing``, class weights or another function mixed two matrices in one
  curve.  The loss's full configuration is recorded and a change refused naming
  ``loss_fn``.
* ``top_k=3`` with ``P=4`` passed the tracker's check, then the first measurement
  failed with "Argument 'keep': ... k <= keep <= n = 4; received 6" (the tracker
  asked for ``2 top_k`` warm-start vectors), and the step was counted anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import nets.tracker as tracker_module
from nets import CurvatureTracker
from nets.curvature_rows import read_rows, write_rows


def _setup() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return net, (x, torch.arange(16) % 3)


@pytest.mark.parametrize(
    "other",
    [
        nn.CrossEntropyLoss(label_smoothing=0.5),
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 1.0], dtype=torch.float64)),
        lambda o, t: nn.functional.cross_entropy(2 * o, t),
    ],
    ids=["label_smoothing", "weight", "function"],
)
def test_a_file_is_not_continued_with_another_loss(tmp_path: Path, other: Any) -> None:
    net, batch = _setup()
    path = tmp_path / "curvature.jsonl"
    first = CurvatureTracker(net, nn.CrossEntropyLoss(), batch, every=1, top_k=1, path=path)
    first.step()
    first.step()
    with pytest.raises(ValueError, match=r"Argument 'loss_fn'.*another loss") as info:
        CurvatureTracker(net, other, batch, every=1, top_k=1, path=path)
    assert str(path) in str(info.value)
    same = CurvatureTracker(net, nn.CrossEntropyLoss(), batch, every=1, top_k=1, path=path)
    assert same.count == 2 and same.step() is not None and len(read_rows(path)) == 3


def test_rows_without_a_recorded_loss_continue_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net, batch = _setup()
    path = tmp_path / "curvature.jsonl"
    tracker = CurvatureTracker(net, nn.CrossEntropyLoss(), batch, every=1, top_k=1, path=path)
    tracker.step()
    rows = read_rows(path)
    assert rows[0]["settings"]["loss"]["type"] == "torch.nn.modules.loss.CrossEntropyLoss"
    for row in rows:  # as an older version wrote them
        del row["settings"]["loss"]
    write_rows(path, rows)
    continued = CurvatureTracker(net, nn.CrossEntropyLoss(), batch, every=1, top_k=1, path=path)
    assert continued.count == 1 and "do not record their loss" in caplog.text


def test_top_k_up_to_the_parameter_count_minus_one_measures() -> None:
    net = nn.Linear(3, 1).double()  # P = 4
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g)
    tracker = CurvatureTracker(net, nn.MSELoss(), (x, y.double()), every=1, top_k=3, tol=1e-8)
    rows = [tracker.step(), tracker.step()]  # cold, then warm from min(2 top_k, P) vectors
    xb = torch.cat([x, torch.ones(8, 1, dtype=torch.float64)], dim=1)
    exact = np.linalg.eigvalsh((2.0 / 8.0 * xb.T @ xb).numpy())[::-1][:3]
    for row in rows:
        assert row is not None
        np.testing.assert_allclose(row["top_eigenvalues"], exact, rtol=1e-7)
    assert rows[1] is not None and rows[1]["warm"] and tracker.count == 2


def test_a_failed_measurement_does_not_count_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, batch = _setup()
    path = tmp_path / "curvature.jsonl"
    tracker = CurvatureTracker(net, nn.CrossEntropyLoss(), batch, every=2, top_k=1, path=path)
    assert tracker.step() is None and tracker.count == 1
    original = tracker_module.block_eigenpairs

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("solver failed")

    monkeypatch.setattr(tracker_module, "block_eigenpairs", failing)
    with pytest.raises(RuntimeError, match="solver failed"):
        tracker.step()
    assert tracker.count == 1 and tracker.rows == [] and not path.exists()
    monkeypatch.setattr(tracker_module, "block_eigenpairs", original)
    row = tracker.step()  # the same step, retried
    assert row is not None and row["step"] == 2 and tracker.count == 2
    assert [r["step"] for r in read_rows(path)] == [2]


def _regularised(model: nn.Module, decay: float) -> Any:
    """A loss whose closure holds the trained model (reading a setting of it; a loss that
    computes with its parameters, weight decay inside the loss, is refused: its curvature
    would be missing from the operators)."""

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if out.shape[-1] != model[-1].out_features:
            raise ValueError("outputs of another model")
        return nn.functional.cross_entropy(out, target, label_smoothing=decay)

    return loss


def test_a_loss_holding_the_model_continues_after_training(tmp_path: Path) -> None:
    """The model met inside the loss is named, not hashed: its values change with training."""
    net, batch = _setup()
    path = tmp_path / "curvature.jsonl"
    first = CurvatureTracker(net, _regularised(net, 1e-3), batch, every=1, top_k=1, path=path)
    first.step()
    with torch.no_grad():  # a training step
        for p in net.parameters():
            p.add_(0.01)
    again = CurvatureTracker(net, _regularised(net, 1e-3), batch, every=1, top_k=1, path=path)
    assert again.count == 1 and again.step() is not None
    with pytest.raises(ValueError, match=r"Argument 'loss_fn'.*another loss"):
        CurvatureTracker(net, _regularised(net, 1e-2), batch, every=1, top_k=1, path=path)
