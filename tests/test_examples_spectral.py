"""The spectral example script runs end to end and writes its figure."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "theorems_on_random_matrices.py"


def test_theorems_example_saves_a_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "figures" / "theorems.png"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(output)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    data = output.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000
    printed = capsys.readouterr().out
    assert "Theorem 1" in printed and "Theorem 2" in printed and "Marchenko-Pastur" in printed
    # Theorem 1 holds to rounding; Theorem 2's bulk-dominated case finds none of the top 10
    line = next(s for s in printed.splitlines() if s.startswith("Theorem 1"))
    assert all(float(tok.rstrip(",")) < 1e-12 for tok in line.split() if "e-" in tok)
    assert "0 of 10 are within" in printed
    assert not list(output.parent.glob(".*.tmp"))  # atomic write left no temporary file
