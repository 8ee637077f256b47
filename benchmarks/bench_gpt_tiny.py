"""gpt-tiny on the text dataset: Hessian/GGN products in gradient-times, Lanczos steps, memory.

The issue-15 targets, on ``gpt-tiny`` (437,760 parameters) with one batch of 16
sequences x 64 tokens, float32, one CPU thread:

* Hessian product <= 2.1 gradient-times, GGN product <= 1.3 gradient-times;
* a Lanczos step against curvlinops and hessian-eigenthings on the same model and loss
  (a library that cannot run it is reported with the reason);
* peak memory per product <= 3x the gradient's.

Every library gets the same model wrapped to return logits as ``(B, V, T)`` so that the
plain ``nn.CrossEntropyLoss()`` is the mean next-token cross-entropy (what the peers
accept).  Times are medians over interleaved rounds (every callable once per round,
order rotated) after an untimed warm-up (which builds our cached graphs); the unit is
the gradient ``torch.autograd.grad(loss(model(x), y), params)``.  Peak memory is the
growth of the process's peak resident set (``VmHWM`` reset through
``/proc/self/clear_refs``, Linux) during one gradient / one first product (graph
building included) after a warm-up call whose memory is freed and returned to the system
(``malloc_trim``), each measured in a fresh subprocess (median of three).  Ratios are per
round (the product over the same round's gradient): median and range, in wall-clock time
and in the CPU time of the measuring thread (less sensitive to other processes on a shared
machine).  Run::

    python benchmarks/bench_gpt_tiny.py --out benchmarks/gpt_tiny.json

``--quick`` uses 2 sequences and 2 rounds (smoke test).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peers import Unavailable, bind, describe_error, library_versions
from nets.data.text import load_text_splits
from nets.models import get_model
from spectral.io import atomic_write

PEERS = ("ours", "curvlinops", "hessian-eigenthings")


class ClassDimFirst(nn.Module):
    """``gpt(x).transpose(1, 2)``: logits ``(B, V, T)`` for ``nn.CrossEntropyLoss``."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.gpt(x).transpose(1, 2)
        return out


