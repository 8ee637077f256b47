"""benchmarks/bench_tracker.py runs end to end on a short schedule (not a timing test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_tracker.py"


def test_bench_tracker_short_run(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_tracker", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "tracker.json"
    args = ["--epochs", "1", "--every", "8", "--measure-batch", "32", "--repeats", "2"]
    args += ["--warmup-epochs", "0", "--timing-repeats", "1", "--json", str(out)]
    threads = torch.get_num_threads()
    try:
        returned = bench.main(args)
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["warm_over_cold"] == returned["warm_over_cold"]
    # 23 steps per epoch of the digits loader: measurements at steps 8 and 16
    assert result["steps"] == 23 and result["measurements"] == 2
    assert result["bit_identical"] is True
    assert len(result["products_warm"]) == len(result["products_cold"]) == 2
    # the first measurement is cold in both runs: the same solve, the same products
    assert result["products_warm"][0] == result["products_cold"][0]
    assert result["warm_over_cold"] > 0
    parts = result["breakdown"]
    for key in ("product", "product_in_block_of_3", "product_in_block_of_7", "products_estimate"):
        assert parts[key] > 0, key
    assert parts["median_products"] >= 3
    assert result["overhead_rows"]["min"] <= result["overhead_rows"]["max"]
    # residuals of the step-8 Ritz vectors at step 16; of the step-8 and step-16 ones at
    # steps 9 and 17: three each, relative
    assert np.shape(result["drift"]) == (1, 3) and np.shape(result["drift_one_step"]) == (2, 3)
    assert all(0 < r < 10 for r in np.ravel(result["drift"] + result["drift_one_step"]))
