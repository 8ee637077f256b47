"""Cost of :class:`nets.CurvatureTracker` in a training run (issue 16 benchmark targets).

The demo's SmallCNN (BatchNorm, 1,946 parameters) is trained on the digits data
with SGD (lr 0.05 unless ``--lr``, momentum 0.9, weight decay 5e-4, batch 64, as ``nets demo``),
three times from the same seed:

* without a tracker (the reference time ``T0``);
* with a tracker measuring the top-3 Hessian eigenvalues every 50 steps, warm-started
  (time ``T1``; the overhead is ``(T1 - T0) / T0``, also shown as the sum of the rows'
  ``seconds`` over ``T0``);
* with the same tracker cold (``warm_start=False``), for the products per measurement.

The measurement set is one fixed batch of ``--measure-batch`` training samples,
products in the model's current (train) mode, residual tolerance ``--tol``.
Products warm / cold compare the tracked steps after the first (the first is cold
in both runs).  The final parameters of the tracked runs are checked to be
bit-identical to the untracked run's.

Usage::

    python benchmarks/bench_tracker.py                 # 20 epochs (about 450 steps)
    python benchmarks/bench_tracker.py --epochs 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np
import torch

from nets import CurvatureTracker, get_model, load_dataset, make_loader


def _run(args: argparse.Namespace, track: str | None) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    splits = load_dataset("digits", seed=args.seed)
    loader = make_loader(splits.train, args.batch_size, shuffle=True, seed=args.seed)
    model = get_model("SmallCNN", num_classes=10, in_channels=1, input_size=8)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    measure = make_loader(splits.train_eval, args.measure_batch, shuffle=False)
    inputs, targets = next(iter(measure))
    tracker = None
    if track is not None:
        tracker = CurvatureTracker(
            model, loss_fn, (inputs, targets), every=args.every, top_k=3, tol=args.tol,
            seed=args.seed, warm_start=track == "warm", optimizer=opt,
        )  # fmt: skip
    model.train()
    start = time.perf_counter()
    steps = 0
    for epoch in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            steps += 1
            if tracker is not None:
                tracker.step(epoch=epoch, loss=loss.item())
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "steps": steps,
        "rows": [] if tracker is None else tracker.rows,
        "params": [p.detach().clone() for p in model.parameters()],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--measure-batch", type=int, default=256)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    plain = _run(args, None)
    warm = _run(args, "warm")
    cold = _run(args, "cold")
    for name, run in (("warm", warm), ("cold", cold)):
        same = all(torch.equal(a, b) for a, b in zip(plain["params"], run["params"], strict=True))
        if not same:
            raise SystemExit(f"the {name}-tracked run's final parameters differ from the plain run")
    warm_products = [r["eigen_products"] for r in warm["rows"]]
    cold_products = [r["eigen_products"] for r in cold["rows"]]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {args.threads}",
        "steps": plain["steps"],
        "measurements": len(warm["rows"]),
        "train_seconds": plain["seconds"],
        "tracked_seconds": warm["seconds"],
        "overhead": (warm["seconds"] - plain["seconds"]) / plain["seconds"],
        "overhead_rows": sum(r["seconds"] for r in warm["rows"]) / plain["seconds"],
        "products_warm": warm_products,
        "products_cold": cold_products,
        "warm_over_cold": float(np.sum(warm_products[1:]) / np.sum(cold_products[1:])),
        "top_eigenvalues": [r["top_eigenvalues"] for r in warm["rows"]],
        "max_rel_diff_warm_cold": float(
            max(
                np.max(np.abs(np.subtract(a["top_eigenvalues"], b["top_eigenvalues"])))
                / abs(a["top_eigenvalues"][0])
                for a, b in zip(warm["rows"], cold["rows"], strict=True)
            )
        ),
        "bit_identical": True,
        "settings": vars(args),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
