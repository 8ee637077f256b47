"""benchmarks/gpu_check.py --cpu-smoke runs end to end and its correctness checks pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CHECKS = (
    "products-float64",
    "products-float32",
    "lanczos-device",
    "no-host-copies",
    "distributed",
)


def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in CHECKS:
        assert f"CHECK {name}: PASS" in proc.stdout, proc.stdout
    assert "FAIL" not in proc.stdout
    assert "CHECK cupy-interop: SKIP" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["passed"] is True
    (dist,) = [c for c in payload["checks"] if c["check"] == "distributed"]
    assert dist["status"] == "PASS"
    assert (dist["backend"], dist["world_size"]) == ("gloo", 2)
    assert max(dist["rel_err"].values()) <= 1e-10 and dist["lanczos_bitwise_equal"] is True
    runs = payload["timing"]["runs"]
    assert set(runs) == {"hessian-fp32", "ggn-fp32", "hessian-tf32", "ggn-tf32"}
    for rec in runs.values():
        assert rec["seconds_per_step"] > 0
        assert len(rec["top_ritz"]) == 3
