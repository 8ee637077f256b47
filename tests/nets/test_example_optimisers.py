"""The optimiser-comparison example runs end to end (quick settings) and writes its figure."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "optimisers_on_digits.py"


def test_optimisers_example_saves_the_training_error_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    monkeypatch.setattr(
        sys,
        "argv",
        [str(SCRIPT), "--out", str(out), "--quick", "--lanczos-iters", "3", "--lrs", "1.0"],
    )
    runpy.run_path(str(SCRIPT), run_name="__main__")
    png = (out / "training_error.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    errors = json.loads((out / "training_error.json").read_text())
    assert set(errors) == {"SGD lr=0.05", "Adam lr=1e-2", "LancGN lr=1"}
    assert all(len(v) == 1 for v in errors.values())
    # one epoch of 10-class digits: every optimiser is well below chance (90 % error)
    assert all(v[0] < 88.0 for v in errors.values()), errors
    assert "LancGN lr=1" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))
