"""The paper's Figure 1 experiment: stochastic Lanczos-Newton against SGD and Adam.

Figure 1 of the paper trains VGG-16 on CIFAR-100 with ``LancGN``/``LancHess`` at
learning rates ``alpha`` in {1, 0.1, 0.01, 0.001, 0.0001} with ``delta = 10 alpha``,
batch size 128 for the gradient and the curvature, and compares the training
error per epoch with Adam at several learning rates and the best grid-searched
SGD.  This script runs the same protocol through ``train_network`` (Table 4) on
any dataset/model; by default on the embedded digits data with an MLP (CPU,
minutes)::

    python benchmarks/bench_optimisers_figure1.py --out results/figure1-digits

The paper's setting on one GPU (CIFAR-100 python archive in ``data/``; each
LancGN epoch costs about ``lanczos_iters + 1`` times an SGD epoch)::

    python benchmarks/bench_optimisers_figure1.py --dataset CIFAR100 --data-path data/ \\
        --model VGG16 --epochs 100 --device cuda --lanczos-iters 20 \\
        --curvatures LancGN LancHess --out results/figure1-vgg16-cifar100

Outputs in ``--out``: one ``train_network`` run directory per curve,
``figure1.json`` (per-epoch training and test error, seconds per epoch, final
loss) and ``figure1.png`` (training error against epoch; Lanczos-Newton solid,
baselines dashed, the best SGD only).  ``--schedule constant`` (default) keeps
``delta / alpha`` fixed over training.  What we observed is in
``benchmarks/README.md`` (section "Optimisers").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch

from nets.training import train_network
from spectral.io import atomic_write


def build_runs(args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any]]]:
    """Label -> (registered optimiser name, optimizer_kwargs as in Table 4)."""
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in args.curvatures:
        for lr in args.lrs:
            runs[f"{name} lr={lr:g}"] = (
                name,
                {
                    "lr": lr,
                    "damping": args.damping_ratio * lr,
                    "weight_decay": 0,
                    "lanczos_iters": args.lanczos_iters,
                    "start": args.start,
                    "batch_size": args.batch_size,
                    "curvature_batch_size": args.curvature_batch_size,
                },
            )
    for lr in args.adam_lrs:
        runs[f"Adam lr={lr:g}"] = ("Adam", {"lr": lr, "batch_size": args.batch_size})
    for lr in args.sgd_lrs:
        runs[f"SGD lr={lr:g}"] = (
            "SGD",
            {"lr": lr, "momentum": 0.9, "weight_decay": 0, "batch_size": args.batch_size},
        )
    if args.extra:
        runs["KFAC lr=0.05"] = ("KFAC", {"lr": 0.05, "damping": 1e-2})
        runs["SWATS lr=1e-3"] = ("SWATS", {"lr": 1e-3})
    return runs


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/figure1-digits")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--model", default="MLP")
    parser.add_argument(
        "--model-kwargs", default=None, help="JSON, e.g. '{\"hidden\": [64]}' (digits MLP default)"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--curvature-batch-size", type=int, default=128)
    parser.add_argument("--lanczos-iters", type=int, default=20)
    parser.add_argument("--damping-ratio", type=float, default=10.0, help="delta / alpha")
    parser.add_argument("--curvatures", nargs="+", default=["LancGN"])
    parser.add_argument(
        "--start",
        default="gradient",
        choices=["gradient", "random"],
        help="Lanczos start vector: the gradient (Krylov space of g) or seeded random",
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.001, 0.0001])
    parser.add_argument("--adam-lrs", type=float, nargs="*", default=[1e-2, 1e-3, 1e-4])
    parser.add_argument("--sgd-lrs", type=float, nargs="*", default=[0.01, 0.03, 0.1])
    parser.add_argument("--extra", action="store_true", help="also K-FAC and SWATS")
    parser.add_argument("--schedule", default="constant")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.model_kwargs is not None:
        model_kwargs = json.loads(args.model_kwargs)
    else:
        model_kwargs = {"hidden": [64]} if args.model == "MLP" else {}

    results: dict[str, dict[str, Any]] = {}
    for label, (name, kwargs) in build_runs(args).items():
        start = time.perf_counter()
        error: str | None = None
        try:
            result = train_network(
                dir=out / label.replace(" ", "_").replace("=", ""),
                dataset=args.dataset,
                data_path=args.data_path,
                model=args.model,
                model_kwargs=model_kwargs,
                optimizer=name,
                optimizer_kwargs=dict(kwargs),
                epochs=args.epochs,
                schedule=args.schedule,
                save_freq=None,
                seed=args.seed,
                device=args.device,
                progress=False,
            )
            stats = result.stats
            switch_step = getattr(result.optimizer, "switch_step", None)  # SWATS
        except (ArithmeticError, RuntimeError) as exc:  # a diverged run is a result too
            stats, error, switch_step = [], f"{type(exc).__name__}: {exc}", None
        seconds = time.perf_counter() - start
        results[label] = {
            "optimizer": name,
            "kwargs": kwargs,
            "train_error": [100.0 - e["train_acc"] for e in stats],
            "test_error": [
                None if e.get("test_acc") is None else 100.0 - e["test_acc"] for e in stats
            ],
            "train_loss": [e["train_loss"] for e in stats],
            "seconds": seconds,
            "error": error,
            "swats_switch_step": switch_step,
        }
        final = results[label]["train_error"][-1] if stats else math.nan
        print(
            f"{label:>20}: final training error {final:6.2f} %  ({seconds:7.1f} s)"
            + (f"  FAILED: {error}" if error else "")
        )

    with atomic_write(out / "figure1.json", "wb") as handle:
        handle.write(json.dumps({"args": vars(args), "runs": results}, indent=1).encode())
    _plot(results, out / "figure1.png", title=f"{args.model} on {args.dataset}")
    return results


def _plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sgd = {k: v for k, v in results.items() if v["optimizer"] == "SGD" and v["train_error"]}
    best_sgd = min(sgd, key=lambda k: sgd[k]["train_error"][-1]) if sgd else None
    for label, run in results.items():
        values = run["train_error"]
        if not values or (run["optimizer"] == "SGD" and label != best_sgd):
            continue
        lanczos = run["optimizer"] in ("LancGN", "LancHess")
        ax.plot(
            range(1, len(values) + 1),
            [max(v, 1e-2) for v in values],
            "-" if lanczos else "--",
            marker="o" if lanczos else None,
            markersize=3,
            label=label + (" (best SGD)" if label == best_sgd else ""),
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("training error (%)")
    ax.set_yscale("log")
    ax.set_title(f"Figure 1 protocol: {title}, delta = 10 alpha", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
