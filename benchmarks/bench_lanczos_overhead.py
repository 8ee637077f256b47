"""Per-iteration overhead of :func:`spectral.lanczos` beyond its matrix-vector products.

For each size ``n`` and reorthogonalisation mode, the script times ``m`` Lanczos
steps on a cheap diagonal operator (``x -> d * x``) and subtracts the time of
``m`` products alone; what remains is the work of the algorithm itself (dot
products, axpys, the blocked Gram-Schmidt of full reorthogonalisation, the
per-step host transfer of ``alpha``/``beta``).

For ``reorth="full"`` each step ``j`` applies classical Gram-Schmidt twice
against ``j`` stored vectors, each pass reading the block twice (``Q^T w`` and
``Q c``): about ``4 * 8 * n * m^2 / 2`` bytes over ``m`` steps.  The effective
bandwidth (bytes / overhead time) is compared with two ceilings measured on the
same machine: a STREAM-like triad and a BLAS ``gemv`` on an ``m x n`` block.

Memory: peak bytes allocated during the run (``tracemalloc``, which numpy
reports to) next to the size of the basis ``m * n * 8`` bytes.

Usage::

    python benchmarks/bench_lanczos_overhead.py                  # n = 1e4, 1e5, 1e6; m = 100
    python benchmarks/bench_lanczos_overhead.py --sizes 10000 --repeats 1 --markdown out.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from spectral import as_operator, lanczos

CONFIGS: dict[str, dict[str, object]] = {
    "full": {"reorth": "full", "store_basis": True},
    "none (basis kept)": {"reorth": "none", "store_basis": True},
    "none (store_basis=False)": {"reorth": "none", "store_basis": False},
}


@dataclass
class Row:
    n: int
    config: str
    total_s: float
    matvec_s: float
    overhead_per_iter_ms: float
    reorth_bytes: float
    effective_gb_s: float
    peak_mb: float
    basis_mb: float


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The best wall-clock time of ``repeats`` calls (after a garbage collection)."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def triad_bandwidth(n: int = 20_000_000, repeats: int = 3) -> float:
    """STREAM-like triad ``a = b + s c`` bandwidth in GB/s (3 arrays of ``n`` float64)."""
    b = np.ones(n)
    c = np.ones(n)
    a = np.empty(n)

    def triad() -> None:
        np.multiply(c, 3.0, out=a)
        np.add(a, b, out=a)

    t = best_time(triad, repeats)
    return 4 * 8 * n / t / 1e9  # read c, write a, read a and b, write a


def gemv_bandwidth(n: int, m: int, repeats: int = 3) -> float:
    """Bandwidth of ``Q @ w`` with ``Q`` of shape ``(m, n)`` (reads ``8 m n`` bytes), GB/s."""
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((m, n))
    w = rng.standard_normal(n)
    t = best_time(lambda: Q @ w, repeats)
    return 8 * m * n / t / 1e9


def run_one(n: int, m: int, config: str, repeats: int) -> Row:
    d = np.linspace(0.0, 1.0, n) ** 3  # a spectrum without early breakdown
    op = as_operator(lambda x: d * x, size=n)
    v0 = np.random.default_rng(1).standard_normal(n)
    kwargs = CONFIGS[config]

    def run() -> None:
        res = lanczos(op, m, v0=v0, **kwargs)  # type: ignore[arg-type]
        if res.num_iters != m:
            raise RuntimeError(f"unexpected breakdown at n={n}")

    def products() -> None:
        for _ in range(m):
            op.matvec(v0)

    total = best_time(run, repeats)
    mv = best_time(products, repeats)
    tracemalloc.start()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    overhead = max(total - mv, 0.0)
    reorth_bytes = 4 * 8 * n * m * (m + 1) / 2 if kwargs["reorth"] == "full" else 0.0
    return Row(
        n=n,
        config=config,
        total_s=total,
        matvec_s=mv,
        overhead_per_iter_ms=1e3 * overhead / m,
        reorth_bytes=reorth_bytes,
        effective_gb_s=reorth_bytes / overhead / 1e9 if reorth_bytes and overhead else 0.0,
        peak_mb=peak / 2**20,
        basis_mb=(8 * m * n / 2**20) if kwargs["store_basis"] else 0.0,
    )


def markdown(rows: list[Row], m: int, triad: float, gemv: float, threads: str) -> str:
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs,"
        f" BLAS threads: {threads}; numpy {np.__version__}; m = {m}; float64.",
        f"Measured ceilings: STREAM-like triad {triad:.1f} GB/s; BLAS gemv on an m x n block"
        f" {gemv:.1f} GB/s.",
        "",
        "| n | mode | total (s) | m matvecs (s) | overhead / iter (ms) | reorth traffic (GB)"
        " | effective bandwidth (GB/s) | peak alloc (MiB) | basis (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eff = f"{r.effective_gb_s:.1f}" if r.effective_gb_s else "-"
        traffic = f"{r.reorth_bytes / 1e9:.1f}" if r.reorth_bytes else "-"
        lines.append(
            f"| {r.n:.0e} | {r.config} | {r.total_s:.3f} | {r.matvec_s:.3f} |"
            f" {r.overhead_per_iter_ms:.3f} | {traffic} | {eff} | {r.peak_mb:.1f} |"
            f" {r.basis_mb:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--iters", type=int, default=100, help="Lanczos steps m")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument(
        "--blas-threads", type=int, default=None, help="limit BLAS threads (threadpoolctl)"
    )
    args = parser.parse_args(argv)
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.blas_threads, user_api="blas")
    try:
        from threadpoolctl import threadpool_info

        threads = ", ".join(
            f"{d['internal_api']}={d['num_threads']}"
            for d in threadpool_info()
            if d["user_api"] == "blas"
        )
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        threads = "unknown"
    triad = triad_bandwidth()
    gemv = gemv_bandwidth(max(args.sizes), args.iters // 2)
    rows = []
    for n in args.sizes:
        for config in args.configs:
            row = run_one(n, args.iters, config, args.repeats)
            print(
                f"n={n:>8} {config:<26} total={row.total_s:8.3f}s "
                f"matvecs={row.matvec_s:7.3f}s overhead/iter={row.overhead_per_iter_ms:8.3f}ms "
                f"eff={row.effective_gb_s:6.1f}GB/s peak={row.peak_mb:8.1f}MiB",
                flush=True,
            )
            rows.append(row)
    table = markdown(rows, args.iters, triad, gemv, threads)
    print()
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
