"""A tracker continues its file only with the same measurement (adversarial sweep).

Before: a file whose rows were out of order was accepted and its valid later rows
deleted on resume; a duplicated row was kept; a tracker with another measurement set,
parameter selection, blocks, ``every``, ``trace_probes`` or ``tol`` appended rows of
another matrix to the file (only ``kind`` and ``top_k`` were compared); a
``start_step`` beyond the file's last row left measurements missing; a non-UTF-8 byte
gave a bare ``UnicodeDecodeError``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nets import CurvatureTracker
from nets.curvature_rows import read_rows, write_rows
from spectral.io import CorruptFileError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (16,), generator=g)


COMMON: dict[str, Any] = {"every": 2, "top_k": 1, "tol": 1e-6}


def _tracked_file(path: Path) -> CurvatureTracker:
    model = _mlp()
    tracker = CurvatureTracker(model, nn.CrossEntropyLoss(), _data(), path=path, **COMMON)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    for _ in range(6):
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step()
        tracker.step()
    return tracker


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resume(path: Path, **changes: Any) -> CurvatureTracker:
    options = {**COMMON, **changes}
    data = options.pop("data", _data())
    return CurvatureTracker(_mlp(), nn.CrossEntropyLoss(), data, path=path, **options)


@pytest.mark.parametrize(
    ("changes", "argument"),
    [
        ({"data": _data(seed=2)}, "data"),
        ({"every": 3}, "every"),
        ({"tol": 1e-4}, "tol"),
        ({"trace_probes": 2}, "trace_probes"),
        ({"params": ["0.weight"]}, "params"),
        ({"blocks": "layer"}, "blocks"),
        ({"seed": 1}, "seed"),
        ({"bn_mode": "eval"}, "bn_mode"),
    ],
)
def test_another_measurement_is_refused(tmp_path: Path, changes: Any, argument: str) -> None:
    path = tmp_path / "curvature.jsonl"
    _tracked_file(path)
    before = _digest(path)
    with pytest.raises(ValueError, match=rf"Argument '{argument}'.*new path"):
        _resume(path, **changes)
    assert _digest(path) == before
    assert _resume(path).count == 6  # the same measurement continues


def test_rows_out_of_order_or_repeated_are_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "curvature.jsonl"
    _tracked_file(path)
    rows = read_rows(path)
    for broken in ([rows[1], rows[0], rows[2]], [rows[0], rows[1], rows[1], rows[2]]):
        write_rows(path, broken)
        before = _digest(path)
        with pytest.raises(CorruptFileError, match=r"line \d: step \d+ after step"):
            _resume(path, start_step=2)
        assert _digest(path) == before  # nothing deleted


def test_a_start_step_past_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "curvature.jsonl"
    _tracked_file(path)  # rows at steps 2, 4, 6
    assert _resume(path, start_step=7).count == 7  # the next row (step 8) is not yet due
    with pytest.raises(ValueError, match=r"Argument 'start_step'.*last row \(step 6"):
        _resume(path, start_step=8)


def test_a_non_utf8_file_is_corrupt_and_named(tmp_path: Path) -> None:
    path = tmp_path / "curvature.jsonl"
    _tracked_file(path)
    path.write_bytes(path.read_bytes()[:-5] + b"\xff\xfe}\n")
    with pytest.raises(CorruptFileError, match=r"curvature\.jsonl.*UTF-8"):
        _resume(path)
