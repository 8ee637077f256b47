"""Scaling of a Lanczos step with the number of parameters P and the number of steps m.

Usage::

    python benchmarks/scaling.py [--quick] [--out benchmarks/scaling.json]

* **Time vs P**: one architecture family, a 2-hidden-layer tanh MLP
  ``64 -> w -> w -> 10`` with ``w`` chosen so that P = 1e4 ... 1e6, on one synthetic
  batch of 128 samples; ``m = 50`` Lanczos steps with full reorthogonalisation of the
  Hessian.  Per step: wall time, time inside the products, and the overhead fraction
  outside them.  The exponent ``b`` of ``time = a P^b`` is fitted by least squares
  in log-log (all P, and P >= 1e5).  The paper's O(mP) claim means ``b ~ 1``.
* **Time vs m**: the P = 1e5 model, m = 10, 25, 50, 100 (time per step grows with
  m only through the reorthogonalisation, O(mP)).
* **Peak memory** (resident set sampled during the run, each configuration in its
  own process): m = 100 at P = 1e6 with the basis stored (full
  reorthogonalisation) and without (``store_basis=False``, ``reorth="none"``),
  against the resident set of the same process after building the operator and one
  product (model + cached graph).  Expected: the stored basis adds ``(m + c) P 4``
  bytes; without it the peak does not depend on m (checked at m = 10 and m = 100).
* **Reorthogonalisation modes** at P = 1e5 and 1e6, m = 50: "full", "partial",
  "none" (overhead beyond the products).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curvops.hessian import HessianOperator
from spectral.krylov import lanczos
from spectral.operator import as_operator

D_IN, D_OUT, BATCH = 64, 10, 128


def width_for(P: float) -> int:
    """``w`` with ``(D_IN + 1) w + (w + 1) w + (w + 1) D_OUT`` closest to ``P``."""
    a, b, c = 1.0, D_IN + 1 + 1 + D_OUT, D_OUT - P
    return max(2, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))


def make_operator(P: float, seed: int = 0) -> HessianOperator:
    w = width_for(P)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(D_IN, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, D_OUT)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    x = torch.randn(BATCH, D_IN, generator=gen)
    y = torch.randint(0, D_OUT, (BATCH,), generator=gen)
    return HessianOperator(model, nn.CrossEntropyLoss(), (x, y))


def timed_lanczos(
    H: HessianOperator, m: int, *, reorth: str = "full", store_basis: bool = True
) -> dict[str, float]:
    times: list[float] = []

    def matvec(x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = H.matvec(x)
        times.append(time.perf_counter() - t0)
        return out  # type: ignore[no-any-return]

    op = as_operator(matvec, size=H.shape[0], like=H.template_vector())
    t0 = time.perf_counter()
    res = lanczos(op, m, reorth=reorth, store_basis=store_basis, seed=0)
    total = time.perf_counter() - t0
    k = res.num_iters
    return {
        "steps": k,
        "seconds_per_step": total / k,
        "product_seconds_per_step": sum(times) / k,
        "overhead": (total - sum(times)) / total,
    }


def fit_exponent(P: list[int], t: list[float]) -> float:
    slope, _ = np.polyfit(np.log(np.asarray(P, float)), np.log(np.asarray(t, float)), 1)
    return float(slope)


def _current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def rss_child(P: float, m: int, store_basis: bool) -> dict[str, Any]:
    """Run in a fresh process: resident memory (bytes) before and at the peak of one run.

    The peak is sampled every millisecond by a thread during the Lanczos run (the
    process-wide ``ru_maxrss`` would also count transient peaks from start-up).
    """
    import threading

    H = make_operator(P)
    H.matvec(H.template_vector() + 1.0)  # graph built and cached: the baseline
    base = _current_rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    reorth = "full" if store_basis else "none"
    try:
        lanczos(H, m, reorth=reorth, store_basis=store_basis, seed=0)
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _current_rss())
    return {
        "P": H.shape[0],
        "m": m,
        "store_basis": store_basis,
        "baseline": base,
        "peak": peak[0],
        "model_bytes": 4 * H.shape[0],
    }


def run_rss(P: float, m: int, store_basis: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--rss-child", str(P), str(m), str(int(store_basis))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rss-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        P, m, store = args.rss_child
        print(json.dumps(rss_child(float(P), int(m), bool(int(store)))))
        return 0
    sizes = [1e4, 1e5, 3e5] if args.quick else [1e4, 3e4, 1e5, 3e5, 1e6]
    m_main = 20 if args.quick else 50
    ms = [10, 25, 50] if args.quick else [10, 25, 50, 100]
    out: dict[str, Any] = {"batch": BATCH, "threads": args.threads, "vs_P": [], "vs_m": []}
    for P in sizes:
        H = make_operator(P)
        H.matvec(H.template_vector() + 1.0)
        rec = {"P": H.shape[0], "m": m_main, **timed_lanczos(H, m_main)}
        out["vs_P"].append(rec)
        print(
            f"P={rec['P']:>9,}  m={m_main}: {1e3 * rec['seconds_per_step']:8.2f} ms/step, "
            f"products {1e3 * rec['product_seconds_per_step']:8.2f} ms, "
            f"overhead {100 * rec['overhead']:5.1f}%",
            flush=True,
        )
    Ps = [r["P"] for r in out["vs_P"]]
    ts = [r["seconds_per_step"] for r in out["vs_P"]]
    out["exponent_all"] = fit_exponent(Ps, ts)
    big = [(p, t) for p, t in zip(Ps, ts) if p >= 1e5]
    out["exponent_P_ge_1e5"] = fit_exponent(*map(list, zip(*big))) if len(big) >= 2 else None
    print(f"fitted exponent b (time ~ P^b): all P {out['exponent_all']:.2f}", end="")
    if out["exponent_P_ge_1e5"] is not None:
        print(f", P >= 1e5 {out['exponent_P_ge_1e5']:.2f}")
    H = make_operator(1e5)
    H.matvec(H.template_vector() + 1.0)
    for m in ms:
        rec = {"P": H.shape[0], "m": m, **timed_lanczos(H, m)}
        out["vs_m"].append(rec)
        print(
            f"P={rec['P']:,} m={m:>3}: {1e3 * rec['seconds_per_step']:8.2f} ms/step, "
            f"overhead {100 * rec['overhead']:5.1f}%",
            flush=True,
        )
    P_mem = 3e5 if args.quick else 1e6
    m_mem = 100
    mem = []
    for m, store in [(m_mem, True), (m_mem, False), (10, False)]:
        r = run_rss(P_mem, m, store)
        r["delta"] = r["peak"] - r["baseline"]
        r["basis_bytes"] = m * r["P"] * 4 if store else 0
        mem.append(r)
        print(
            f"RSS P={r['P']:,} m={m} store_basis={store}: "
            f"baseline {r['baseline'] / 2**20:.0f} MiB, "
            f"peak {r['peak'] / 2**20:.0f} MiB, delta {r['delta'] / 2**20:.0f} MiB "
            f"(m*P*4 = {r['basis_bytes'] / 2**20:.0f} MiB)",
            flush=True,
        )
    out["memory"] = mem
    # The reorthogonalisation knob at large P (cheap products make its cost visible).
    out["reorth"] = []
    for P in [1e5] if args.quick else [1e5, 1e6]:
        H = make_operator(P)
        H.matvec(H.template_vector() + 1.0)
        for reorth, store in [("full", True), ("partial", True), ("none", False)]:
            rec = {"P": H.shape[0], "m": m_main, "reorth": reorth}
            rec.update(timed_lanczos(H, m_main, reorth=reorth, store_basis=store))
            out["reorth"].append(rec)
            print(
                f"P={rec['P']:,} m={m_main} reorth={reorth}: "
                f"{1e3 * rec['seconds_per_step']:8.2f} ms/step, "
                f"overhead {100 * rec['overhead']:5.1f}%",
                flush=True,
            )
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
