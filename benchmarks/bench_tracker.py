"""Cost of :class:`nets.CurvatureTracker` in a training run (issue 16 benchmark targets).

The demo's SmallCNN (BatchNorm, 1,946 parameters) is trained on the digits data
with SGD (lr 0.05 unless ``--lr``, momentum 0.9, weight decay 5e-4, batch 64, as ``nets demo``),
from the same seed:

* without a tracker (the reference time ``T0``);
* with a tracker measuring the top-3 Hessian eigenvalues every 50 steps, warm-started
  (time ``T1``; the overhead is ``(T1 - T0) / T0``, also shown as the sum of the rows'
  ``seconds`` over ``T0``);
* with the same tracker cold (``warm_start=False``), for the products per measurement.

A discarded warm-up run (``--warmup-epochs``) comes first, so that ``T0`` does not pay
the process's first-call costs, and the three runs are repeated ``--repeats`` times
in rotated order (one round: plain, warm, cold; the next: warm, cold, plain; ...):
each round gives one overhead from its own plain and warm runs, and the median and
spread over the rounds are reported (the machine may be shared).  Products are
deterministic; they are checked to be the same in every round.

The measurement set is one fixed batch of ``--measure-batch`` training samples,
products in the model's current (train) mode, residual tolerance ``--tol``.
Products warm / cold compare the tracked steps after the first (the first is cold
in both runs).  The final parameters of the tracked runs are checked to be
bit-identical to the untracked run's.

**Cost breakdown** (``breakdown`` in the output), on the model at the end of training,
in units of one training step (loader, forward, backward and SGD step, as in the
runs), all medians of ``--timing-repeats`` interleaved timings, so that a
change of machine load hits them alike:

* ``product``: one Hessian-vector product of the cached gradient graph;
* ``product_in_block_of_7``: per column of one 7-column product (the first block of a
  warm measurement: 2 top_k kept Ritz vectors and one guard vector);
* ``product_in_block_of_3``: per column of a 3-column product (the later blocks: the
  residuals of the at most top_k unconverged pairs);
* ``graph_build``: the first product after the parameters changed, minus a cached one
  (one gradient with ``create_graph``, the model comparison and snapshot);
* ``products_estimate``: ``graph_build + 7 block_of_7 + (P - 7) block_of_3`` for the
  median number ``P`` of products of a warm measurement, and
  ``products_estimate_over_every`` that over ``every``: the overhead the products
  alone cause, against the measured ``overhead_rows`` (which adds the solver on the
  host, the RNG snapshots and the tracker's bookkeeping).

**Why a warm start saves little here** (``drift`` in the output): an untimed run along
the same trajectory computes, at every measurement, the relative residual
``||H u - (u^T H u) u|| / |u^T H u|`` of each of the previous measurement's top_k
Ritz vectors ``u`` under the current Hessian (``drift_one_step`` the same one SGD step
after a measurement).  A Krylov solve has to reduce that residual to ``tol``; from a
random start it reduces one of order 1, so warm / cold is about
``log(drift / tol) / log(1 / tol)`` plus the first block.

Usage::

    python benchmarks/bench_tracker.py                 # 20 epochs (460 steps), 3 rounds
    python benchmarks/bench_tracker.py --epochs 4 --repeats 1 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from curvops import HessianOperator
from nets import CurvatureTracker, get_model, load_dataset, make_loader
from spectral.blockeig import block_eigenpairs

MODES = ("plain", "warm", "cold")


@functools.cache
def _digits(seed: int) -> Any:
    """The digits splits, read once per process (every run uses the same)."""
    return load_dataset("digits", seed=seed)


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    splits = _digits(args.seed)
    loader = make_loader(splits.train, args.batch_size, shuffle=True, seed=args.seed)
    model = get_model("SmallCNN", num_classes=10, in_channels=1, input_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    measure = make_loader(splits.train_eval, args.measure_batch, shuffle=False)
    inputs, targets = next(iter(measure))
    return {"loader": loader, "model": model, "opt": opt, "batch": (inputs, targets)}


def _run(args: argparse.Namespace, track: str, epochs: int) -> dict[str, Any]:
    parts = _setup(args)
    model, opt, loader = parts["model"], parts["opt"], parts["loader"]
    loss_fn = torch.nn.CrossEntropyLoss()
    tracker = None
    if track != "plain":
        tracker = CurvatureTracker(
            model, loss_fn, parts["batch"], every=args.every, top_k=args.top_k, tol=args.tol,
            seed=args.seed, warm_start=track == "warm", optimizer=opt,
        )  # fmt: skip
    model.train()
    start = time.perf_counter()
    steps = 0
    for epoch in range(epochs):
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


def _relative_residuals(op: HessianOperator, vectors: torch.Tensor) -> list[float]:
    """``||H u - (u^T H u) u|| / |u^T H u|`` for each unit column ``u`` of ``vectors``."""
    products = op.matmat(vectors)
    theta = (vectors * products).sum(dim=0)
    residuals = (products - vectors * theta).norm(dim=0) / theta.abs()
    return [float(r) for r in residuals]


def _drift(args: argparse.Namespace) -> dict[str, list[list[float]]]:
    """Residuals of the previous measurement's Ritz vectors under the current Hessian."""
    parts = _setup(args)
    model, opt, loader = parts["model"], parts["opt"], parts["loader"]
    loss_fn = torch.nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, parts["batch"])
    previous = None
    drift, one_step = [], []
    model.train()
    steps = 0
    for _ in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            steps += 1
            if previous is not None and steps % args.every == 1 % args.every:
                one_step.append(_relative_residuals(op, previous))
            if steps % args.every == 0:
                if previous is not None:
                    drift.append(_relative_residuals(op, previous))
                found = block_eigenpairs(op, args.top_k, tol=args.tol, seed=args.seed)
                previous = found.vectors
    return {"drift": drift, "drift_one_step": one_step}


