"""benchmarks/bench_lean_kernels.py --quick runs and the two product paths agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_lean_kernels.py"


def test_bench_lean_kernels_quick(tmp_path: Path) -> None:
    out = tmp_path / "lean.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--cases", "cnn-bn", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["eval", "train"]
    for row in rows:
        # float32 products of the same Hessian by two formula sets: rounding only
        # (a few hundred eps relative for this 151k-parameter network)
        assert row["relative_difference"] <= 1e-5
        assert row["lean_gradient_times"] > 0 and row["native_gradient_times"] > 0
    assert "| cnn-bn |" in proc.stdout
