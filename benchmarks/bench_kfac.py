"""K-FAC / E-KFAC operators against curvlinops, and the cost of grading proxies (issue 21).

Targets (issue 21, ``cnn-bn`` at batch 256 on the CPU): building K-FAC from one batch
<= 1.0x curvlinops' time on the same batch; its product and damped inverse product
<= 0.5 gradient-times; ``compare`` of four proxies with m = 50 in under 5 minutes.

Measured in float32, one torch thread, the model in eval mode, parameters of the
Conv2d/Linear layers only (curvlinops refuses the BatchNorm parameters; ours would keep
them as a diagonal remainder).  Times are medians of interleaved rounds; the unit is
the gradient of the batch loss, timed in the same process.

    python benchmarks/bench_kfac.py --cnn-batch 256 --out benchmarks/kfac.json
    python benchmarks/bench_kfac.py --quick          # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import make_case

from curvops import GGNOperator, KFACOperator, LowRank, compare_all
from curvops.proxies import make_proxies


def _median_times(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median wall time of each callable over interleaved rounds (order rotated)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cnn-batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="batch 16, 3 rounds, m = 10")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compare", action="store_true", help="skip the compare timing")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    batch = 16 if args.quick else args.cnn_batch
    rounds = 3 if args.quick else args.rounds
    m = 10 if args.quick else 50
    case = make_case("cnn-bn", cnn_batch=batch)
    model = case.model_copy()
    loss_fn: nn.Module = case.loss_fn
    x, y = case.single
    layers = [mod for mod in model.modules() if isinstance(mod, nn.Conv2d | nn.Linear)]
    params = [p for mod in layers for p in mod.parameters()]
    results: dict[str, Any] = {"case": case.description, "batch": batch, "rounds": rounds}

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    try:
        from curvlinops import KFACLinearOperator
    except ImportError as err:  # the peer is optional (bench extra)
        KFACLinearOperator = None
        results["curvlinops"] = f"unavailable: {err}"

    builds: dict[str, Callable[[], Any]] = {"gradient": gradient}
    for fisher, peer_fisher in (("type2", "type-2"), ("mc", "mc"), ("empirical", "empirical")):

        def ours(fisher: str = fisher) -> None:
            KFACOperator(model, loss_fn, (x, y), params=params, fisher=fisher).factors()

        builds[f"ours-{fisher}"] = ours
        if KFACLinearOperator is not None:

            def peer(peer_fisher: str = peer_fisher) -> None:
                KFACLinearOperator(
                    model,
                    loss_fn,
                    params,
                    [(x, y)],
                    fisher_type=peer_fisher,
                    check_deterministic=False,
                ).compute_kronecker_factors()

            builds[f"curvlinops-{fisher}"] = peer
    build_times = _median_times(builds, rounds)
    grad_time = build_times.pop("gradient")
    results["gradient_s"] = grad_time
    results["build_s"] = build_times

    K = KFACOperator(model, loss_fn, (x, y), params=params)
    K.factors()
    Kinv = K.inverse(1e-3)
    Kpi = K.inverse(1e-3, pi_damping=True)
    v = torch.randn(K.shape[0], generator=torch.Generator().manual_seed(0))
    Kinv @ v  # eigendecompositions happen at build; warm both paths
    products: dict[str, Callable[[], Any]] = {
        "gradient": gradient,
        "kfac product": lambda: K @ v,
        "kfac damped inverse product": lambda: Kinv @ v,
        "kfac pi-damped inverse product": lambda: Kpi @ v,
    }
    if KFACLinearOperator is not None:
        peer_op = KFACLinearOperator(
            model, loss_fn, params, [(x, y)], fisher_type="type-2", check_deterministic=False
        )
        peer_op.compute_kronecker_factors()
        vp = [t.clone() for t in torch.split(v, [p.numel() for p in params])]
        vp = [t.reshape(p.shape) for t, p in zip(vp, params)]
        products["curvlinops product"] = lambda: peer_op @ vp
    prod_times = _median_times(products, rounds)
    g2 = prod_times.pop("gradient")
    results["products_gradient_times"] = {k: t / g2 for k, t in prod_times.items()}

    if not args.no_compare:
        G = GGNOperator(model, loss_fn, (x, y), bn_mode="eval")
        start = time.perf_counter()
        proxies = make_proxies(
            ("kfac", "ekfac", "diag-ggn", "low-rank-20"), model, loss_fn, (x, y), exact=G,
            bn_mode="eval",
        )  # fmt: skip
        lazy_s = {}
        for name, op in proxies.items():  # K-FAC and E-KFAC build lazily: build them now
            t0 = time.perf_counter()
            if isinstance(op, KFACOperator):
                op.eigen_blocks()
            lazy_s[name] = time.perf_counter() - t0
        built = time.perf_counter() - start
        low = proxies["low-rank-20"]
        assert isinstance(low, LowRank)  # the exact top pairs it was built from: reused
        reports = compare_all(
            proxies, G, k=10, num_iters=m, damping=None, exact_pairs=(low.weights, low.factor)
        )
        total = time.perf_counter() - start
        results["compare"] = {
            "m": m,
            "kfac_ekfac_build_s": lazy_s,
            "proxies_built_s": built,
            "total_s": total,
            "products_exact": next(iter(reports.values())).products_exact,
            "w1": {k: r.wasserstein for k, r in reports.items()},
            "newton_step_error": {k: r.newton_step_error for k, r in reports.items()},
        }

    lines = [
        f"cnn-bn, batch {batch}, gradient {grad_time * 1e3:.1f} ms (one thread, float32)",
        "",
        "| what | time | target |",
        "|---|---|---|",
    ]
    for fisher in ("type2", "mc", "empirical"):
        ours_t = build_times[f"ours-{fisher}"]
        peer_t = build_times.get(f"curvlinops-{fisher}")
        ratio = f"{ours_t / peer_t:.2f}x curvlinops" if peer_t else "curvlinops n/a"
        lines.append(f"| K-FAC build ({fisher}) | {ours_t:.3f} s = {ratio} | <= 1.0x |")
    for name, ratio in results["products_gradient_times"].items():
        target = "<= 0.5" if name.startswith("kfac") else ""
        lines.append(f"| {name} | {ratio:.3f} gradient-times | {target} |")
    if "compare" in results:
        c = results["compare"]
        lines.append(f"| compare, 4 proxies, m = {m} | {c['total_s']:.1f} s | < 300 s |")
    table = "\n".join(lines)
    print(table)
    results["table"] = table
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
