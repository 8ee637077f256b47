"""Lean against native double backward: single-batch Hessian products in gradient-times.

For each benchmark case (:mod:`benchmarks.cases`) and BatchNorm mode, times in one
process, interleaved (every callable once per round, order rotated, median kept):

* the gradient of the batch loss in that mode (the unit);
* a cached single-batch :class:`curvops.HessianOperator` product with
  ``lean_kernels=True`` (default) and ``lean_kernels=False`` (PyTorch's formulas);

and checks that the two products agree (relative difference, float32).  Run::

    python benchmarks/bench_lean_kernels.py --cnn-batch 256 --out benchmarks/lean_kernels.json

``--quick`` shrinks the batches (smoke test).  One torch thread, like the other
benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cases import CASE_NAMES, Case, make_case
from curvops import HessianOperator
from spectral.io import atomic_write

MODES = ("eval", "train")


def _gradient(case: Case, mode: str) -> Callable[[], None]:
    model = case.model_copy().train(mode == "train")
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = case.single

    def grad() -> None:
        torch.autograd.grad(case.loss_fn(model(x), y), params)

    return grad


def measure(case: Case, mode: str, rounds: int) -> dict[str, Any]:
    """Median times of gradient and both products, in seconds and gradient-times."""
    model = case.model_copy()
    ops = {
        lean: HessianOperator(model, case.loss_fn, case.single, bn_mode=mode, lean_kernels=lean)
        for lean in (True, False)
    }
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(ops[True].shape[0], generator=gen)
    products = {lean: op.matvec(v) for lean, op in ops.items()}  # warm-up, builds graphs
    diff = float(
        torch.linalg.norm(products[True] - products[False]) / torch.linalg.norm(products[False])
    )
    fns: dict[str, Callable[[], Any]] = {
        "gradient": _gradient(case, mode),
        "lean": lambda: ops[True].matvec(v),
        "native": lambda: ops[False].matvec(v),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "case": case.name,
        "mode": mode,
        "num_params": ops[True].shape[0],
        "batch": int(case.single[0].shape[0]),
        "seconds": med,
        "rounds": times,
        "lean_gradient_times": med["lean"] / med["gradient"],
        "native_gradient_times": med["native"] / med["gradient"],
        "speedup": med["native"] / med["lean"],
        "relative_difference": diff,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = [
        "| case | params | batch | BN mode | gradient (ms) | lean | native | speed-up "
        "| rel. diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['num_params']:,} | {r['batch']} | {r['mode']} | "
            f"{1e3 * r['seconds']['gradient']:.0f} | {r['lean_gradient_times']:.2f} | "
            f"{r['native_gradient_times']:.2f} | {r['speedup']:.2f}x | "
            f"{r['relative_difference']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASE_NAMES), choices=CASE_NAMES)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--cnn-batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small batches, 3 rounds")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = 3 if args.quick else args.rounds
    rows = []
    for name in args.cases:
        case = make_case(name, quick=args.quick, cnn_batch=args.cnn_batch)
        for mode in args.modes:
            rows.append(measure(case, mode, rounds))
            print(f"{name} {mode}: done", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.out is not None:
        report = {"load_average_end": list(os.getloadavg()), "rows": rows, "table": text}
        with atomic_write(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
