"""A tracker file that lost rows, and settings a resumed file must share.

Each row carries its own CRC-32, so a deleted line passed every check: a middle row
left a silent hole in the curve, and a lost last row set the count back (a run resumed
without ``start_step`` then labelled every later row with the wrong step).  The steps'
spacing catches the first, the warm-start state (written after the rows) the second.
A file continued with another density resolution mixed snapshots of 40 and 6 nodes,
and ``step(lr=nan)`` wrote a row whose edge-of-stability line could not be drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nets import tracker as tracker_module
from nets.tracker import CurvatureTracker
from spectral.io import CorruptFileError

EVERY = 2


def _problem() -> tuple[nn.Module, torch.optim.Optimizer, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), data


def _tracker(model: nn.Module, data: Any, path: Path, **kw: Any) -> CurvatureTracker:
    return CurvatureTracker(
        model, nn.CrossEntropyLoss(), data, every=EVERY, top_k=1, path=path, **kw
    )


def _train(model: nn.Module, optimizer: Any, data: Any, tracker: Any, steps: int) -> None:
    x, y = data
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        tracker.step()


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, list[str], Any]:
    model, optimizer, data = _problem()
    path = tmp_path / "curvature.jsonl"
    _train(model, optimizer, data, _tracker(model, data, path), 8)
    return path, path.read_text().splitlines(), (model, data)


def test_a_deleted_middle_row_is_refused(written: Any) -> None:
    path, lines, (model, data) = written
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # step 4 gone
    with pytest.raises(CorruptFileError, match=r"line 2: step 6 after step 2.*step 4 is missing"):
        _tracker(model, data, path)


def test_lost_last_rows_are_refused_until_the_state_is_removed(written: Any) -> None:
    path, lines, (model, data) = written
    path.write_text("\n".join(lines[:-1]) + "\n")  # cut exactly at a line end: step 8 gone
    with pytest.raises(CorruptFileError, match=r"last row is at step 6.*written at step 8"):
        _tracker(model, data, path)
    path.with_name(path.name + ".ritz.npz").unlink()  # the documented way on
    resumed = _tracker(model, data, path)
    assert resumed.count == 6 and [r["step"] for r in resumed.rows] == [2, 4, 6]


def test_an_earlier_restart_leaves_a_consistent_state(written: Any) -> None:
    path, _, (model, data) = written
    restarted = _tracker(model, data, path, start_step=4)  # a checkpoint at step 4
    assert [r["step"] for r in restarted.rows] == [2, 4]
    # killed before its next measurement: the state must not claim steps 6 and 8
    again = _tracker(model, data, path)
    assert again.count == 4 and [r["step"] for r in again.rows] == [2, 4]


def test_rows_off_the_cadence_and_a_crash_between_the_two_writes_are_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, data = _problem()
    path = tmp_path / "curvature.jsonl"
    tracker = _tracker(model, data, path)
    tracker.measure()  # step 0: a measurement before training
    _train(model, optimizer, data, tracker, 3)
    tracker.measure()  # step 3, between the cadence's steps 2 and 4

    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(tracker_module, "save_npz", no_space)
    with pytest.raises(OSError):
        _train(model, optimizer, data, tracker, 1)  # step 4: rows written, state not
    monkeypatch.undo()
    resumed = _tracker(model, data, path)
    assert [r["step"] for r in resumed.rows] == [0, 2, 3, 4] and resumed.count == 4


@pytest.mark.parametrize(("argument", "value"), [("density_iters", 6), ("density_probes", 3)])
def test_a_file_is_continued_only_at_its_density_resolution(
    tmp_path: Path, argument: str, value: int
) -> None:
    model, optimizer, data = _problem()
    path = tmp_path / "curvature.jsonl"
    snapshots = {"density_every": EVERY, "density_iters": 10, "density_probes": 1}
    _train(model, optimizer, data, _tracker(model, data, path, **snapshots), 2)
    with pytest.raises(ValueError, match=rf"Argument '{argument}'.*in the file"):
        _tracker(model, data, path, **{**snapshots, argument: value})
    # without snapshots the resolution measures nothing: not compared
    plain = tmp_path / "plain.jsonl"
    _train(model, optimizer, data, _tracker(model, data, plain, density_iters=10), 2)
    assert len(_tracker(model, data, plain, density_iters=6).rows) == 1


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1, "fast"])
def test_a_bad_learning_rate_is_refused_before_counting(lr: Any) -> None:
    model, _, data = _problem()
    tracker = CurvatureTracker(model, nn.CrossEntropyLoss(), data, every=1, top_k=1)
    with pytest.raises((ValueError, TypeError), match="Argument 'lr'"):
        tracker.step(lr=lr)
    assert tracker.count == 0 and tracker.rows == []
    with pytest.raises((ValueError, TypeError), match="Argument 'lr'"):
        tracker.measure(lr=lr)
    assert tracker.step(lr=0.0) is not None and tracker.rows[-1]["lr"] == 0.0


def test_a_restart_killed_between_its_two_writes_resumes(
    written: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, (model, data) = written

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # between the rows' rewrite and the state's

    monkeypatch.setattr(tracker_module, "save_npz", killed)
    with pytest.raises(KeyboardInterrupt):
        _tracker(model, data, path, start_step=5)  # drops the rows of steps 6 and 8
    monkeypatch.undo()
    again = _tracker(model, data, path, start_step=5)  # the state still holds 4, 6, 8
    assert again.count == 5 and [r["step"] for r in again.rows] == [2, 4]