def _median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed in ``repeats`` interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def _forever(loader: Any) -> Iterator[Any]:
    """The loader's batches, pass after pass (each pass reshuffled, as in the runs)."""
    while True:
        yield from loader


def _breakdown(
    args: argparse.Namespace, params: list[torch.Tensor], rows: list[Any]
) -> dict[str, Any]:
    """Costs at the final parameters in units of one training step, timed interleaved."""
    parts = _setup(args)
    model = parts["model"]
    with torch.no_grad():
        for p, value in zip(model.parameters(), params, strict=True):
            p.copy_(value)
    model.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, parts["batch"])
    n = op.shape[0]
    gen = torch.Generator().manual_seed(args.seed)
    x1 = torch.randn(n, 1, generator=gen)
    x3 = torch.randn(n, 3, generator=gen)
    x7 = torch.randn(n, 7, generator=gen)
    trained = copy.deepcopy(model)  # the training step runs on a copy: ``model`` stays fixed
    opt = torch.optim.SGD(trained.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    batches = _forever(parts["loader"])

    def train_step() -> None:  # as in _run
        inputs, targets = next(batches)
        opt.zero_grad()
        loss_fn(trained(inputs), targets).backward()
        opt.step()

    def fresh() -> None:  # a new operator: its first product builds the gradient graph
        HessianOperator(model, loss_fn, parts["batch"]).matmat(x1)

    op.matmat(x1)
    train_step()
    timed = _median_times(
        {
            "step": train_step,
            "fresh": fresh,
            "product": lambda: op.matmat(x1),
            "block3": lambda: op.matmat(x3),
            "block7": lambda: op.matmat(x7),
        },
        args.timing_repeats,
    )
    unit = timed["step"]
    products = float(np.median([r["products"] for r in rows[1:] or rows]))  # warm ones
    build = max(timed["fresh"] - timed["product"], 0.0) / unit
    c3, c7 = timed["block3"] / 3 / unit, timed["block7"] / 7 / unit
    estimate = build + min(products, 7) * c7 + max(products - 7, 0) * c3
    return {
        "training_step_ms": 1e3 * unit,
        "product": timed["product"] / unit,
        "product_in_block_of_3": c3,
        "product_in_block_of_7": c7,
        "graph_build": build,
        "median_products": products,
        "products_estimate": estimate,
        "products_estimate_over_every": estimate / args.every,
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--measure-batch", type=int, default=256)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three runs")
    parser.add_argument("--warmup-epochs", type=int, default=2, help="discarded warm-up run")
    parser.add_argument("--timing-repeats", type=int, default=15)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.warmup_epochs > 0:
        _run(args, "warm", args.warmup_epochs)
        _run(args, "plain", args.warmup_epochs)
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.repeats):
        order = MODES[r % 3 :] + MODES[: r % 3]
        rounds.append({mode: _run(args, mode, args.epochs) for mode in order})
    first = rounds[0]
    for runs in rounds:
        for name in ("warm", "cold"):
            same = all(
                torch.equal(a, b)
                for a, b in zip(runs["plain"]["params"], runs[name]["params"], strict=True)
            )
            if not same:
                raise SystemExit(f"the {name}-tracked run's final parameters differ from plain")
            products = [row["products"] for row in runs[name]["rows"]]
            if products != [row["products"] for row in first[name]["rows"]]:
                raise SystemExit(f"the {name} runs' products differ between rounds")
    warm_rows, cold_rows = first["warm"]["rows"], first["cold"]["rows"]
    warm_products = [r["eigen_products"] for r in warm_rows]
    cold_products = [r["eigen_products"] for r in cold_rows]
    plain_seconds = [runs["plain"]["seconds"] for runs in rounds]
    warm_seconds = [runs["warm"]["seconds"] for runs in rounds]
    steps = first["plain"]["steps"]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {args.threads}",
        "load_average": list(os.getloadavg()),
        "steps": steps,
        "measurements": len(warm_rows),
        "train_seconds": _spread(plain_seconds),
        "tracked_seconds": _spread(warm_seconds),
        "overhead": _spread([(w - p) / p for w, p in zip(warm_seconds, plain_seconds)]),
        "overhead_rows": _spread(
            [
                sum(r["seconds"] for r in runs["warm"]["rows"]) / runs["plain"]["seconds"]
                for runs in rounds
            ]
        ),
        "products_warm": warm_products,
        "products_cold": cold_products,
        "warm_over_cold": (  # the first measurement is cold in both runs
            float(np.sum(warm_products[1:]) / np.sum(cold_products[1:]))
            if len(cold_products) > 1
            else None
        ),
        "breakdown": _breakdown(args, first["warm"]["params"], warm_rows),
        **_drift(args),
        "top_eigenvalues": [r["top_eigenvalues"] for r in warm_rows],
        "max_rel_diff_warm_cold": float(
            max(
                np.max(np.abs(np.subtract(a["top_eigenvalues"], b["top_eigenvalues"])))
                / abs(a["top_eigenvalues"][0])
                for a, b in zip(warm_rows, cold_rows, strict=True)
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
