"""``train_network(track=<CurvatureTracker>)`` on resume, and the tracker's own restarts.

A user's tracker was taken as given: one of another model measured a model that never
changed; on resume its count was not the run's step (rows mislabelled: the measurement
of step 11 written as step 5), and one counted right but built without the run's rows
rewrote ``stats.json`` and ``curvature.jsonl`` with its new rows only.  A tracker restart
kept the Ritz vectors of the abandoned branch (a second restart went cold), the trace
probes shared the eigen-solves' random stream (a cold solve changed the trace), density
snapshots of dropped rows stayed, and diverged training surfaced as an operator error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nets import curvature_rows
from nets.data import load_dataset, make_loader
from nets.models import get_model
from nets.tracker import CurvatureTracker
from nets.training import train_network
from spectral.errors import NumericalError

BATCH = 256


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def batch(digits: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([digits.train_eval[i][0] for i in range(48)])
    y = torch.tensor([int(digits.train_eval[i][1]) for i in range(48)])
    return x, y


def _net() -> nn.Module:
    return get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(8,), seed=0)


def _train(path: Path, digits: Any, net: nn.Module, epochs: int, **kw: Any) -> Any:
    return train_network(
        path, digits, model=net, epochs=epochs, batch_size=BATCH, progress=False,
        device="cpu", optimizer_kwargs={"lr": 0.05}, save_freq=1, **kw,
    )  # fmt: skip


def _tracker(net: nn.Module, batch: Any, **kw: Any) -> CurvatureTracker:
    return CurvatureTracker(net, nn.CrossEntropyLoss(), batch, every=5, top_k=1, **kw)


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _steps(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(r["step"], r["epoch"]) for r in rows]


def test_a_tracker_of_another_model_is_refused(tmp_path: Path, digits: Any, batch: Any) -> None:
    other = _tracker(_net(), batch)
    with pytest.raises(ValueError, match=r"Argument 'track'.*network being trained"):
        train_network(
            tmp_path / "a", digits, model="MLP", model_kwargs={"hidden": (8,)}, epochs=1,
            batch_size=BATCH, progress=False, device="cpu", track=other,
        )  # fmt: skip
    assert other.rows == []


def test_a_resumed_run_refuses_a_tracker_at_another_step(
    tmp_path: Path, digits: Any, batch: Any
) -> None:
    steps = len(make_loader(digits.train, BATCH, shuffle=True))  # per epoch
    run = tmp_path / "run"
    net = _net()
    _train(run, digits, net, 1, track=_tracker(net, batch, path=run / "curvature.jsonl"))
    before = _digests(run)
    for kw in ({}, {"path": run / "curvature.jsonl"}):  # count 0; count = the last row's step
        net = _net()
        tracker = _tracker(net, batch, **kw)
        assert tracker.count != steps
        with pytest.raises(ValueError, match=rf"Argument 'track'.*start_step={steps}"):
            _train(run, digits, net, 2, track=tracker, resume=True)
        assert _digests(run) == before
    net = _net()  # counted right: continues the file
    tracker = _tracker(net, batch, path=run / "curvature.jsonl", start_step=steps)
    _train(run, digits, net, 2, track=tracker, resume=True)
    assert _steps(tracker.rows) == [(5, 1), (10, 2)]


def test_a_resumed_tracker_without_the_files_keeps_the_recorded_rows(
    tmp_path: Path, digits: Any, batch: Any
) -> None:
    steps = len(make_loader(digits.train, BATCH, shuffle=True))
    whole = tmp_path / "whole"
    net = _net()
    _train(whole, digits, net, 2, track=_tracker(net, batch))
    run = tmp_path / "run"
    net = _net()
    _train(run, digits, net, 1, track=_tracker(net, batch))
    (first,) = curvature_rows.read_rows(run / "curvature.jsonl")
    # rows of another measurement are not mixed in
    net = _net()
    other = CurvatureTracker(net, nn.CrossEntropyLoss(), batch, every=5, top_k=2, start_step=steps)
    with pytest.raises(ValueError, match=r"Argument 'top_k'.*stats.json"):
        _train(run, digits, net, 2, track=other, resume=True)
    net = _net()
    tracker = _tracker(net, batch, start_step=steps)  # path=None
    _train(run, digits, net, 2, track=tracker, resume=True)
    stats = json.loads((run / "stats.json").read_text())["curvature"]
    rows = curvature_rows.read_rows(run / "curvature.jsonl")
    expected = _steps(curvature_rows.read_rows(whole / "curvature.jsonl"))
    assert expected == [(5, 1), (10, 2)]
    assert _steps(stats) == _steps(rows) == _steps(tracker.rows) == expected
    assert rows[0] == first and stats == rows  # the recorded row itself, once


def test_a_second_restart_continues_warm_with_identical_rows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    path = tmp_path / "c.jsonl"

    def make(**kw: Any) -> CurvatureTracker:
        return CurvatureTracker(
            net, nn.CrossEntropyLoss(), (x, y), every=1, top_k=2, path=path, **kw
        )

    first = make()
    for _ in range(6):
        first.step()
    branch = make(start_step=2)  # a branch from step 2: steps 3 and 4 measured again
    branch.step()
    expected = branch.step()
    again = make(start_step=3)  # restart the branch after step 3
    assert sorted(again._history) == [3]  # not the abandoned steps 4..6
    row = again.step()
    assert row is not None and expected is not None and row["warm"]
    for key in ("top_eigenvalues", "residuals", "products", "warm"):
        assert row[key] == expected[key]


def test_the_trace_does_not_depend_on_a_warm_or_cold_eigen_solve() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    rows: list[dict[str, Any]] = []
    for warm in (True, False):
        tracker = CurvatureTracker(
            net, nn.CrossEntropyLoss(), (x, y), every=1, top_k=2, trace_probes=3,
            warm_start=warm,
        )  # fmt: skip
        tracker.step()
        row = tracker.step()
        assert row is not None
        rows.append(row)
    assert rows[0]["warm"] and not rows[1]["warm"]
    assert rows[0]["trace"] == rows[1]["trace"]


def test_a_restart_removes_the_density_snapshots_of_dropped_rows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    def make(**kw: Any) -> CurvatureTracker:
        return CurvatureTracker(
            net, nn.CrossEntropyLoss(), (x, y), every=1, top_k=1, density_every=1,
            density_iters=4, path=tmp_path / "c.jsonl", **kw,
        )  # fmt: skip

    tracker = make()
    for _ in range(4):
        tracker.step()
    assert len(list(tmp_path.glob("c.density-*.npz"))) == 4
    make(start_step=2)
    assert sorted(p.name for p in tmp_path.glob("c.density-*.npz")) == [
        "c.density-00000001.npz",
        "c.density-00000002.npz",
    ]


def test_diverged_training_is_named_by_the_tracker() -> None:
    net = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    tracker = CurvatureTracker(net, nn.CrossEntropyLoss(), (x, y), every=1, top_k=1)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"non-finite at step 1 \(epoch 3\).*training"):
        tracker.step(epoch=3)
    assert tracker.count == 0 and tracker.rows == []
