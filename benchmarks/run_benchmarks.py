"""Side-by-side benchmark: this project against curvlinops, hessian-eigenthings, PyHessian.

One command::

    python benchmarks/run_benchmarks.py [--quick] [--out benchmarks/results.json]

For every case of :mod:`cases` (MLP on digits, CIFAR-shaped CNN with BatchNorm,
PreResNet8) and both data layouts (one batch; the full dataset of 8 batches) it
times, per library (:mod:`peers`):

* the gradient (plain ``torch.autograd.grad`` of the mean loss, summed over the
  batches) -- the unit of every ratio;
* a Hessian-vector product and a GGN-vector product (flat float32 torch vectors);
* a Lanczos step: one run of ``m`` steps (default 50) with full reorthogonalisation,
  single batch (and the full dataset with ``--full-lanczos``); the fraction of its
  time spent outside the products is the Lanczos overhead.  The reported step time is
  load-normalised: (interleaved median product time) x (run time / time inside the
  run's products); the raw run time / m is kept as ``raw_seconds`` in the JSON and
  in the "raw" column.  On a shared machine the load changes between the minutes-long
  runs of different libraries, so the raw times of two libraries are not comparable,
  while both factors of the normalised time are measured under one load.

Products and the gradient are timed in interleaved rounds (every callable once per
round, the order rotated between rounds) and the median of the rounds is reported,
so a change of machine load affects all libraries alike; a Lanczos run is one
measurement per library.  Ratios: to the gradient time of the same data in the same
process, and to the best (fastest) peer.  Each peer's Hessian product of one probe
is compared with ours (relative difference) to check that all time the same matrix.
A peer that is missing or fails is reported with its error.

The script prints a Markdown table (also written with ``--table``) and the speed
targets of issue 9 evaluated on the ``cnn-bn`` case; ``--out`` writes every number
as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cases import CASE_NAMES, Case, make_case
from peers import LIBRARIES, Bound, Unavailable, bind, describe_error, library_versions

PEERS = tuple(lib for lib in LIBRARIES if not lib.startswith("ours"))
QUANTITIES = ("hvp", "ggn")

#: Issue 9 speed targets: (name, case, layout, quantity, max ratio to the best peer).
TARGETS = (
    ("single-batch Hessian Lanczos step", "cnn-bn", "single", "lanczos", 0.6),
    ("full-dataset Hessian product", "cnn-bn", "full", "hvp", 1.0),
    ("full-dataset GGN product", "cnn-bn", "full", "ggn", 0.8),
)
OVERHEAD_TARGET = 0.05


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
    }


def gradient_callable(case: Case, layout: str) -> Callable[[torch.Tensor], None]:
    model = case.model_copy()
    params = [p for p in model.parameters() if p.requires_grad]
    data = case.data(layout)
    n = case.num_samples(layout)

    def grad(_: torch.Tensor) -> None:
        for x, y in data:
            loss = case.loss_fn(model(x), y) * (y.shape[0] / n)
            torch.autograd.grad(loss, params)

    return grad


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def measure_layout(
    case: Case, layout: str, libraries: tuple[str, ...], args: argparse.Namespace
) -> dict[str, Any]:
    data = case.data(layout)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(case.num_params, generator=gen)
    v /= v.norm()
    entry: dict[str, Any] = {
        "num_samples": case.num_samples(layout),
        "num_batches": len(data),
        "libraries": {},
    }
    bounds: dict[str, Bound] = {}
    for lib in libraries:
        info: dict[str, Any] = {"status": "ok"}
        entry["libraries"][lib] = info
        try:
            bounds[lib] = bind(lib, case.model_copy(), case.loss_fn, data)
        except Unavailable as exc:
            info.update(status="unavailable", error=str(exc))
        except Exception as exc:
            info.update(status="error", error=f"setup: {describe_error(exc)}")
    callables: dict[str, Callable[[torch.Tensor], Any]] = {"grad": gradient_callable(case, layout)}
    for lib, bound in bounds.items():
        for q in QUANTITIES:
            fn = getattr(bound, q)
            if fn is not None:
                callables[f"{lib}:{q}"] = fn
    # Warm-up (first call: graph building, lazy set-up) and agreement with ours.
    outputs: dict[str, torch.Tensor] = {}
    first: dict[str, float] = {}
    for key in list(callables):
        t0 = time.perf_counter()
        try:
            out = callables[key](v)
        except Exception as exc:
            lib, q = key.split(":")
            entry["libraries"][lib][q] = {"error": describe_error(exc)}
            del callables[key]
            continue
        first[key] = time.perf_counter() - t0
        if isinstance(out, torch.Tensor):
            outputs[key] = out.detach().reshape(-1).float()
    # Interleaved rounds, order rotated.
    samples: dict[str, list[float]] = {k: [] for k in callables}
    keys = list(callables)
    for r in range(args.repeats):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            t0 = time.perf_counter()
            callables[key](v)
            samples[key].append(time.perf_counter() - t0)
    grad_s = _median(samples.pop("grad"))
    entry["grad_seconds"] = grad_s
    entry["grad_first_call_seconds"] = first.get("grad")
    for key, xs in samples.items():
        lib, q = key.split(":")
        rec: dict[str, Any] = {
            "seconds": _median(xs),
            "samples": xs,
            "ratio_grad": _median(xs) / grad_s,
            "first_call_seconds": first[key],
        }
        ref = outputs.get(f"ours:{q}")
        if ref is not None and key in outputs and lib != "ours":
            rec["rel_diff_vs_ours"] = float((outputs[key] - ref).norm() / ref.norm())
        entry["libraries"][lib][q] = rec
    # Lanczos: one run of m steps per library.
    if layout == "single" or args.full_lanczos:
        for lib, bound in bounds.items():
            if bound.lanczos is None:
                continue
            log(f"  {case.name}/{layout}: Lanczos m={args.lanczos_iters} with {lib}")
            try:
                lt = bound.lanczos(args.lanczos_iters)
            except Exception as exc:
                entry["libraries"][lib]["lanczos"] = {"error": describe_error(exc)}
                continue
            rec = {
                "raw_seconds": lt.per_step,
                "raw_ratio_grad": lt.per_step / grad_s,
                "run_seconds": lt.seconds,
                "num_products": lt.num_products,
                "overhead": lt.overhead,
                "method": lt.method,
            }
            # Load-normalised step: the interleaved product median times the run's own
            # (wall time / time inside its products).  Both factors are ratios measured
            # under the same load, so minutes-apart runs stay comparable.
            hvp_rec = entry["libraries"][lib].get("hvp", {})
            if lt.product_seconds and "seconds" in hvp_rec:
                rec["seconds"] = hvp_rec["seconds"] * lt.seconds / lt.product_seconds
            else:
                rec["seconds"] = lt.per_step
            rec["ratio_grad"] = rec["seconds"] / grad_s
            entry["libraries"][lib]["lanczos"] = rec
    for lib, bound in bounds.items():
        if bound.notes:
            entry["libraries"][lib]["notes"] = dict(bound.notes)
    # Ratios to the best peer.
    for q in (*QUANTITIES, "lanczos"):
        peer_times = {
            lib: entry["libraries"][lib][q]["seconds"]
            for lib in PEERS
            if lib in entry["libraries"] and "seconds" in entry["libraries"][lib].get(q, {})
        }
        if not peer_times:
            continue
        best_lib = min(peer_times, key=lambda k: peer_times[k])
        for info in entry["libraries"].values():
            rec = info.get(q)
            if rec is not None and "seconds" in rec:
                rec["ratio_best_peer"] = rec["seconds"] / peer_times[best_lib]
                rec["best_peer"] = best_lib
    return entry


# ---------------------------------------------------------------------------- reporting
def _cell(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "n/a"
    if "error" in rec:
        return "fails"
    text = f"{rec['ratio_grad']:.2f}"
    if "ratio_best_peer" in rec:
        text += f" ({rec['ratio_best_peer']:.2f}x)"
    return text


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        "| case | data | P | gradient (s) | library | Hessian product | GGN product "
        "| Lanczos step | Lanczos step, raw | Lanczos overhead | Hv rel. diff vs ours |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["cases"]:
        for layout, entry in c["layouts"].items():
            data = f"{layout} ({entry['num_batches']}x, N={entry['num_samples']})"
            for lib, info in entry["libraries"].items():
                if info["status"] != "ok":
                    cells = [info["status"]] * 3 + ["", "", ""]
                else:
                    lz = info.get("lanczos")
                    over = lz.get("overhead") if lz else None
                    diff = info.get("hvp", {}).get("rel_diff_vs_ours")
                    cells = [
                        _cell(info.get("hvp")),
                        _cell(info.get("ggn")),
                        _cell(lz),
                        ""
                        if not lz or "raw_ratio_grad" not in lz
                        else f"{lz['raw_ratio_grad']:.2f}",
                        "" if over is None else f"{100 * over:.1f}%",
                        "" if diff is None else f"{diff:.1e}",
                    ]
                lines.append(
                    f"| {c['name']} | {data} | {c['num_params']:,} | {entry['grad_seconds']:.3f} "
                    f"| {lib} | " + " | ".join(cells) + " |"
                )
    return "\n".join(lines)


def notes_text(results: dict[str, Any]) -> str:
    out = []
    for c in results["cases"]:
        for layout, entry in c["layouts"].items():
            for lib, info in entry["libraries"].items():
                if info["status"] != "ok":
                    where = f"({c['name']}, {layout})"
                    out.append(f"- {lib} {where}: {info['status']}: {info['error']}")
                    continue
                for q in (*QUANTITIES, "lanczos"):
                    if "error" in info.get(q, {}):
                        out.append(f"- {lib} {q} ({c['name']}, {layout}): {info[q]['error']}")
                for key, text in info.get("notes", {}).items():
                    out.append(f"- {lib} {key} ({c['name']}, {layout}): {text}")
                if layout == "single" and "lanczos" in info and "method" in info["lanczos"]:
                    lz = info["lanczos"]
                    out.append(
                        f"- {lib} Lanczos ({c['name']}): {lz['method']}, "
                        f"{lz['num_products']} products in {lz['run_seconds']:.2f} s"
                    )
    # de-duplicate repeated unavailability lines
    seen: set[str] = set()
    unique = []
    for line in out:
        key = line.split("(")[0] + line.split(":", 1)[-1] if "unavailable" in line else line
        if key not in seen:
            seen.add(key)
            unique.append(line)
    return "\n".join(unique)


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    by_case = {c["name"]: c for c in results["cases"]}
    verdicts = []
    for name, case, layout, q, limit in TARGETS:
        rec = by_case.get(case, {}).get("layouts", {}).get(layout, {})
        rec = rec.get("libraries", {}).get("ours", {}).get(q, {})
        ratio = rec.get("ratio_best_peer")
        verdicts.append(
            {
                "target": f"{name} <= {limit}x best peer ({case})",
                "measured": ratio,
                "best_peer": rec.get("best_peer"),
                "met": None if ratio is None else bool(ratio <= limit),
            }
        )
    for c in results["cases"]:
        lz = c["layouts"].get("single", {}).get("libraries", {}).get("ours", {}).get("lanczos")
        if c["num_params"] >= 100_000 and lz and lz.get("overhead") is not None:
            verdicts.append(
                {
                    "target": f"Lanczos overhead beyond products <= 5% ({c['name']}, "
                    f"P={c['num_params']:,})",
                    "measured": lz["overhead"],
                    "best_peer": None,
                    "met": bool(lz["overhead"] <= OVERHEAD_TARGET),
                }
            )
    return verdicts


def targets_text(verdicts: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | met |", "|---|---:|---|"]
    for v in verdicts:
        m = v["measured"]
        if m is None:
            shown = "n/a"
        else:
            shown = f"{100 * m:.1f}%" if "overhead" in v["target"] else f"{m:.2f}x"
        if v["best_peer"]:
            shown += f" (vs {v['best_peer']})"
        met = "n/a" if v["met"] is None else ("yes" if v["met"] else "**no**")
        lines.append(f"| {v['target']} | {shown} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, < 1 minute")
    parser.add_argument("--out", type=Path, default=None, help="write all numbers as JSON")
    parser.add_argument("--table", type=Path, default=None, help="write the Markdown report")
    parser.add_argument("--cases", nargs="+", default=list(CASE_NAMES), choices=CASE_NAMES)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--lanczos-iters", type=int, default=None, help="m (default 50)")
    parser.add_argument("--full-lanczos", action="store_true", help="also on the full dataset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cnn-batch", type=int, default=None, help="cnn-bn single batch size")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.lanczos_iters is None:
        args.lanczos_iters = 10 if args.quick else 50
    torch.set_num_threads(args.threads)
    libraries = tuple(args.libraries)
    if "ours" not in libraries:
        libraries = ("ours", *libraries)
    command = "python benchmarks/run_benchmarks.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )
    results: dict[str, Any] = {
        "command": command.strip(),
        "machine": machine_info(),
        "versions": library_versions(),
        "settings": {
            "quick": args.quick,
            "repeats": args.repeats,
            "lanczos_iters": args.lanczos_iters,
            "threads": args.threads,
            "cnn_batch": args.cnn_batch,
            "dtype": "float32",
            "bn_mode": "eval (every library; PyHessian forces model.eval())",
        },
        "cases": [],
    }
    t_start = time.perf_counter()
    for name in args.cases:
        case = make_case(name, quick=args.quick, cnn_batch=args.cnn_batch)
        log(f"case {name}: P={case.num_params:,}")
        rec: dict[str, Any] = {
            "name": name,
            "description": case.description,
            "num_params": case.num_params,
            "layouts": {},
        }
        for layout in ("single", "full"):
            log(f"  {name}/{layout}: products")
            rec["layouts"][layout] = measure_layout(case, layout, libraries, args)
        results["cases"].append(rec)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["wall_seconds"] = time.perf_counter() - t_start
    results["targets"] = evaluate_targets(results)
    report = "\n\n".join(
        [
            f"Command: `{results['command']}`  ",
            f"Machine: {results['machine']['cpu']}, {results['machine']['logical_cores']} "
            f"logical cores, torch threads {args.threads}, load average "
            f"{results['machine']['load_average_start'][0]:.1f} -> "
            f"{results['machine']['load_average_end'][0]:.1f}; versions: "
            + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
            "Cells: median time / gradient time of the same data "
            "(in parentheses: / the fastest peer's time).",
            markdown_table(results),
            notes_text(results),
            "Targets (issue 9):\n\n" + targets_text(results["targets"]),
            f"Wall time: {results['wall_seconds']:.0f} s.",
        ]
    )
    results["report_markdown"] = report
    print(report)
    if args.table is not None:
        args.table.write_text(report + "\n")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