def make_setup(batch: int) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The wrapped gpt-tiny (seed 0), the loss and the first ``batch`` training sequences."""
    train, _ = load_text_splits(seq_len=64)
    x, y = train.get_batch(list(range(batch)))
    model = ClassDimFirst(get_model("gpt-tiny", 256, 1, 64, seed=0))
    return model, nn.CrossEntropyLoss(), (x, y)


def _gradient(model: nn.Module, loss_fn: nn.Module, data: Any) -> Callable[[], Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = data

    def grad() -> Any:
        return torch.autograd.grad(loss_fn(model(x), y), params)

    return grad


def _round_times(fns: dict[str, Callable[[], Any]], rounds: int, clock: Callable[[], float]) -> Any:
    """Seconds of every callable in every round (interleaved, order rotated)."""
    for fn in fns.values():  # warm-up: graphs, caches, allocator
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
    return times


def _ratios(times: dict[str, list[float]], name: str) -> dict[str, float]:
    """Median and range over rounds of ``name``'s time over the same round's gradient."""
    per_round = [t / g for t, g in zip(times[name], times["gradient"])]
    return {
        "median": statistics.median(per_round),
        "min": min(per_round),
        "max": max(per_round),
    }


def _under(backends: list[SDPBackend], fn: Callable[[], Any]) -> Any:
    with sdpa_kernel(backends):
        return fn()


def measure(
    batch: int,
    rounds: int,
    lanczos_steps: int,
    cpu_time: bool = True,
    peers: tuple[str, ...] = PEERS,
) -> dict[str, Any]:
    """Products, Lanczos steps and their agreement, for every library of ``peers`` that runs."""
    model, loss_fn, data = make_setup(batch)
    num_params = sum(p.numel() for p in model.parameters())
    v = torch.randn(num_params, generator=torch.Generator().manual_seed(0))
    fns: dict[str, Callable[[], Any]] = {"gradient": _gradient(model, loss_fn, data)}
    bounds, notes = {}, {}
    for lib in peers:
        try:
            bound = bind(lib, model, loss_fn, [data])
        except Unavailable as exc:
            notes[lib] = f"unavailable: {exc}"
            continue
        except Exception as exc:  # a peer that cannot set this model up
            notes[lib] = f"cannot run: {describe_error(exc)}"
            continue
        bounds[lib] = bound
        for kind in ("hvp", "ggn"):
            fn = getattr(bound, kind)
            if fn is not None:
                fns[f"{lib} {kind}"] = lambda fn=fn: fn(v)
    math_only = [SDPBackend.MATH]  # the peers need attention with second derivatives
    for name in list(fns):
        if not name.startswith(("gradient", "ours")):
            fns[name] = lambda fn=fns[name]: _under(math_only, fn)
    wall = _round_times(fns, rounds, time.perf_counter)
    cpu = _round_times(fns, rounds, time.thread_time) if cpu_time else None
    seconds = {k: statistics.median(v) for k, v in wall.items()}
    unit = seconds["gradient"]
    ref = {k: torch.as_tensor(bounds["ours"].__dict__[k](v)) for k in ("hvp", "ggn")}
    rows = []
    for lib, bound in bounds.items():
        row: dict[str, Any] = {"library": lib}
        for kind in ("hvp", "ggn"):
            if f"{lib} {kind}" in seconds:
                row[f"{kind}_s"] = seconds[f"{lib} {kind}"]
                row[f"{kind}_gradient_times"] = _ratios(wall, f"{lib} {kind}")
                if cpu is not None:
                    row[f"{kind}_gradient_times_cpu"] = _ratios(cpu, f"{lib} {kind}")
                with sdpa_kernel(math_only):
                    out = torch.as_tensor(getattr(bound, kind)(v))
                row[f"{kind}_rel_diff_to_ours"] = float((out - ref[kind]).norm() / ref[kind].norm())
        if bound.lanczos is not None:
            with sdpa_kernel(math_only):
                timing = bound.lanczos(lanczos_steps)
            row["lanczos_step_s"] = timing.per_step
            row["lanczos_method"] = timing.method
            row["lanczos_overhead"] = timing.overhead
        rows.append(row)
    return {
        "num_params": num_params,
        "batch": f"{batch} x 64 tokens",
        "gradient_s": unit,
        "rows": rows,
        "notes": notes,
    }


def _memory_child(kind: str, batch: int) -> None:
    """Print the peak-RSS growth (MiB) of one gradient or one first product."""
    from curvops import GGNOperator, HessianOperator

    torch.set_num_threads(1)
    model, loss_fn, data = make_setup(batch)
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    fn: Callable[[], Any]
    cls = HessianOperator if kind == "hessian" else GGNOperator
    if kind == "gradient":
        fn = _gradient(model, loss_fn, data)
    else:
        op = cls(model, loss_fn, data)
        fn = lambda: op.matvec(v)  # noqa: E731
    fn()  # warm-up: lazy initialisation (then freed)
    if kind != "gradient":
        del fn, op  # free the warm-up graphs before building the measured ones
        op = cls(model, loss_fn, data)  # a fresh operator: the first product builds graphs
        fn = lambda: op.matvec(v)  # noqa: E731
    gc.collect()
    _return_free_memory()  # freed heap pages would hide the growth of the measured call
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    fn()
    after = _status_kib("VmHWM")
    print(json.dumps({"kind": kind, "peak_growth_mib": (after - before) / 1024.0}))


def _return_free_memory() -> None:
    """``malloc_trim(0)``: give the allocator's free pages back to the system (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement is then an upper bound
        pass


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory(batch: int, repeats: int = 3) -> dict[str, float]:
    """Peak-RSS growth of a gradient, a Hessian and a GGN product (fresh processes, median)."""
    out = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kind in ("gradient", "hessian", "ggn"):
        runs = []
        for _ in range(repeats):
            done = subprocess.run(
                [sys.executable, __file__, "--memory-child", kind, "--batch", str(batch)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            runs.append(json.loads(done.stdout.strip().splitlines()[-1])["peak_growth_mib"])
        out[kind] = statistics.median(runs)
    return out


def table(result: dict[str, Any]) -> str:
    """A Markdown table of the measurements."""
    lines = [
        f"gpt-tiny ({result['num_params']:,} parameters), batch {result['batch']}, float32, "
        f"one thread; gradient {result['gradient_s'] * 1e3:.1f} ms (wall, median); "
        f"load average {result.get('load_average', '?')}",
        "",
        "| library | Hessian product (grad-times) | GGN product (grad-times) | "
        "Lanczos step (s) | rel. diff. to ours (H / GGN) |",
        "|---|---|---|---|---|",
    ]

    def ratio(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "n/a"
        return f"{value['median']:.2f} ({value['min']:.2f}-{value['max']:.2f})"

    for row in result["rows"]:

        def fmt(key: str, spec: str, row: dict[str, Any] = row) -> str:
            value = row.get(key)
            return "n/a" if value is None else format(value, spec)

        hvp, ggn = ratio(row, "hvp_gradient_times"), ratio(row, "ggn_gradient_times")
        if "hvp_gradient_times_cpu" in row or "ggn_gradient_times_cpu" in row:
            hvp += f"; CPU time {ratio(row, 'hvp_gradient_times_cpu')}"
            ggn += f"; CPU time {ratio(row, 'ggn_gradient_times_cpu')}"
        lines.append(
            f"| {row['library']} | {hvp} | {ggn} | {fmt('lanczos_step_s', '.3f')} | "
            f"{fmt('hvp_rel_diff_to_ours', '.1e')} / {fmt('ggn_rel_diff_to_ours', '.1e')} |"
        )
    for lib, note in result["notes"].items():
        lines.append(f"| {lib} | {note} | | | |")
    mem = result.get("memory_mib")
    if mem:
        lines += [
            "",
            f"Peak memory growth: gradient {mem['gradient']:.0f} MiB, Hessian product "
            f"{mem['hessian']:.0f} MiB ({mem['hessian'] / mem['gradient']:.2f}x), GGN product "
            f"{mem['ggn']:.0f} MiB ({mem['ggn'] / mem['gradient']:.2f}x).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds")
    parser.add_argument("--lanczos-steps", type=int, default=10, help="Lanczos steps")
    parser.add_argument("--quick", action="store_true", help="smoke test")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated libraries to run ('ours' is always run): e.g. --peers ours",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        _memory_child(args.memory_child, args.batch)
        return 0
    if args.quick:
        args.batch, args.rounds, args.lanczos_steps = 2, 2, 3
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    peers = ("ours", *[p for p in args.peers.split(",") if p and p != "ours"])
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        parser.error(f"--peers: expected names from {list(PEERS)}, received {unknown}")
    result = measure(args.batch, args.rounds, args.lanczos_steps, peers=peers)
    result["load_average"] = f"{load_before:.1f}-{os.getloadavg()[0]:.1f} (start-end, 1 min)"
    if not args.no_memory:
        result["memory_mib"] = memory(args.batch)
    result["versions"] = library_versions()
    print(table(result))
    if args.out:
        with atomic_write(args.out, "w") as handle:
            handle.write(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
